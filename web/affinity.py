"""Which model files a prompt needs and which a worker holds loaded, named alike so that they can be matched.

A name is `KIND/FILE` as the loader nodes' combos list it (`checkpoints/sd15.safetensors`), so the
server and a worker on another machine agree even when the shared folder is mounted elsewhere.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

from nodes.folders import FolderPaths

# Loader inputs that name a model file, and the folder kind each names.
MODEL_INPUTS = {"ckpt_name": "checkpoints", "vae_name": "vae", "lora_name": "loras"}
# The first element of the loader nodes' model-cache keys (nodes.sd.loaders), and its folder kind.
CACHE_KINDS = {"checkpoint": "checkpoints", "vae": "vae", "lora": "loras"}


def prompt_models(prompt: dict[str, Any]) -> frozenset[str]:
    """The model files an API-format prompt's loader nodes name."""
    names = set()
    for node in prompt.values():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        for key, kind in MODEL_INPUTS.items():
            value = inputs.get(key) if isinstance(inputs, dict) else None
            if isinstance(value, str):
                names.add(f"{kind}/{value}")
    return frozenset(names)


def _name(kind: str, path: Path, paths: FolderPaths) -> str | None:
    for folder in paths.model_dirs(kind):
        if path.is_relative_to(folder):
            return f"{kind}/{path.relative_to(folder).as_posix()}"
    return None


def model_names(keys: Iterable[Hashable], paths: FolderPaths) -> frozenset[str]:
    """The names of the model files behind model-cache keys `(tag, path, ...)`; other keys are skipped."""
    names = set()
    for key in keys:
        if isinstance(key, tuple) and len(key) >= 2 and key[0] in CACHE_KINDS and isinstance(key[1], str):
            name = _name(CACHE_KINDS[key[0]], Path(key[1]), paths)
            if name is not None:
                names.add(name)
    return frozenset(names)


def held_models(models: Any, paths: FolderPaths) -> frozenset[str]:
    """The model files an engine's model cache (executor.services.ModelCache) holds now."""
    return model_names(models.keys(), paths)
