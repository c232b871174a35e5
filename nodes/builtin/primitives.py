"""Constant values as nodes, so one value can drive several inputs."""

from __future__ import annotations

import re
from typing import Any

from nodes.node import Node
from nodes.spec import Boolean, Combo, Float, Int, Output, String


class PrimitiveInt(Node):
    display_name = "Int"
    category = "utils/primitive"
    value = Int(0)
    outputs = (Output("INT"),)

    def execute(self, value: int) -> tuple[int]:
        return (value,)


class PrimitiveFloat(Node):
    display_name = "Float"
    category = "utils/primitive"
    value = Float(0.0)
    outputs = (Output("FLOAT"),)

    def execute(self, value: float) -> tuple[float]:
        return (value,)


class PrimitiveString(Node):
    display_name = "String"
    category = "utils/primitive"
    value = String("")
    outputs = (Output("STRING"),)

    def execute(self, value: str) -> tuple[str]:
        return (value,)


class PrimitiveStringMultiline(Node):
    display_name = "String (Multiline)"
    category = "utils/primitive"
    value = String("", multiline=True)
    outputs = (Output("STRING"),)

    def execute(self, value: str) -> tuple[str]:
        return (value,)


class PrimitiveBoolean(Node):
    display_name = "Boolean"
    category = "utils/primitive"
    value = Boolean(False)
    outputs = (Output("BOOLEAN"),)

    def execute(self, value: bool) -> tuple[bool]:
        return (value,)


_OPTION = re.compile(r"option(\d+)")


def _options(inputs: dict[str, Any]) -> dict[str, Any]:
    """CustomCombo's option inputs (option1, option2, ...) in their order."""
    named = {name: value for name, value in inputs.items() if _OPTION.fullmatch(name)}
    return dict(sorted(named.items(), key=lambda item: int(item[0][len("option"):])))


class CustomCombo(Node):
    """A dropdown whose options the user types in the editor: ComfyUI's editor adds a text widget per option
    (option1, option2, ... and an empty one to type the next in) and a hidden `index`, all sent as inputs the node
    does not declare. Outputs the chosen option and its position among the option widgets."""

    display_name = "Custom Combo"
    category = "utils"
    accept_all_inputs = True
    choice = Combo([], checked_by_node=True, tooltip="one of the options typed in the node's option widgets")
    outputs = (Output("STRING", "STRING"), Output("INT", "INDEX"))

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any]:
        # ComfyUI's editor stores [choice, index, option1, option2, ...]; its first versions had no index.
        if not values:
            return {}
        rest = values[1:]
        index = {}
        if rest and isinstance(rest[0], int) and not isinstance(rest[0], bool):
            index, rest = {"index": rest[0]}, rest[1:]
        return {"choice": values[0], **index, **{f"option{i}": value for i, value in enumerate(rest, 1)}}

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        """A choice not among the options is refused before the run (where the choice and options are constants:
        a linked one is checked as the node runs)."""
        if "choice" not in inputs or any(_OPTION.fullmatch(name) for name in linked):
            return None
        return _choice_refusal(inputs["choice"], _options(inputs))

    def execute(self, choice: str, **inputs: Any) -> tuple[str, int]:
        options = _options(inputs)
        refusal = _choice_refusal(choice, options)
        if refusal:
            raise ValueError(refusal)
        return choice, list(options.values()).index(choice) if options else int(inputs.get("index", 0))


def _choice_refusal(choice: Any, options: dict[str, Any]) -> str | None:
    """Why `choice` is not one of the typed options; None where it is, or where the node has no option inputs (an
    API prompt that gives the choice alone, which ComfyUI takes as it is)."""
    if not options:
        return None
    if choice in options.values():
        return None
    typed = ", ".join(f"{name}={value!r}" for name, value in options.items() if value != "")
    return (f"choice: {choice!r} is not one of the options typed in the node ({typed or 'none typed yet'}); "
            "choose one of them, or type it as an option")


NODES = [PrimitiveInt, PrimitiveFloat, PrimitiveString, PrimitiveStringMultiline, PrimitiveBoolean, CustomCombo]
