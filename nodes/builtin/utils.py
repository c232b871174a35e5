"""Small math and string nodes, and a node that shows any value: enough to use the engine without models."""

from __future__ import annotations

import math
import random
from typing import Any

from nodes.node import Node, NodeResult
from nodes.spec import ANY_TYPE, Boolean, Combo, Float, Int, Output, Socket, String

_INT_OPS = {
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "floor_divide": lambda a, b: a // b,
    "modulo": lambda a, b: a % b,
    "power": lambda a, b: a**b,
    "min": min,
    "max": max,
}
_FLOAT_OPS = {
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "divide": lambda a, b: a / b,
    "power": math.pow,
    "min": min,
    "max": max,
}


class IntMath(Node):
    """Applies an arithmetic operation to two integers."""

    display_name = "Int Math"
    category = "utils/math"
    a = Int(0)
    b = Int(0)
    operation = Combo(list(_INT_OPS))
    outputs = (Output("INT"),)

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        if inputs.get("operation") in ("floor_divide", "modulo") and inputs.get("b") == 0:
            return "b must not be 0 for division"
        return None

    def execute(self, a: int, b: int, operation: str) -> tuple[int]:
        if operation == "power" and abs(b) > 4096:
            raise ValueError(f"exponent {b} is too large (at most 4096)")
        return (int(_INT_OPS[operation](a, b)),)


class FloatMath(Node):
    """Applies an arithmetic operation to two floats."""

    display_name = "Float Math"
    category = "utils/math"
    a = Float(0.0)
    b = Float(0.0)
    operation = Combo(list(_FLOAT_OPS))
    outputs = (Output("FLOAT"),)

    def execute(self, a: float, b: float, operation: str) -> tuple[float]:
        return (float(_FLOAT_OPS[operation](a, b)),)


class IntToFloat(Node):
    display_name = "Int to Float"
    category = "utils/math"
    value = Int(0)
    outputs = (Output("FLOAT"),)

    def execute(self, value: int) -> tuple[float]:
        return (float(value),)


class RandomInt(Node):
    """A fresh random integer on every run (never cached)."""

    display_name = "Random Int"
    category = "utils/math"
    cacheable = False
    low = Int(0)
    high = Int(100)
    outputs = (Output("INT"),)

    def execute(self, low: int, high: int) -> tuple[int]:
        return (random.randint(min(low, high), max(low, high)),)


class GlobalSeedNode(Node):
    """Its seed goes to the `seed` input of the other nodes before the workflow runs (every node's, or those
    linked to it; those at 0, or all: `graph.document.Graph.with_global_seeds`), and out of it. Never cached."""

    display_name = "Global Seed"
    category = "utils/seed"
    cacheable = False
    seed = Int(0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Master seed value supplied to all reachable nodes.",
               extra={"control_after_generate": "fixed"})
    mode = Combo(["placeholders only", "overwrite all"], tooltip="'placeholders only' only touches nodes whose seed "
                 "is 0. 'overwrite all' replaces every static seed in scope.")
    # `global` is a Python keyword: declared by name below.
    outputs = (Output("INT", "seed"),)

    def execute(self, seed: int, mode: str, **inputs: Any) -> tuple[int]:
        return (seed,)


GlobalSeedNode.inputs = {**GlobalSeedNode.inputs, "global": Boolean(
    True, tooltip="When global, all seed inputs in the workflow are set to this value. When local, only nodes "
    "connected to this node are affected.", extra={"label_on": "global", "label_off": "local"})}


class StringConcatenate(Node):
    display_name = "Concatenate Text"
    category = "text"
    string_a = String("", multiline=True)
    string_b = String("", multiline=True)
    delimiter = String("")
    outputs = (Output("STRING"),)

    def execute(self, string_a: str, string_b: str, delimiter: str) -> tuple[str]:
        return (f"{string_a}{delimiter}{string_b}",)


class StringReplace(Node):
    display_name = "Replace Text"
    category = "text"
    string = String("", multiline=True)
    find = String("", multiline=True)
    replace = String("", multiline=True)
    outputs = (Output("STRING"),)

    def execute(self, string: str, find: str, replace: str) -> tuple[str]:
        # Python's str.replace, as ComfyUI's: an empty `find` puts `replace` before, between and after every character.
        return (string.replace(find, replace),)


class PreviewAny(Node):
    """Shows any value as text in the editor (and in the CLI's output)."""

    display_name = "Preview Any"
    category = "utils"
    output_node = True
    source = Socket(ANY_TYPE)

    def execute(self, source: Any) -> NodeResult:
        return NodeResult(ui={"text": [str(source)]})


NODES = [IntMath, FloatMath, IntToFloat, RandomInt, GlobalSeedNode, StringConcatenate, StringReplace, PreviewAny]
