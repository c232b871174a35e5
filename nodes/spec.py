"""Typed declarations of node inputs and outputs, and the `/object_info` schema they produce."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
ANY_TYPE = "*"

# ComfyUI's KSampler advertises seeds up to 2**64 - 1; keep that range for compatibility.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1


class InputSpec(BaseModel):
    """One input of a node type: a socket (linked only) or a widget (constant or linked)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    type: str
    optional: bool = False
    default: Any = None
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    round: float | bool | None = None
    multiline: bool = False
    tooltip: str | None = None
    choices: tuple[Any, ...] | None = None
    choices_fn: Callable[[], Sequence[Any]] | None = Field(default=None, exclude=True)
    # Where dynamic choices come from (e.g. the folders searched), for the error of a value not among them.
    choices_where: Callable[[], str] | None = Field(default=None, exclude=True)
    control_after_generate: bool = False
    image_upload: bool = False
    force_input: bool = False
    hidden: bool = False
    # The node's own `check_inputs` judges this value; the built-in type, range and choice checks
    # are skipped (ComfyUI does so for inputs its VALIDATE_INPUTS names).
    checked_by_node: bool = False
    # ComfyUI's lazy inputs: the source runs only when the node's `check_lazy_status` asks for the value.
    lazy: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input

    def current_choices(self) -> list[Any]:
        """Choices of a combo; dynamic ones (files in a folder) are listed afresh each call."""
        if self.choices_fn is not None:
            return list(self.choices_fn())
        return list(self.choices or ())

    def object_info(self) -> list[Any]:
        """The `["TYPE", {options}]` pair of REFERENCE.md section 4."""
        opts: dict[str, Any] = {}
        for key in ("default", "min", "max", "step", "round", "tooltip"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.multiline:
            opts["multiline"] = True
        if self.control_after_generate:
            opts["control_after_generate"] = True
        if self.image_upload:
            opts["image_upload"] = True
        if self.force_input:
            opts["forceInput"] = True
        if self.lazy:
            opts["lazy"] = True
        opts.update(self.extra)
        if self.type == "COMBO":
            return [self.current_choices(), opts]
        return [self.type, opts]


class OutputSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: str
    name: str | None = None
    is_list: bool = False
    tooltip: str | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.type


# Declaration helpers: `seed = Int(0, min=0, max=INT_MAX, control_after_generate=True)`.


def Int(default: int = 0, *, min: int = INT_MIN, max: int = INT_MAX, step: int = 1, **kw: Any) -> InputSpec:
    return InputSpec(type="INT", default=default, min=min, max=max, step=step, **kw)


def Float(
    default: float = 0.0, *, min: float = -1e18, max: float = 1e18, step: float = 0.01, **kw: Any
) -> InputSpec:
    return InputSpec(type="FLOAT", default=default, min=min, max=max, step=step, **kw)


def String(default: str = "", *, multiline: bool = False, **kw: Any) -> InputSpec:
    return InputSpec(type="STRING", default=default, multiline=multiline, **kw)


def Boolean(default: bool = False, **kw: Any) -> InputSpec:
    return InputSpec(type="BOOLEAN", default=default, **kw)


def Combo(choices: Sequence[Any] | Callable[[], Sequence[Any]], *, default: Any = None, **kw: Any) -> InputSpec:
    if callable(choices):
        return InputSpec(type="COMBO", choices_fn=choices, default=default, **kw)
    choices = tuple(choices)
    return InputSpec(type="COMBO", choices=choices, default=choices[0] if default is None and choices else default,
                     **kw)


def Socket(type_name: str, **kw: Any) -> InputSpec:
    """An input that is always linked; a widget type (e.g. INT) declared as a socket shows no widget."""
    if type_name in WIDGET_TYPES:
        kw.setdefault("force_input", True)
    return InputSpec(type=type_name, **kw)


def Output(type_name: str, name: str | None = None, **kw: Any) -> OutputSpec:
    return OutputSpec(type=type_name, name=name, **kw)
