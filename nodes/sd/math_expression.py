"""ComfyUI's ComfyMathExpression ("Math Expression"): a formula over up to 26 linked numbers, given as a float, an
integer and a boolean (the LTX-2 templates work out lengths and sizes with it: "a * b", "a/2", "a * b + 1").

Inputs: `expression` (text, default "a + b") and ComfyUI's autogrow group `values`, whose sockets are `values.a` to
`values.z`, each taking a FLOAT, an INT or a BOOLEAN, all optional (the editor shows the next one as one is linked).
API prompts and editor files name the links `values.a`, `values.b`, ...; an editor file's `widgets_values` holds the
expression alone. The expression sees each linked value under its letter, and all of them, in letter order, as the
list `values`; a letter not linked is an unknown name.

Evaluation. ComfyUI evaluates the text as a Python expression with simpleeval; Loom parses it with `ast` and walks
it with a whitelist, no other dependency: numbers and True / False, the names above, `+ - * / // % **` and the bit
operators `& | ^ << >> ~`, unary `- + not`, comparisons (chained, `in` / `not in` on `values`), `and` / `or`,
`x if c else y`, indexing and slicing `values`, and calls of the functions ComfyUI offers, positional or by keyword:
sum (of a list or of its arguments), min, max, abs, round, pow, sqrt, ceil, floor, log, log2, log10, sin, cos, tan,
int, float. As in simpleeval, `**` refuses exponents above 4,000,000 and `<<` shifts above 10,000; ComfyUI's `pow`
refuses exponents above 4,000 in magnitude. Anything else (attributes, strings, lambdas, lists, other functions) is
refused with what it was.

Outputs (current ComfyUI, FLOAT / INT / BOOL; its first version had FLOAT and INT, the same two first): the result
must be a number (a boolean counts, True being 1) and finite as a float. FLOAT is float(result), INT is int(result),
truncated toward zero (2.9 -> 2, -2.9 -> -2, as Python's int()), BOOL is bool(result) (True unless 0).
"""

from __future__ import annotations

import ast
import math
import operator
import string
from collections.abc import Callable
from typing import Any

from nodes.node import Node
from nodes.spec import Output, Socket, String

LETTERS = string.ascii_lowercase
PREFIX = "values."
MAX_POWER = 4_000_000  # simpleeval's cap on the exponent of **
MAX_POW_EXPONENT = 4000  # ComfyUI's cap on the exponent of pow()
MAX_SHIFT = 10_000  # simpleeval's cap on <<


class MathExpressionError(ValueError):
    """An expression that cannot be evaluated, or whose result is not a finite number."""


def _sum(*args: Any) -> Any:
    """sum(values) and sum(a, b, c) alike."""
    if len(args) == 1 and isinstance(args[0], list):
        return sum(args[0])
    return sum(args)


def _pow(base: Any, exponent: Any) -> Any:
    if abs(exponent) > MAX_POW_EXPONENT:
        raise MathExpressionError(f"pow: exponent {exponent} exceeds the {MAX_POW_EXPONENT} allowed")
    return pow(base, exponent)


def _power(base: Any, exponent: Any) -> Any:
    if abs(exponent) > MAX_POWER:
        raise MathExpressionError(f"**: exponent {exponent} exceeds the {MAX_POWER} allowed")
    return base**exponent


def _lshift(value: Any, shift: Any) -> Any:
    if shift > MAX_SHIFT:
        raise MathExpressionError(f"<<: shift {shift} exceeds the {MAX_SHIFT} allowed")
    return value << shift


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sum": _sum, "min": min, "max": max, "abs": abs, "round": round, "pow": _pow, "sqrt": math.sqrt,
    "ceil": math.ceil, "floor": math.floor, "log": math.log, "log2": math.log2, "log10": math.log10, "sin": math.sin,
    "cos": math.cos, "tan": math.tan, "int": int, "float": float,
}
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power, ast.BitAnd: operator.and_,
    ast.BitOr: operator.or_, ast.BitXor: operator.xor, ast.LShift: _lshift, ast.RShift: operator.rshift,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}


class _Evaluator:
    """Walks a parsed expression over `names`, allowing only what the module docstring lists."""

    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names

    def __call__(self, node: ast.AST) -> Any:
        method = getattr(self, f"_{type(node).__name__.lower()}", None)
        if method is None:
            raise MathExpressionError(f"{_what(node)} is not allowed")
        return method(node)

    def _constant(self, node: ast.Constant) -> Any:
        if isinstance(node.value, bool | int | float):
            return node.value
        raise MathExpressionError(f"the constant {node.value!r} is not a number")

    def _name(self, node: ast.Name) -> Any:
        if node.id in self.names:
            return self.names[node.id]
        if node.id in FUNCTIONS:
            raise MathExpressionError(f"{node.id} is a function: call it, as {node.id}(...)")
        known = ", ".join(self.names) or "none"
        raise MathExpressionError(f"unknown name {node.id!r} (the names are those of the linked values and "
                                  f"`values`: {known})")

    def _binop(self, node: ast.BinOp) -> Any:
        function = _BINARY.get(type(node.op))
        if function is None:
            raise MathExpressionError(f"the operator {type(node.op).__name__} is not allowed")
        return function(self(node.left), self(node.right))

    def _unaryop(self, node: ast.UnaryOp) -> Any:
        return _UNARY[type(node.op)](self(node.operand))

    def _boolop(self, node: ast.BoolOp) -> Any:
        value = self(node.values[0])
        for item in node.values[1:]:
            if bool(value) == isinstance(node.op, ast.Or):
                return value
            value = self(item)
        return value

    def _compare(self, node: ast.Compare) -> Any:
        left = self(node.left)
        for op, item in zip(node.ops, node.comparators, strict=True):
            function = _COMPARE.get(type(op))
            if function is None:
                raise MathExpressionError(f"the comparison {type(op).__name__} is not allowed")
            right = self(item)
            if not function(left, right):
                return False
            left = right
        return True

    def _ifexp(self, node: ast.IfExp) -> Any:
        return self(node.body) if self(node.test) else self(node.orelse)

    def _subscript(self, node: ast.Subscript) -> Any:
        return self(node.value)[self(node.slice)]

    def _slice(self, node: ast.Slice) -> slice:
        return slice(*(None if part is None else self(part) for part in (node.lower, node.upper, node.step)))

    def _call(self, node: ast.Call) -> Any:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            called = name or _what(node.func)
            raise MathExpressionError(f"unknown function {called!r} (the functions are {', '.join(FUNCTIONS)})")
        if any(isinstance(arg, ast.Starred) for arg in node.args) or any(k.arg is None for k in node.keywords):
            raise MathExpressionError("* and ** in a call are not allowed")
        args = [self(arg) for arg in node.args]
        return FUNCTIONS[name](*args, **{k.arg: self(k.value) for k in node.keywords})


def _what(node: ast.AST) -> str:
    """What a node of the expression is, for an error."""
    try:
        return f"{type(node).__name__} `{ast.unparse(node)}`"
    except (AttributeError, ValueError):  # ast.unparse fails on some nodes standing alone (slices, operators)
        return type(node).__name__


def evaluate(expression: str, values: dict[str, Any]) -> Any:
    """The value of `expression` with `values` (letter -> number) and the list of them as `values`; a
    MathExpressionError saying what is wrong otherwise."""
    if not expression.strip():
        raise MathExpressionError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise MathExpressionError(f"not a valid expression: {e.msg}") from None
    names = {**values, "values": list(values.values())}
    try:
        return _Evaluator(names)(tree.body)
    except MathExpressionError:
        raise
    except (ArithmeticError, TypeError, ValueError, IndexError) as e:
        raise MathExpressionError(f"{type(e).__name__}: {e}") from None


def math_outputs(expression: str, values: dict[str, Any]) -> tuple[float, int, bool]:
    """ComfyMathExpression's (FLOAT, INT, BOOL) for `expression` over `values` (see the module docstring)."""
    result = evaluate(expression, values)
    if not isinstance(result, int | float):
        raise MathExpressionError(f"the result must be a number, got {type(result).__name__}: {result!r}")
    try:
        as_float = float(result)
    except OverflowError:
        raise MathExpressionError(f"the result is too large for a float: {result}") from None
    if not math.isfinite(as_float):
        raise MathExpressionError(f"the result is not finite: {result}")
    return as_float, int(result), bool(result)


class ComfyMathExpression(Node):
    """Evaluates a formula over the linked values a, b, ... (see the module docstring); the result as a float, an
    integer (truncated) and a boolean."""

    display_name = "Math Expression"
    category = "utilities"
    inputs = {"expression": String("a + b", multiline=True, tooltip="a Python-style formula over a, b, ... and "
                                   f"`values`; functions: {', '.join(FUNCTIONS)}"),
              **{f"{PREFIX}{letter}": Socket("FLOAT,INT,BOOLEAN", optional=True, extra={"autogrow": True},
                                             tooltip=f"the value `{letter}` stands for")
                 for letter in LETTERS}}
    outputs = (Output("FLOAT"), Output("INT"), Output("BOOLEAN", "BOOL"))

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        # execute takes the sockets as **values, so the engine's own check for undeclared inputs lets them through
        unknown = sorted(name for name in {*inputs, *linked} if name not in cls.inputs)
        return f"ComfyMathExpression has no input {', '.join(unknown)} (values.a to values.z)" if unknown else None

    def execute(self, expression: str, **values: Any) -> tuple[float, int, bool]:
        named = {name.removeprefix(PREFIX): values[name] for name in sorted(values) if values[name] is not None}
        try:
            return math_outputs(expression, named)
        except MathExpressionError as e:
            raise MathExpressionError(f"Math Expression {expression!r}: {e}") from None


NODES = [ComfyMathExpression]
