"""Shared services a node reaches through `self.ctx.services`: folders and the loaded-model cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from executor.devices import DeviceManager
from nodes.folders import FolderPaths, get_paths


class ModelCache:
    """Loaded models by key (file, fingerprint, options): each file is loaded once and shared.

    Holds at most `max_models` models, dropping the least recently used. Callers must treat the
    returned objects as read-only (patching, e.g. LoRA, makes a new object).
    """

    def __init__(self, max_models: int = 4) -> None:
        self.max_models = max_models
        self._models: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        model = load()
        with self._lock:
            self.loads += 1
            self._models[key] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    def __len__(self) -> int:
        return len(self._models)

    def keys(self) -> list[Hashable]:
        """The keys of the models held now (the Ray pool matches prompts to the worker that holds theirs)."""
        with self._lock:
            return list(self._models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


@dataclass
class Services:
    paths: FolderPaths
    models: ModelCache = field(default_factory=ModelCache)
    devices: DeviceManager = field(default_factory=DeviceManager)

    @classmethod
    def create(cls, paths: FolderPaths | None = None, force_cpu: bool = False) -> Services:
        return cls(paths=paths or get_paths(), devices=DeviceManager(force_cpu=force_cpu))
