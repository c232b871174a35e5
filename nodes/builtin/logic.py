"""Control flow: ComfyUI's Switch, which runs only the branch it passes on (a lazy input on each side)."""

from __future__ import annotations

from typing import Any

from nodes.node import Node
from nodes.spec import ANY_TYPE, Boolean, Output, Socket


class ComfySwitchNode(Node):
    """Passes `on_true` on when `switch` is on and `on_false` when it is off; only that side's nodes run."""

    display_name = "Switch"
    category = "logic"
    switch = Boolean(False)
    # Optional, as in ComfyUI's newer declaration: the side not taken may be left unconnected.
    on_false = Socket(ANY_TYPE, optional=True, lazy=True)
    on_true = Socket(ANY_TYPE, optional=True, lazy=True)
    outputs = (Output(ANY_TYPE, "output"),)

    def check_lazy_status(self, switch: bool, **inputs: Any) -> list[str]:
        side = "on_true" if switch else "on_false"
        return [side] if side in inputs and inputs[side] is None else []

    def execute(self, switch: bool, **inputs: Any) -> tuple[Any]:
        side = "on_true" if switch else "on_false"
        if side not in inputs:
            raise ValueError(f"the switch is {'on' if switch else 'off'}, so it passes on {side}, "
                             f"but nothing is connected to {side}")
        return (inputs[side],)


NODES = [ComfySwitchNode]
