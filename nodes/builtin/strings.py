"""ComfyUI's text nodes (comfy_extras/nodes_string.py): formatting, cutting, case, trimming, comparing, regular
expressions, a value from JSON in a text, and dictionaries or arrays written as JSON. StringConcatenate and
StringReplace, from the same file, are in nodes/builtin/utils.py.

Where ComfyUI's node gives a value for bad input, Loom gives the same value and logs a warning naming the node:
RegexMatch gives False and RegexExtract an empty text for a pattern that is not a regular expression, and
JsonExtractString an empty text where the text holds no JSON object. Where ComfyUI's node fails (RegexReplace's
pattern, StringFormat's fields, a value JSON cannot hold), Loom fails with a ValueError naming the node.

StringFormat's `values` is ComfyUI's autogrow group of sockets `values.a` to `values.z` (any type, all optional; the
editor shows the next one as one is linked). Its `f_string` is formatted as Python's str.format with the linked
values by letter, except that attributes whose names start with "_" are refused: `{a.__class__...}` would reach
the server's internals.
"""

from __future__ import annotations

import _string
import json
import logging
import re
import string
from typing import Any

from nodes.node import Node
from nodes.spec import ANY_TYPE, Boolean, Combo, Int, Output, Socket, String

log = logging.getLogger(__name__)

FORMAT_PREFIX = "values."
FORMAT_LETTERS = string.ascii_lowercase
ADVANCED = {"advanced": True}


def _regex_flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    return ((re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0)
            | (re.DOTALL if dotall else 0))


class _SafeFormatter(string.Formatter):
    """str.format's rules over named values, without attributes whose names start with an underscore; a field
    without a value is a ValueError saying which."""

    def get_value(self, key: int | str, args: Any, kwargs: dict[str, Any]) -> Any:
        if isinstance(key, int):
            raise ValueError("positional fields such as {} or {0} have no value; name the linked values: {a}, {b}, "
                             "...")
        if key not in kwargs:
            linked = ", ".join(f"{FORMAT_PREFIX}{name}" for name in kwargs) or "none"
            raise ValueError(f"the text names {{{key}}}, but no value is linked to {FORMAT_PREFIX}{key} (linked: "
                             f"{linked}); link one, or write a literal brace as {{{{ or }}}}")
        return kwargs[key]

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        _, rest = _string.formatter_field_name_split(field_name)
        for is_attribute, name in rest:
            if is_attribute and name.startswith("_"):
                raise ValueError(f"the field {{{field_name}}} reads the attribute {name!r}; attributes whose names "
                                 "start with '_' are not allowed")
        return super().get_field(field_name, args, kwargs)


def format_text(f_string: str, values: dict[str, Any]) -> str:
    """`f_string` formatted as str.format(**values); a field without a value or a bad format is a ValueError."""
    try:
        return _SafeFormatter().vformat(f_string, (), values)
    except ValueError:
        raise
    except (KeyError, IndexError, AttributeError, TypeError) as e:  # a field reading into a value
        raise ValueError(f"{type(e).__name__}: {e}") from None


class StringFormat(Node):
    """Same as Python's string format method. Supports all of Python's format options and features."""

    display_name = "Format Text"
    category = "text"
    inputs = {**{f"{FORMAT_PREFIX}{letter}": Socket(ANY_TYPE, optional=True, extra={"autogrow": True})
                 for letter in FORMAT_LETTERS},
              "f_string": String("{a}", multiline=True)}
    outputs = (Output("STRING"),)

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        # execute takes the sockets as **values, so the engine's own check for undeclared inputs lets them through
        unknown = sorted(name for name in linked if name not in cls.inputs)
        return f"StringFormat has no input {', '.join(unknown)} (values.a to values.z)" if unknown else None

    def execute(self, f_string: str, **values: Any) -> tuple[str]:
        named = {name.removeprefix(FORMAT_PREFIX): values[name] for name in sorted(values)}
        try:
            return (format_text(f_string, named),)
        except ValueError as e:
            raise ValueError(f"StringFormat: {e}") from None


class StringSubstring(Node):
    display_name = "Substring"
    category = "text"
    string = String("", multiline=True)
    start = Int(0)
    end = Int(0)
    outputs = (Output("STRING"),)

    def execute(self, string: str, start: int, end: int) -> tuple[str]:
        return (string[start:end],)


class StringLength(Node):
    display_name = "Text Length"
    category = "text"
    string = String("", multiline=True)
    outputs = (Output("INT", "length"),)

    def execute(self, string: str) -> tuple[int]:
        return (len(string),)


_CASES = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize, "Title Case": str.title}


class CaseConverter(Node):
    display_name = "Convert Text Case"
    category = "text"
    string = String("", multiline=True)
    mode = Combo(list(_CASES))
    outputs = (Output("STRING"),)

    def execute(self, string: str, mode: str) -> tuple[str]:
        # a mode from a link that is none of these leaves the text as it is, as in ComfyUI
        return (_CASES[mode](string) if mode in _CASES else string,)


_TRIMS = {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}


class StringTrim(Node):
    """Removes whitespace from both ends of the text, or from its start (Left) or end (Right) only."""

    display_name = "Trim Text"
    category = "text"
    string = String("", multiline=True)
    mode = Combo(list(_TRIMS))
    outputs = (Output("STRING"),)

    def execute(self, string: str, mode: str) -> tuple[str]:
        return (_TRIMS[mode](string) if mode in _TRIMS else string,)


class StringContains(Node):
    display_name = "Contains Text"
    category = "text"
    string = String("", multiline=True)
    substring = String("", multiline=True)
    case_sensitive = Boolean(True, extra=ADVANCED)
    outputs = (Output("BOOLEAN", "contains"),)

    def execute(self, string: str, substring: str, case_sensitive: bool) -> tuple[bool]:
        if not case_sensitive:
            string, substring = string.lower(), substring.lower()
        return (substring in string,)


_COMPARISONS = {"Starts With": str.startswith, "Ends With": str.endswith, "Equal": str.__eq__}


class StringCompare(Node):
    """Whether string_a starts with, ends with or equals string_b."""

    display_name = "Compare Text"
    category = "text"
    string_a = String("", multiline=True)
    string_b = String("", multiline=True)
    mode = Combo(list(_COMPARISONS))
    case_sensitive = Boolean(True, extra=ADVANCED)
    outputs = (Output("BOOLEAN"),)

    def execute(self, string_a: str, string_b: str, mode: str, case_sensitive: bool) -> tuple[bool]:
        if mode not in _COMPARISONS:
            raise ValueError(f"StringCompare: mode {mode!r} is not one of {', '.join(_COMPARISONS)}")
        if not case_sensitive:
            string_a, string_b = string_a.lower(), string_b.lower()
        return (_COMPARISONS[mode](string_a, string_b),)


def _bad_pattern(node: str, pattern: str, error: re.error, gives: str) -> None:
    log.warning("%s: %r is not a regular expression (%s); it gives %s, as in ComfyUI", node, pattern, error, gives)


class RegexMatch(Node):
    """Whether the pattern is found anywhere in the text (re.search). A pattern that is not a regular expression
    gives False (and a warning in the log), as in ComfyUI."""

    display_name = "Match Text"
    category = "text"
    string = String("", multiline=True)
    regex_pattern = String("", multiline=True)
    case_insensitive = Boolean(True, extra=ADVANCED)
    multiline = Boolean(False, extra=ADVANCED)
    dotall = Boolean(False, extra=ADVANCED)
    outputs = (Output("BOOLEAN", "matches"),)

    def execute(self, string: str, regex_pattern: str, case_insensitive: bool, multiline: bool,
                dotall: bool) -> tuple[bool]:
        try:
            return (re.search(regex_pattern, string, _regex_flags(case_insensitive, multiline, dotall)) is not None,)
        except re.error as e:
            _bad_pattern("RegexMatch", regex_pattern, e, "False")
            return (False,)


def regex_extract(text: str, pattern: str, mode: str, flags: int, group_index: int) -> str:
    """RegexExtract's text: the first match, every match (each one's first group where the pattern has groups), the
    first match's group `group_index`, or that group of every match; several are joined by newlines."""
    if mode == "First Match":
        match = re.search(pattern, text, flags)
        return match.group(0) if match else ""
    if mode == "All Matches":
        found = re.findall(pattern, text, flags)
        return "\n".join(item[0] for item in found) if found and isinstance(found[0], tuple) else "\n".join(found)

    def group_of(match: re.Match | None, need_groups: bool) -> str | None:
        if match is None or need_groups and not match.groups() or len(match.groups()) < group_index:
            return None
        return match.group(group_index)

    if mode == "First Group":
        return group_of(re.search(pattern, text, flags), need_groups=False) or ""
    if mode == "All Groups":
        groups = (group_of(match, need_groups=True) for match in re.finditer(pattern, text, flags))
        return "\n".join(group for group in groups if group is not None)
    return ""  # a mode from a link that is none of these, as in ComfyUI


class RegexExtract(Node):
    """Text the pattern finds: the first match, all matches, a group of the first match, or that group of all
    matches (several joined by newlines). A pattern that is not a regular expression gives an empty text (and a
    warning in the log), as in ComfyUI."""

    display_name = "Extract Text"
    category = "text"
    string = String("", multiline=True)
    regex_pattern = String("", multiline=True)
    mode = Combo(["First Match", "All Matches", "First Group", "All Groups"])
    case_insensitive = Boolean(True, extra=ADVANCED)
    multiline = Boolean(False, extra=ADVANCED)
    dotall = Boolean(False, extra=ADVANCED)
    group_index = Int(1, min=0, max=100, extra=ADVANCED)
    outputs = (Output("STRING"),)

    def execute(self, string: str, regex_pattern: str, mode: str, case_insensitive: bool, multiline: bool,
                dotall: bool, group_index: int) -> tuple[str]:
        try:
            return (regex_extract(string, regex_pattern, mode, _regex_flags(case_insensitive, multiline, dotall),
                                  group_index),)
        except re.error as e:
            _bad_pattern("RegexExtract", regex_pattern, e, "an empty text")
            return ("",)


class RegexReplace(Node):
    """Find and replace text using regex patterns."""

    display_name = "Replace Text (Regex)"
    category = "text"
    string = String("", multiline=True)
    regex_pattern = String("", multiline=True)
    replace = String("", multiline=True)
    case_insensitive = Boolean(True, optional=True, extra=ADVANCED)
    multiline = Boolean(False, optional=True, extra=ADVANCED)
    dotall = Boolean(False, optional=True, extra=ADVANCED,
                     tooltip="When enabled, the dot (.) character will match any character including newline "
                             "characters. When disabled, dots won't match newlines.")
    count = Int(0, min=0, max=100, optional=True, extra=ADVANCED,
                tooltip="Maximum number of replacements to make. Set to 0 to replace all occurrences (default). Set "
                        "to 1 to replace only the first match, 2 for the first two matches, etc.")
    outputs = (Output("STRING"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        pattern = inputs.get("regex_pattern")
        if not isinstance(pattern, str):
            return None  # linked: checked as the node runs
        try:
            re.compile(pattern)
        except re.error as e:
            return f"RegexReplace: regex_pattern {pattern!r} is not a regular expression: {e}"
        return None

    def execute(self, string: str, regex_pattern: str, replace: str, case_insensitive: bool = True,
                multiline: bool = False, dotall: bool = False, count: int = 0) -> tuple[str]:
        flags = _regex_flags(case_insensitive, multiline, dotall)
        try:
            return (re.sub(regex_pattern, replace, string, count=count, flags=flags),)
        except re.error as e:
            raise ValueError(f"RegexReplace: regex_pattern {regex_pattern!r} with replace {replace!r}: {e}; "
                             r"groups are referred to as \1 or \g<name>, a literal backslash is \\") from None


def json_extract(text: str, key: str) -> str:
    """The value of `key` in the first JSON object found in `text` (searched from each "{" in turn, so one in a
    Markdown code block or after other text counts), as Python's str() writes it; "" where that object lacks the key
    or holds null there, or where no "{" starts a JSON object."""
    decoder = json.JSONDecoder()
    for brace in re.finditer(r"\{", text):
        try:
            data, _ = decoder.raw_decode(text, brace.start())
        except json.JSONDecodeError:
            continue
        value = data.get(key)
        return "" if value is None else str(value)
    log.warning("JsonExtractString: no JSON object in the text (%d characters); it gives an empty text, as in "
                "ComfyUI", len(text))
    return ""


class JsonExtractString(Node):
    """Extract a key's value from the first valid JSON object in the text, including Markdown code blocks."""

    display_name = "Extract Text from JSON"
    category = "text"
    json_string = String("", multiline=True)
    key = String("")
    outputs = (Output("STRING"),)

    def execute(self, json_string: str, key: str) -> tuple[str]:
        return (json_extract(json_string, key),)


INDENT_TOOLTIP = "Spaces per indent level. 0 produces compact single-line string."


def dump_json(node: str, value: Any, indent: int) -> str:
    """`value` as JSON text (non-ASCII kept as it is), indented by `indent` spaces, or on one line for 0."""
    try:
        return json.dumps(value, ensure_ascii=False, indent=indent or None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{node}: the value cannot be written as JSON: {e}; it may hold only dictionaries, lists, "
                         "texts, numbers, booleans and None") from None


class ConvertDictionaryToString(Node):
    display_name = "Convert Dictionary to String"
    category = "text"
    dictionary = Socket("DICT")
    indent = Int(2, min=0, max=8, tooltip=INDENT_TOOLTIP)
    outputs = (Output("STRING"),)

    def execute(self, dictionary: dict, indent: int = 2) -> tuple[str]:
        return (dump_json("ConvertDictionaryToString", dictionary, indent),)


class ConvertArrayToString(Node):
    display_name = "Convert Array to String"
    category = "text"
    array = Socket("ARRAY")
    indent = Int(2, min=0, max=8, tooltip=INDENT_TOOLTIP)
    outputs = (Output("STRING"),)

    def execute(self, array: list, indent: int = 2) -> tuple[str]:
        return (dump_json("ConvertArrayToString", array, indent),)


NODES = [StringFormat, StringSubstring, StringLength, CaseConverter, StringTrim, StringContains, StringCompare,
         RegexMatch, RegexExtract, RegexReplace, JsonExtractString, ConvertDictionaryToString, ConvertArrayToString]
