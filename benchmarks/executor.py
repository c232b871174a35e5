"""Engine overhead on synthetic graphs of trivial nodes: validation, cold run, fully cached re-run.

    python -m benchmarks.executor

Prints a table for 250, 1,000 and 2,000 nodes; the last line is one JSON object with the
2,000-node figures.
"""

from __future__ import annotations

import json
import time
from typing import Any

from executor.executor import Executor
from graph.document import parse_api
from graph.validate import validate
from nodes.registry import builtin_registry


def chain(n: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"0": {"class_type": "PrimitiveInt", "inputs": {"value": 0}}}
    for i in range(1, n - 1):
        doc[str(i)] = {"class_type": "IntMath", "inputs": {"a": [str(i - 1), 0], "b": 1, "operation": "add"}}
    doc["out"] = {"class_type": "PreviewAny", "inputs": {"source": [str(n - 2), 0]}}
    return doc


def diamond(n: int) -> dict[str, Any]:
    """One source fanned out to n/2 parallel nodes, folded back in by n/2 reducing nodes."""
    width = (n - 2) // 2
    doc: dict[str, Any] = {"src": {"class_type": "PrimitiveInt", "inputs": {"value": 1}}}
    for i in range(width):
        doc[f"m{i}"] = {"class_type": "IntMath", "inputs": {"a": ["src", 0], "b": i, "operation": "add"}}
    doc["r0"] = {"class_type": "IntMath", "inputs": {"a": ["m0", 0], "b": 0, "operation": "add"}}
    for i in range(1, width):
        doc[f"r{i}"] = {"class_type": "IntMath", "inputs": {"a": [f"r{i - 1}", 0], "b": [f"m{i}", 0],
                                                           "operation": "add"}}
    doc["out"] = {"class_type": "PreviewAny", "inputs": {"source": [f"r{width - 1}", 0]}}
    return doc


def best_of(repeat: int, fn: Any) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def measure(doc: dict[str, Any], registry: Any) -> dict[str, float]:
    validate_s = best_of(5, lambda: validate(parse_api(doc), registry))
    cold = []
    for _ in range(3):
        executor = Executor(registry)
        checked = validate(parse_api(doc), registry)
        began = time.perf_counter()
        result = executor.run(checked)
        cold.append(time.perf_counter() - began)
        assert result.ok and len(result.executed) == len(doc)
    # A client's re-run parses and validates again, then finds everything cached.
    cached_s = best_of(5, lambda: executor.run(validate(parse_api(doc), registry)))
    return {"validate_s": validate_s, "cold_s": min(cold), "cached_s": cached_s,
            "per_node_ms": 1000 * min(cold) / len(doc)}


def main() -> None:
    registry = builtin_registry()
    final: dict[str, float] = {}
    print(f"{'graph':>8} {'nodes':>6} {'validate s':>11} {'cold s':>8} {'cached s':>9} {'ms/node':>8}")
    for n in (250, 1000, 2000):
        for name, build in (("chain", chain), ("diamond", diamond)):
            doc = build(n)
            m = measure(doc, registry)
            print(f"{name:>8} {len(doc):>6} {m['validate_s']:>11.4f} {m['cold_s']:>8.4f} {m['cached_s']:>9.4f} "
                  f"{m['per_node_ms']:>8.4f}")
            if n == 2000:
                for key in ("validate_s", "cold_s", "cached_s"):
                    final[f"{name}_{key}"] = round(m[key], 4)
                final["per_node_ms"] = round(max(final.get("per_node_ms", 0.0), m["per_node_ms"]), 4)
    print(json.dumps(final))


if __name__ == "__main__":
    main()
