"""Constant values as nodes, so one value can drive several inputs."""

from __future__ import annotations

from nodes.node import Node
from nodes.spec import Boolean, Float, Int, Output, String


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


NODES = [PrimitiveInt, PrimitiveFloat, PrimitiveString, PrimitiveStringMultiline, PrimitiveBoolean]
