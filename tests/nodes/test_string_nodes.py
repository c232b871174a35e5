"""ComfyUI's text nodes (nodes_string.py) run by the engine as a user's workflow: each result against a value written
out by hand or Python's own str / re / json on the same input, their declarations (ComfyUI's input order, defaults,
advanced flags, output names), StringFormat's autogrow sockets in API and editor files, and the refusals."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from executor.executor import Executor, WorkflowInvalid
from graph.document import parse_api
from graph.load import graph_from_data
from graph.ui_format import ui_to_api
from nodes.builtin.strings import format_text
from nodes.node import Node
from nodes.registry import builtin_registry
from nodes.spec import Output, String


class JsonDict(Node):
    """A DICT from JSON text (Loom has no core node that gives one)."""

    text = String("{}")
    outputs = (Output("DICT"),)

    def execute(self, text: str) -> tuple[Any]:
        return (json.loads(text),)


class JsonArray(Node):
    text = String("[]")
    outputs = (Output("ARRAY"),)

    def execute(self, text: str) -> tuple[Any]:
        return (json.loads(text),)


class NotJson(Node):
    """A DICT holding a value JSON cannot write (a set)."""

    outputs = (Output("DICT"),)

    def execute(self) -> tuple[Any]:
        return ({"tags": {1, 2}},)


@pytest.fixture(scope="module")
def engine():
    registry = builtin_registry()
    for cls in (JsonDict, JsonArray, NotJson):
        registry.register(cls, "tests")
    return Executor(registry)


def run_node(engine: Executor, class_type: str, inputs: dict[str, Any], sources: dict | None = None) -> Any:
    """Run `class_type` (node "9") with `inputs`, its output shown by a PreviewAny; the node's first output."""
    doc = {**(sources or {}), "9": {"class_type": class_type, "inputs": inputs},
           "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}
    result = engine.run(parse_api(doc), keep=["9"])
    assert result.ok, result.error
    return result.values["9"][0]


def run_error(engine: Executor, class_type: str, inputs: dict[str, Any], sources: dict | None = None) -> str:
    doc = {**(sources or {}), "9": {"class_type": class_type, "inputs": inputs},
           "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}
    result = engine.run(parse_api(doc))
    assert not result.ok and result.error.node_id == "9" and result.error.exception_type == "ValueError"
    return result.error.exception_message


# --- Declarations ---------------------------------------------------------------------------------------------


# node: (display name, required inputs in order, optional inputs in order, output types, output names)
DECLARATIONS = {
    "StringFormat": ("Format Text", ["f_string"], [f"values.{c}" for c in "abcdefghijklmnopqrstuvwxyz"], ["STRING"],
                     ["STRING"]),
    "StringConcatenate": ("Concatenate Text", ["string_a", "string_b", "delimiter"], [], ["STRING"], ["STRING"]),
    "StringReplace": ("Replace Text", ["string", "find", "replace"], [], ["STRING"], ["STRING"]),
    "StringSubstring": ("Substring", ["string", "start", "end"], [], ["STRING"], ["STRING"]),
    "StringLength": ("Text Length", ["string"], [], ["INT"], ["length"]),
    "CaseConverter": ("Convert Text Case", ["string", "mode"], [], ["STRING"], ["STRING"]),
    "StringTrim": ("Trim Text", ["string", "mode"], [], ["STRING"], ["STRING"]),
    "StringContains": ("Contains Text", ["string", "substring", "case_sensitive"], [], ["BOOLEAN"], ["contains"]),
    "StringCompare": ("Compare Text", ["string_a", "string_b", "mode", "case_sensitive"], [], ["BOOLEAN"],
                      ["BOOLEAN"]),
    "RegexMatch": ("Match Text", ["string", "regex_pattern", "case_insensitive", "multiline", "dotall"], [],
                   ["BOOLEAN"], ["matches"]),
    "RegexExtract": ("Extract Text", ["string", "regex_pattern", "mode", "case_insensitive", "multiline", "dotall",
                                      "group_index"], [], ["STRING"], ["STRING"]),
    "RegexReplace": ("Replace Text (Regex)", ["string", "regex_pattern", "replace"],
                     ["case_insensitive", "multiline", "dotall", "count"], ["STRING"], ["STRING"]),
    "JsonExtractString": ("Extract Text from JSON", ["json_string", "key"], [], ["STRING"], ["STRING"]),
    "ConvertDictionaryToString": ("Convert Dictionary to String", ["dictionary", "indent"], [], ["STRING"],
                                  ["STRING"]),
    "ConvertArrayToString": ("Convert Array to String", ["array", "indent"], [], ["STRING"], ["STRING"]),
}


@pytest.mark.parametrize("name", DECLARATIONS)
def test_declarations_are_comfyuis(engine, name) -> None:
    display, required, optional, output, output_name = DECLARATIONS[name]
    info = engine.registry.get(name).object_info()
    assert (info["display_name"], info["category"]) == (display, "text")
    assert info["input_order"] == {"required": required, "optional": optional}
    assert (info["output"], info["output_name"]) == (output, output_name)


def test_declared_options_defaults_and_widget_order(engine) -> None:
    def spec(node: str, name: str) -> list:
        info = engine.registry.get(node).object_info()["input"]
        return {**info["required"], **info["optional"]}[name]

    assert spec("CaseConverter", "mode")[0] == ["UPPERCASE", "lowercase", "Capitalize", "Title Case"]
    assert spec("StringTrim", "mode")[0] == ["Both", "Left", "Right"]
    assert spec("StringCompare", "mode")[0] == ["Starts With", "Ends With", "Equal"]
    assert spec("RegexExtract", "mode")[0] == ["First Match", "All Matches", "First Group", "All Groups"]
    assert spec("StringContains", "case_sensitive")[1] == {"default": True, "advanced": True}
    assert spec("RegexMatch", "case_insensitive")[1] == {"default": True, "advanced": True}
    assert spec("RegexMatch", "dotall")[1] == {"default": False, "advanced": True}
    group_index = spec("RegexExtract", "group_index")[1]
    assert (group_index["default"], group_index["min"], group_index["max"], group_index["advanced"]) == (1, 0, 100,
                                                                                                       True)
    count = spec("RegexReplace", "count")[1]
    assert (count["default"], count["min"], count["max"]) == (0, 0, 100) and "replace all" in count["tooltip"]
    indent = spec("ConvertArrayToString", "indent")[1]
    assert (indent["default"], indent["min"], indent["max"]) == (2, 0, 8)
    assert spec("ConvertDictionaryToString", "dictionary") == ["DICT", {}]
    assert spec("StringFormat", "f_string")[1] == {"default": "{a}", "multiline": True}
    assert spec("StringFormat", "values.z") == ["*", {"autogrow": True}]
    assert spec("JsonExtractString", "key")[1] == {"default": ""}  # one line, as ComfyUI's
    assert [spec("StringConcatenate", name)[1] for name in ("string_a", "string_b", "delimiter")] == [
        {"default": "", "multiline": True}, {"default": "", "multiline": True}, {"default": ""}]
    assert [spec("StringReplace", name)[1] for name in ("string", "find", "replace")] == [
        {"default": "", "multiline": True}] * 3
    # the order of an editor file's widgets_values
    assert engine.registry.get("RegexReplace").widget_names() == ["string", "regex_pattern", "replace",
                                                                  "case_insensitive", "multiline", "dotall", "count"]
    assert engine.registry.get("StringFormat").widget_names() == ["f_string"]


# --- Plain text nodes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "end", "expected"), [(1, -1, "bcde"), (0, 3, "abc"), (4, 2, ""), (-3, 0, ""),
                                                        (-2, 100, "ef")])
def test_substring_is_a_python_slice(engine, start, end, expected) -> None:
    assert run_node(engine, "StringSubstring", {"string": "abcdef", "start": start, "end": end}) == expected


def test_length_counts_characters(engine) -> None:
    assert run_node(engine, "StringLength", {"string": "héllo\n"}) == 6


@pytest.mark.parametrize(("a", "b", "delimiter", "expected"), [("one", "two", ", ", "one, two"), ("", "b", "-", "-b"),
                                                              ("x\ny", "z", "", "x\nyz")])
def test_concatenate(engine, a, b, delimiter, expected) -> None:
    inputs = {"string_a": a, "string_b": b, "delimiter": delimiter}
    assert run_node(engine, "StringConcatenate", inputs) == expected == delimiter.join((a, b))


@pytest.mark.parametrize(("string", "find", "replace", "expected"), [
    ("a cat and a hat", "at", "og", "a cog and a hog"),
    ("line one\nline two\n", "\nline", " /", "line one / two\n"),  # a find across lines (multiline widgets)
    ("abc", "", "-", "-a-b-c-"),  # an empty find: Python's (and ComfyUI's) str.replace, between every character
    ("", "", "x", "x"),
    ("abc", "z", "y", "abc"),
])
def test_replace_is_pythons_str_replace(engine, string, find, replace, expected) -> None:
    inputs = {"string": string, "find": find, "replace": replace}
    assert run_node(engine, "StringReplace", inputs) == expected == string.replace(find, replace)


def test_an_older_editor_file_of_the_text_nodes_still_runs(engine) -> None:
    """Widgets kept their order (only their look changed): a file saved before reads the same values."""
    doc = {"nodes": [
        {"id": 1, "type": "StringConcatenate", "mode": 0, "inputs": [],
         "outputs": [{"name": "STRING", "type": "STRING", "links": [1]}], "widgets_values": ["red", "blue", " & "]},
        {"id": 2, "type": "StringReplace", "mode": 0,
         "inputs": [{"name": "string", "type": "STRING", "widget": {"name": "string"}, "link": 1}],
         "outputs": [{"name": "STRING", "type": "STRING", "links": [2]}], "widgets_values": ["", "&", "and"]},
        {"id": 3, "type": "PreviewAny", "mode": 0, "inputs": [{"name": "source", "type": "*", "link": 2}],
         "outputs": [], "widgets_values": []}],
        "links": [[1, 1, 0, 2, 0, "STRING"], [2, 2, 0, 3, 0, "STRING"]]}
    api = ui_to_api(doc, engine.registry)
    assert api["1"]["inputs"] == {"string_a": "red", "string_b": "blue", "delimiter": " & "}
    assert api["2"]["inputs"] == {"string": ["1", 0], "find": "&", "replace": "and"}
    result = engine.run(graph_from_data(doc, engine.registry))
    assert result.ok, result.error
    assert result.outputs["3"] == {"text": ["red and blue"]}


@pytest.mark.parametrize(("mode", "expected"), [("UPPERCASE", "HELLO WORLD IT'S"), ("lowercase", "hello world it's"),
                                                ("Capitalize", "Hello world it's"), ("Title Case", "Hello World It'S")])
def test_case_converter(engine, mode, expected) -> None:
    assert run_node(engine, "CaseConverter", {"string": "hello wORLD it's", "mode": mode}) == expected


@pytest.mark.parametrize(("mode", "expected"), [("Both", "a b"), ("Left", "a b \n"), ("Right", " \t a b")])
def test_trim(engine, mode, expected) -> None:
    assert run_node(engine, "StringTrim", {"string": " \t a b \n", "mode": mode}) == expected


@pytest.mark.parametrize(("substring", "case_sensitive", "expected"), [("ell", True, True), ("ELL", True, False),
                                                                       ("ELL", False, True), ("", True, True),
                                                                       ("hello!", False, False)])
def test_contains(engine, substring, case_sensitive, expected) -> None:
    inputs = {"string": "Hello", "substring": substring, "case_sensitive": case_sensitive}
    assert run_node(engine, "StringContains", inputs) is expected


@pytest.mark.parametrize(("b", "mode", "case_sensitive", "expected"), [
    ("He", "Starts With", True, True), ("he", "Starts With", True, False), ("he", "Starts With", False, True),
    ("LO", "Ends With", False, True), ("LO", "Ends With", True, False), ("lo", "Ends With", True, True),
    ("Hello", "Equal", True, True), ("hello", "Equal", True, False), ("hello", "Equal", False, True),
    ("Hell", "Equal", False, False)])
def test_compare(engine, b, mode, case_sensitive, expected) -> None:
    inputs = {"string_a": "Hello", "string_b": b, "mode": mode, "case_sensitive": case_sensitive}
    assert run_node(engine, "StringCompare", inputs) is expected


def test_a_linked_mode_that_is_none_of_the_choices(engine) -> None:
    # a STRING may feed a combo; ComfyUI leaves the text as it is (an empty text for RegexExtract), and Loom refuses
    # StringCompare's, whose ComfyUI node would give None for a BOOLEAN
    mode = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "Sentence case"}}}
    assert run_node(engine, "CaseConverter", {"string": "aB", "mode": ["1", 0]}, mode) == "aB"
    assert run_node(engine, "StringTrim", {"string": " a ", "mode": ["1", 0]}, mode) == " a "
    assert run_node(engine, "RegexExtract", regex_inputs("a1", r"(\d)", mode=["1", 0], group_index=1), mode) == ""
    message = run_error(engine, "StringCompare", {"string_a": "a", "string_b": "a", "mode": ["1", 0],
                                                  "case_sensitive": True}, mode)
    assert message == "StringCompare: mode 'Sentence case' is not one of Starts With, Ends With, Equal"


# --- Regular expressions --------------------------------------------------------------------------------------


def regex_inputs(string: str, pattern: str, case_insensitive: bool = True, multiline: bool = False,
                 dotall: bool = False, **more: Any) -> dict[str, Any]:
    return {"string": string, "regex_pattern": pattern, "case_insensitive": case_insensitive,
            "multiline": multiline, "dotall": dotall, **more}


@pytest.mark.parametrize(("inputs", "expected"), [
    (regex_inputs("Hello World", "world"), True),
    (regex_inputs("Hello World", "world", case_insensitive=False), False),
    (regex_inputs("a\nb", "^b"), False), (regex_inputs("a\nb", "^b", multiline=True), True),
    (regex_inputs("a\nb", "a.b"), False), (regex_inputs("a\nb", "a.b", dotall=True), True),
    (regex_inputs("x1y", r"\d"), True)])
def test_regex_match_and_its_flags(engine, inputs, expected) -> None:
    assert run_node(engine, "RegexMatch", inputs) is expected


PAIRS = "cat=1, Dog=22, eel=333"


@pytest.mark.parametrize(("pattern", "mode", "group_index", "expected"), [
    (r"(\w+)=(\d+)", "First Match", 1, "cat=1"),
    (r"(\w+)=(\d+)", "All Matches", 1, "cat\nDog\neel"),  # with groups: each match's first group
    (r"=(\d+)", "All Matches", 1, "1\n22\n333"),
    (r"\d+", "All Matches", 1, "1\n22\n333"),
    (r"(\w+)=(\d+)", "First Group", 2, "1"),
    (r"(\w+)=(\d+)", "First Group", 0, "cat=1"),
    (r"(\w+)=(\d+)", "First Group", 3, ""),  # no such group
    (r"(\w+)=(\d+)", "All Groups", 2, "1\n22\n333"),
    (r"(\w+)=(\d+)", "All Groups", 0, "cat=1\nDog=22\neel=333"),
    (r"\d+", "All Groups", 0, ""),  # ComfyUI's All Groups skips matches of a pattern without groups
    (r"\d+", "First Group", 0, "1"),
    (r"(x)?(\d+)", "First Group", 1, ""),  # a group that took no part in the match
    (r"(x)?(\d+)", "All Groups", 2, "1\n22\n333"),
    (r"dog=(\d+)", "First Group", 1, "22"),  # case-insensitive by default
    (r"zzz", "First Match", 1, ""),
])
def test_regex_extract_modes(engine, pattern, mode, group_index, expected) -> None:
    inputs = regex_inputs(PAIRS, pattern, mode=mode, group_index=group_index)
    assert run_node(engine, "RegexExtract", inputs) == expected


def test_regex_extract_flags(engine) -> None:
    inputs = regex_inputs(PAIRS, r"dog=(\d+)", case_insensitive=False, mode="First Group", group_index=1)
    assert run_node(engine, "RegexExtract", inputs) == ""
    lines = "one\ntwo\nthree"
    assert run_node(engine, "RegexExtract", regex_inputs(lines, r"^t\w+$", multiline=True, mode="All Matches",
                                                         group_index=1)) == "two\nthree"
    assert run_node(engine, "RegexExtract", regex_inputs(lines, r"e.t", dotall=True, mode="First Match",
                                                         group_index=1)) == "e\nt"


def test_an_invalid_pattern_gives_comfyuis_value_and_a_warning(engine, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nodes.builtin.strings"):
        assert run_node(engine, "RegexMatch", regex_inputs("a(b", "a(b")) is False
        assert run_node(engine, "RegexExtract", regex_inputs("a(b", "(", mode="First Match", group_index=1)) == ""
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("RegexMatch: 'a(b' is not a regular expression (missing ), unterminated subpattern")
               for m in messages)
    assert any(m.startswith("RegexExtract: '(' is not a regular expression") for m in messages)


@pytest.mark.parametrize(("inputs", "expected"), [
    ({"string": "Cat cat CAT", "regex_pattern": "cat", "replace": "dog"}, "dog dog dog"),
    ({"string": "Cat cat CAT", "regex_pattern": "cat", "replace": "dog", "count": 2}, "dog dog CAT"),
    ({"string": "Cat cat CAT", "regex_pattern": "cat", "replace": "dog", "case_insensitive": False}, "Cat dog CAT"),
    ({"string": "ada@home bob@work", "regex_pattern": r"(\w+)@(?P<where>\w+)", "replace": r"\g<where>:\1"},
     "home:ada work:bob"),
    ({"string": "a\nb\n", "regex_pattern": "^", "replace": "> ", "multiline": True}, "> a\n> b\n> "),
    ({"string": "a\nb", "regex_pattern": "a.b", "replace": "x", "dotall": True}, "x"),
    ({"string": "a\nb", "regex_pattern": "a.b", "replace": "x"}, "a\nb"),
])
def test_regex_replace(engine, inputs, expected) -> None:
    assert run_node(engine, "RegexReplace", inputs) == expected


def test_regex_replace_refuses_a_bad_pattern_or_replacement_naming_the_node(engine) -> None:
    doc = {"9": {"class_type": "RegexReplace", "inputs": {"string": "abc", "regex_pattern": "a(", "replace": "x"}},
           "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}
    with pytest.raises(WorkflowInvalid, match=r"RegexReplace: regex_pattern 'a\(' is not a regular expression"):
        engine.run(parse_api(doc))
    # a pattern from another node is judged as the node runs
    linked = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "[a-"}}}
    message = run_error(engine, "RegexReplace", {"string": "abc", "regex_pattern": ["1", 0], "replace": "x"}, linked)
    assert "RegexReplace: regex_pattern '[a-' with replace 'x': unterminated character set" in message
    message = run_error(engine, "RegexReplace", {"string": "abc", "regex_pattern": "(b)", "replace": r"\2"})
    assert "RegexReplace: regex_pattern '(b)' with replace '\\\\2': invalid group reference 2" in message
    assert message.endswith(r"groups are referred to as \1 or \g<name>, a literal backslash is \\")


# --- JSON -----------------------------------------------------------------------------------------------------


REPLY = ('Sure! Here it is:\n```json\n{"name": "Ada", "n": 3, "ok": true, "ratio": 1.0, "tags": ["a", 1],\n'
         ' "nested": {"x": null}, "none": null, "": "empty key"}\n```\nAnything else?')


@pytest.mark.parametrize(("text", "key", "expected"), [
    (REPLY, "name", "Ada"), (REPLY, "n", "3"), (REPLY, "ok", "True"), (REPLY, "ratio", "1.0"),
    (REPLY, "tags", "['a', 1]"), (REPLY, "nested", "{'x': None}"),  # Python's str() of the value, as ComfyUI
    (REPLY, "none", ""), (REPLY, "missing", ""), (REPLY, "", "empty key"),
    (REPLY, "nested.x", ""),  # a key, not a path
    ('text {not json} then {"a": 1}', "a", "1"),  # an invalid "{" is passed over
    ('{"a": 1} {"b": 2}', "b", ""),  # the first valid object decides
    ('{"x": [{"k": "inner"}], oops}', "k", "inner"),  # the outer one is invalid: the inner one is the first
    ('{"a": NaN}', "a", "nan"),
])
def test_json_extract_reads_the_first_object(engine, text, key, expected) -> None:
    assert run_node(engine, "JsonExtractString", {"json_string": text, "key": key}) == expected


def test_json_extract_without_an_object_gives_an_empty_text_and_a_warning(engine, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="nodes.builtin.strings"):
        assert run_node(engine, "JsonExtractString", {"json_string": "[1, 2] {broken", "key": "a"}) == ""
    assert any("JsonExtractString: no JSON object in the text" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("indent", "expected"), [
    (2, '{\n  "b": [\n    1,\n    2.5\n  ],\n  "a": "é",\n  "c": null\n}'),
    (0, '{"b": [1, 2.5], "a": "é", "c": null}'),
    (1, '{\n "b": [\n  1,\n  2.5\n ],\n "a": "é",\n "c": null\n}'),
])
def test_dictionary_to_string(engine, indent, expected) -> None:
    source = {"1": {"class_type": "JsonDict", "inputs": {"text": '{"b": [1, 2.5], "a": "\\u00e9", "c": null}'}}}
    out = run_node(engine, "ConvertDictionaryToString", {"dictionary": ["1", 0], "indent": indent}, source)
    assert out == expected and json.loads(out) == {"b": [1, 2.5], "a": "é", "c": None}


def test_array_to_string(engine) -> None:
    source = {"1": {"class_type": "JsonArray", "inputs": {"text": '["x", {"k": true}, []]'}}}
    assert run_node(engine, "ConvertArrayToString", {"array": ["1", 0], "indent": 0}, source) == \
        '["x", {"k": true}, []]'
    assert run_node(engine, "ConvertArrayToString", {"array": ["1", 0], "indent": 2}, source) == \
        '[\n  "x",\n  {\n    "k": true\n  },\n  []\n]'


def test_a_value_json_cannot_hold_is_refused_naming_the_node(engine) -> None:
    message = run_error(engine, "ConvertDictionaryToString", {"dictionary": ["1", 0], "indent": 2},
                        {"1": {"class_type": "NotJson", "inputs": {}}})
    assert "ConvertDictionaryToString: the value cannot be written as JSON: Object of type set" in message


# --- StringFormat ---------------------------------------------------------------------------------------------


SOURCES = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "Ada"}},
           "2": {"class_type": "PrimitiveInt", "inputs": {"value": 7}},
           "3": {"class_type": "PrimitiveFloat", "inputs": {"value": 0.5}}}
LINKS = {"values.a": ["1", 0], "values.b": ["2", 0], "values.c": ["3", 0]}


@pytest.mark.parametrize("f_string", ["{a} has {b:03d} cats ({c:.1%}) {{literal}} {a!r}", "{a[1]}{a[2]}",
                                      "{c:>{b}}|{a:^9}|{b:+x}", "{a}{a}", "plain"])
def test_format_is_pythons_str_format(engine, f_string) -> None:
    out = run_node(engine, "StringFormat", {"f_string": f_string, **LINKS}, SOURCES)
    assert out == f_string.format(a="Ada", b=7, c=0.5)


def test_format_takes_any_type_and_constants(engine) -> None:
    out = run_node(engine, "StringFormat", {"f_string": "{a} {b} {z}", "values.a": ["1", 0], "values.b": True,
                                            "values.z": 2.5}, SOURCES)
    assert out == "Ada True 2.5"


@pytest.mark.parametrize(("f_string", "message"), [
    ("{a} and {d}", r"the text names \{d\}, but no value is linked to values.d \(linked: values.a, values.b, "
                    r"values.c\)"),
    ("{}", r"positional fields such as \{\} or \{0\} have no value"),
    ("{a", "expected '}' before end of string"),
    ("{b:s}", "Unknown format code 's' for object of type 'int'"),
    ("{a.__class__}", r"the field \{a.__class__\} reads the attribute '__class__'"),
    ("{a.nothing}", "AttributeError: 'str' object has no attribute 'nothing'"),
    ("{a[9]}", "IndexError: string index out of range"),
    ("{a[x]}", "TypeError: string indices must be integers"),
    ("{a[-1]}", "TypeError: string indices must be integers"),  # as str.format, "-1" is a key, not an index
])
def test_format_errors_name_the_node(engine, f_string, message) -> None:
    with pytest.raises(ValueError, match=message):
        format_text(f_string, {"a": "Ada", "b": 7, "c": 0.5})
    assert "StringFormat: " in run_error(engine, "StringFormat", {"f_string": f_string, **LINKS}, SOURCES)


def test_format_reads_into_a_linked_dictionary(engine) -> None:
    person = {"1": {"class_type": "JsonDict", "inputs": {"text": '{"name": "Ada", "langs": ["en", "fr"]}'}}}
    f_string = "{a[name]} speaks {a[langs][1]} ({a[langs]})"
    out = run_node(engine, "StringFormat", {"f_string": f_string, "values.a": ["1", 0]}, person)
    assert out == f_string.format(a={"name": "Ada", "langs": ["en", "fr"]}) == "Ada speaks fr (['en', 'fr'])"
    with pytest.raises(ValueError, match="^KeyError: 'age'$"):  # a key of the value, not a missing value
        format_text("{a[age]}", {"a": {"name": "Ada"}})


def test_format_default_text_needs_a(engine) -> None:
    message = run_error(engine, "StringFormat", {"f_string": "{a}"})
    assert "StringFormat: the text names {a}, but no value is linked to values.a (linked: none)" in message


def test_format_refuses_an_undeclared_socket(engine) -> None:
    doc = {**SOURCES, "9": {"class_type": "StringFormat", "inputs": {"f_string": "{a}", "values.A": ["1", 0]}},
           "10": {"class_type": "PreviewAny", "inputs": {"source": ["9", 0]}}}
    with pytest.raises(WorkflowInvalid, match=r"StringFormat has no input values.A \(values.a to values.z\)"):
        engine.run(parse_api(doc))


def ui_workflow(f_string: str) -> dict:
    """As ComfyUI's editor saves it: a String into `values.a`, an Int into `values.b`, an empty `values.c` socket; the
    text into a Trim, its result into a PreviewAny."""
    return {
        "last_node_id": 5, "last_link_id": 4,
        "nodes": [
            {"id": 1, "type": "PrimitiveString", "pos": [0, 0], "size": [200, 60], "mode": 0, "inputs": [],
             "outputs": [{"name": "STRING", "type": "STRING", "links": [1]}], "widgets_values": ["Ada"]},
            {"id": 2, "type": "PrimitiveInt", "pos": [0, 100], "size": [200, 60], "mode": 0, "inputs": [],
             "outputs": [{"name": "INT", "type": "INT", "links": [2]}], "widgets_values": [3, "fixed"]},
            {"id": 3, "type": "StringFormat", "pos": [300, 0], "size": [230, 170], "mode": 0,
             "inputs": [{"label": "a", "localized_name": "values.a", "name": "values.a", "type": "*", "link": 1},
                        {"label": "b", "localized_name": "values.b", "name": "values.b", "type": "*", "link": 2},
                        {"label": "c", "localized_name": "values.c", "name": "values.c", "type": "*", "shape": 7,
                         "link": None}],
             "outputs": [{"name": "STRING", "type": "STRING", "links": [3]}], "widgets_values": [f_string]},
            {"id": 4, "type": "StringTrim", "pos": [600, 0], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "string", "type": "STRING", "widget": {"name": "string"}, "link": 3}],
             "outputs": [{"name": "STRING", "type": "STRING", "links": [4]}], "widgets_values": ["", "Both"]},
            {"id": 5, "type": "PreviewAny", "pos": [900, 0], "size": [200, 100], "mode": 0,
             "inputs": [{"name": "source", "type": "*", "link": 4}], "outputs": [], "widgets_values": []},
        ],
        "links": [[1, 1, 0, 3, 0, "STRING"], [2, 2, 0, 3, 1, "INT"], [3, 3, 0, 4, 0, "STRING"],
                  [4, 4, 0, 5, 0, "STRING"]],
    }


def test_ui_format_workflow_links_values_by_name_and_runs(engine) -> None:
    api = ui_to_api(ui_workflow("  {a} x{b}  "), engine.registry)
    assert api["3"]["inputs"] == {"f_string": "  {a} x{b}  ", "values.a": ["1", 0], "values.b": ["2", 0]}
    assert api["4"]["inputs"] == {"string": ["3", 0], "mode": "Both"}
    result = engine.run(graph_from_data(ui_workflow("  {a} x{b}  "), engine.registry), keep=["3", "4"])
    assert result.ok, result.error
    assert result.values["3"] == ("  Ada x3  ",) and result.values["4"] == ("Ada x3",)
    assert result.outputs["5"] == {"text": ["Ada x3"]}
