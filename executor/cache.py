"""Cache keys (a pure, process-stable function of a node and its inputs' keys) and the output cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


def _canonical(value: Any) -> Any:
    """Fallback for values JSON cannot write (tuples and lists are fine; sets, bytes, objects are not)."""
    if isinstance(value, set | frozenset):
        return sorted(map(repr, value))
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def node_key(class_type: str, version: Any, constants: dict[str, Any], fingerprint: Any,
             inputs: dict[str, tuple[str, int]]) -> str:
    """The key of a node's outputs.

    It depends on the node's own type, version, constants and fingerprint, and on the *keys* of
    the nodes feeding it (not on their whole ancestry), so computing every key of a graph is
    linear in its size. The hash of a canonical serialisation is stable across processes.
    """
    material = json.dumps(
        [class_type, version, constants, fingerprint, inputs],
        sort_keys=True, separators=(",", ":"), default=_canonical, ensure_ascii=False,
    )
    return hashlib.blake2b(material.encode(), digest_size=16).hexdigest()


def sizeof(value: Any, _seen: set[int] | None = None) -> int:
    """Approximate bytes held by a node output: tensors and modules by their storage."""
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if hasattr(value, "element_size") and hasattr(value, "nelement"):  # torch.Tensor
        return int(value.element_size() * value.nelement())
    if hasattr(value, "nbytes") and isinstance(value.nbytes, int):  # numpy
        return int(value.nbytes)
    if hasattr(value, "parameters") and hasattr(value, "buffers"):  # torch.nn.Module
        tensors = [*value.parameters(), *value.buffers()]
        return sum(sizeof(t, seen) for t in tensors)
    if isinstance(value, dict):
        return 64 + sum(sizeof(k, seen) + sizeof(v, seen) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return 56 + sum(sizeof(v, seen) for v in value)
    if isinstance(value, str | bytes):
        return 50 + len(value)
    if hasattr(value, "cache_size"):  # objects that know their own footprint (e.g. a model bundle)
        return int(value.cache_size())
    return 64


def default_budget_bytes() -> int:
    """A quarter of physical memory, at most 8 GiB."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 8 << 30
    return min(8 << 30, physical // 4)


@dataclass
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None
    size: int


class OutputCache:
    """Node outputs by key, within a byte budget, evicting the least recently used first."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = default_budget_bytes() if budget_bytes is None else budget_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.total = 0

    def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, outputs: tuple[Any, ...], ui: dict[str, Any] | None = None) -> bool:
        """Store outputs; returns False when they alone exceed the budget (they are not kept)."""
        size = sizeof(outputs) + (sizeof(ui) if ui else 0)
        if size > self.budget:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.total -= old.size
        self._entries[key] = CacheEntry(outputs, ui, size)
        self.total += size
        while self.total > self.budget:
            _, evicted = self._entries.popitem(last=False)
            self.total -= evicted.size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.total = 0
