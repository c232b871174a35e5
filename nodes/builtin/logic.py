"""Control flow and logic (ComfyUI's comfy_extras/nodes_logic.py): the Switch, which runs only the branch it passes
on (a lazy input on each side); Not, And and Or over any values by Python's truthiness; and Pass or None.

And and Or take ComfyUI's autogrow group `values`: sockets `values.value0` (required) to `values.value9`, any type,
the editor showing the next one as one is linked. Pass or None's inputs and output take any type (ComfyUI's
"match type": the output has the type of what is linked, which Loom's editor and validation take as any).
"""

from __future__ import annotations

from typing import Any

from nodes.node import Node
from nodes.spec import ANY_TYPE, Boolean, Output, Socket


class ComfySwitchNode(Node):
    """Passes `on_true` on when `switch` is on and `on_false` when it is off; only that side's nodes run. A side
    taken that is left unconnected passes on None, as ComfyUI's does (for a Pass or None node after it)."""

    display_name = "If/Else Switch"
    category = "utilities/logic"
    switch = Boolean(False)
    # Optional, as in ComfyUI's newer declaration: either side may be left unconnected.
    on_false = Socket(ANY_TYPE, optional=True, lazy=True)
    on_true = Socket(ANY_TYPE, optional=True, lazy=True)
    outputs = (Output(ANY_TYPE, "output"),)

    def check_lazy_status(self, switch: bool, **inputs: Any) -> list[str]:
        side = "on_true" if switch else "on_false"
        return [side] if side in inputs and inputs[side] is None else []

    def execute(self, switch: bool, **inputs: Any) -> tuple[Any]:
        return (inputs.get("on_true" if switch else "on_false"),)


def truth(node: str, name: str, value: Any) -> bool:
    """Python's truthiness of `value`; a value without one (a tensor of several elements) is a ValueError naming the
    node and input."""
    try:
        return bool(value)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{node}: {name} ({type(value).__name__}) is neither true nor false: {e}; link a BOOLEAN, a "
                         "number, a text, or a value holding a single element") from None


class ComfyNotNode(Node):
    """Logical NOT operation. Returns true if the value is falsy. Uses Python's rules for truthiness."""

    display_name = "Not"
    category = "utilities/logic"
    value = Socket(ANY_TYPE)
    outputs = (Output("BOOLEAN"),)

    def execute(self, value: Any) -> tuple[bool]:
        return (not truth("ComfyNotNode", "value", value),)


VALUES_PREFIX = "values.value"
VALUES_MAX = 10  # ComfyUI's autogrow prefix template: value0 .. value9, at least one


def _value_slot(name: str) -> int:
    return int(name.removeprefix(VALUES_PREFIX))


class _Combine(Node):
    """And / Or over the linked values, in slot order (stopping at the first that decides, as Python's all / any)."""

    category = "utilities/logic"
    inputs = {f"{VALUES_PREFIX}{slot}": Socket(ANY_TYPE, optional=slot >= 1,
                                               extra={"autogrow": True} if slot >= 1 else {})
              for slot in range(VALUES_MAX)}
    outputs = (Output("BOOLEAN"),)
    combine: Any = all

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        # execute takes the sockets as **values, so the engine's own check for undeclared inputs lets them through
        unknown = sorted(name for name in {*inputs, *linked} if name not in cls.inputs)
        return (f"{cls.name} has no input {', '.join(unknown)} ({VALUES_PREFIX}0 to {VALUES_PREFIX}{VALUES_MAX - 1})"
                if unknown else None)

    def execute(self, **values: Any) -> tuple[bool]:
        ordered = sorted(values, key=_value_slot)
        return (type(self).combine(truth(self.name, name, values[name]) for name in ordered),)


class ComfyAndNode(_Combine):
    """Logical AND operation. Returns true if all of the values are truthy. Uses Python's rules for truthiness."""

    display_name = "And"
    combine = all


class ComfyOrNode(_Combine):
    """Logical OR operation. Returns true if any of the values are truthy. Uses Python's rules for truthiness."""

    display_name = "Or"
    combine = any


PASS_OR_NONE = ("Passes the input through, or a default value when input is None/not provided, or outputs None when "
                "both inputs are None/not provided.")


class ComfyPassOrNoneNode(Node):
    display_name = "Pass or None"
    description = PASS_OR_NONE
    category = "utilities/logic"
    anything = Socket(ANY_TYPE, optional=True, tooltip=PASS_OR_NONE)
    default = Socket(ANY_TYPE, optional=True, tooltip="Optional fallback value to use when the input is None/not "
                                                      "provided.")
    outputs = (Output(ANY_TYPE, "output"), Output("BOOLEAN", "is_none"))

    def execute(self, anything: Any = None, default: Any = None) -> tuple[Any, bool]:
        if anything is None:
            return default, default is None
        return anything, False


NODES = [ComfySwitchNode, ComfyNotNode, ComfyAndNode, ComfyOrNode, ComfyPassOrNoneNode]
