"""Small node types used by the engine tests: counting calls, failing, slow with progress, file-backed."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from nodes.node import Node, NodeResult
from nodes.registry import NodeRegistry, builtin_registry
from nodes.spec import ANY_TYPE, Float, Int, Output, Socket, String

CALLS: Counter[str] = Counter()


class Add(Node):
    a = Int(0, min=-1000, max=1000)
    b = Int(0, min=-1000, max=1000, optional=True)
    outputs = (Output("INT", "sum"),)

    def execute(self, a: int, b: int = 0) -> tuple[int]:
        CALLS["Add"] += 1
        return (a + b,)


class Scale(Node):
    value = Socket("INT")
    factor = Float(1.0, min=0.0, max=10.0)
    outputs = (Output("FLOAT"),)

    def execute(self, value: int, factor: float) -> tuple[float]:
        CALLS["Scale"] += 1
        return (value * factor,)


class Sink(Node):
    output_node = True
    value = Socket(ANY_TYPE)

    def execute(self, value: Any) -> NodeResult:
        CALLS["Sink"] += 1
        return NodeResult(ui={"value": [value]})


class Fail(Node):
    value = Socket("INT")
    outputs = (Output("INT"),)

    def execute(self, value: int) -> tuple[int]:
        raise RuntimeError("this node always fails")


class Slow(Node):
    """Counts to `steps`, reporting progress (and so checking for interrupts) on each step."""

    value = Socket("INT")
    steps = Int(10, min=1, max=100000)
    outputs = (Output("INT"),)
    started = threading.Event()

    def execute(self, value: int, steps: int) -> tuple[int]:
        Slow.started.set()
        for i in range(steps):
            self.ctx.progress(i + 1, steps)
            threading.Event().wait(0.001)
        CALLS["Slow"] += 1
        return (value,)


class ReadFile(Node):
    path = String("")
    outputs = (Output("STRING"),)

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        p = Path(inputs.get("path", ""))
        return p.stat().st_mtime_ns if p.is_file() else None

    def execute(self, path: str) -> tuple[str]:
        CALLS["ReadFile"] += 1
        return (Path(path).read_text(),)


class TwoOut(Node):
    outputs = (Output("INT", "a"), Output("STRING", "b"))

    def execute(self) -> tuple[int, str]:
        return (1, "one")


class WrongArity(Node):
    outputs = (Output("INT"), Output("INT"))

    def execute(self) -> tuple[int]:
        return (1,)


TEST_NODES = [Add, Scale, Sink, Fail, Slow, ReadFile, TwoOut, WrongArity]


def test_registry() -> NodeRegistry:
    registry = builtin_registry()
    registry.register_all(TEST_NODES, "tests")
    return registry


test_registry.__test__ = False  # type: ignore[attr-defined]
