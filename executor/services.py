"""Shared services a node reaches through `self.ctx.services`: folders, the loaded-model cache, devices."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from executor.devices import DeviceManager, EngineOptions, default_options, is_out_of_memory
from nodes.folders import FolderPaths, get_paths


def loaded_bytes(value: Any) -> int:
    """Bytes of weights a loaded value holds: a module, or an object (e.g. a loaded checkpoint) of modules."""
    from executor.cache import sizeof

    if hasattr(value, "parameters"):
        return sizeof(value)
    fields = getattr(value, "__dict__", None)
    return sizeof(list(fields.values())) if fields is not None else sizeof(value)


class ModelCache:
    """Loaded models by key (file, fingerprint, options): each file is loaded once and shared.

    Holds at most `max_models` models and `budget_bytes` of weights (None: unbounded), dropping the
    least recently used; the newest always stays. Callers must treat the returned objects as
    read-only (patching, e.g. LoRA, makes a new object).
    """

    def __init__(self, max_models: int = 4, budget_bytes: int | None = None) -> None:
        self.max_models = max_models
        self.budget_bytes = budget_bytes
        self._models: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model = load()
        size = loaded_bytes(model)
        with self._lock:
            self.loads += 1
            self._models[key] = model
            self._sizes[key] = size
            while len(self._models) > 1 and (len(self._models) > self.max_models or self._over_budget()):
                old, _ = self._models.popitem(last=False)
                self._sizes.pop(old, None)
        return model

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def _over_budget(self) -> bool:
        return self.budget_bytes is not None and self.total_bytes > self.budget_bytes

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[Hashable]:
        """The keys of the models held now (the Ray pool matches prompts to the worker that holds theirs)."""
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._sizes.clear()


@dataclass
class Services:
    paths: FolderPaths
    models: ModelCache = field(default_factory=ModelCache)
    devices: DeviceManager = field(default_factory=DeviceManager)

    oom_recoveries: int = 0

    @classmethod
    def create(cls, paths: FolderPaths | None = None, force_cpu: bool = False,
               options: EngineOptions | None = None) -> Services:
        """Services for one engine; `options` default to those the command line set (`--lowvram`, ...)."""
        options = options or default_options()
        devices = DeviceManager(force_cpu=force_cpu, options=options)
        return cls(paths=paths or get_paths(), models=ModelCache(budget_bytes=devices.ram_budget), devices=devices)

    def recover_from_oom(self, exc: BaseException) -> bool:
        """After an out-of-memory error: move every model off the compute device and release cached
        memory. False (nothing done) for other errors, so the caller knows whether a retry may help."""
        if not is_out_of_memory(exc):
            return False
        self.devices.free()
        self.oom_recoveries += 1
        return True
