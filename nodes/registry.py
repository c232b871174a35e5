"""The registry of node types: one name, one type; a collision is an error naming both sources."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from nodes.node import Node, NodeInfo

BUILTIN_MODULES = (
    "nodes.builtin.logic",
    "nodes.builtin.primitives",
    "nodes.builtin.utils",
    "nodes.builtin.strings",
    "nodes.sd.loaders",
    "nodes.sd.lora_stack",
    "nodes.sd.color_transfer",
    "nodes.sd.conditioning",
    "nodes.sd.controlnet",
    "nodes.sd.latent",
    "nodes.sd.sampling",
    "nodes.sd.custom_sampling",
    "nodes.sd.solvers",
    "nodes.sd.vae",
    "nodes.sd.image",
    "nodes.sd.image_save_advanced",
    "nodes.sd.mask",
    "nodes.sd.preprocessors",
    "nodes.sd.upscale",
    "nodes.sd.frame_interpolation",
    "nodes.sd.patches",
    "nodes.sd.easycache",
    "nodes.sd.context_windows",
    "nodes.sd.guidance_nodes",
    "nodes.sd.extra_guidance",
    "nodes.sd.nag",
    "nodes.sd.merge",
    "nodes.sd.model_advanced",
    "nodes.sd.sigmas",
    "nodes.sd.latent_ops",
    "nodes.sd.image_ops",
    "nodes.sd.image_tiles",
    "nodes.sd.toolkit",
    "nodes.sd.misc_core",
    "nodes.sd.image_utils",
    "nodes.sd.animation",
    "nodes.sd.part_loaders",
    "nodes.sd.inpaint",
    "nodes.sd.vision",
    "nodes.sd.attention_patches",
    "nodes.sd.concat_models",
    "nodes.sd.image_sources",
    "nodes.sd.photomaker",
    "nodes.sd.hooks",
    "nodes.sd.gligen",
    "nodes.sd.latent_operations",
    "nodes.sd.latent_extra",
    "nodes.sd.video",
    "nodes.sd.training",
    "nodes.sd.training_data",
    "nodes.sd.dataset",
    "nodes.sd.flux",
    "nodes.sd.sd3",
    "nodes.sd.flux_variants",
    "nodes.sd.skip_layers",
    "nodes.sd.rope",
    "nodes.sd.sd3_controlnet",
    "nodes.sd.svd",
    "nodes.sd.wan",
    "nodes.sd.wan_vace",
    "nodes.sd.wan_camera",
    "nodes.sd.ltxv",
    "nodes.sd.ltxv_guides",
    "nodes.sd.ltx2_guidance",
    "nodes.sd.ltx2_duration",
    "nodes.sd.ltx2",
    "nodes.sd.hunyuan_video15",
    "nodes.sd.hunyuan_image21",
    "nodes.sd.qwen_image_edit",
    "nodes.sd.qwen_image_layered",
    "nodes.sd.qwen_image21",
    "nodes.sd.textgen",
    "nodes.sd.math_expression",
    "nodes.sd.flux2",
    "nodes.sd.lumina2",
    "nodes.sd.hidream",
    "nodes.sd.model_patch",
    "nodes.sd.stable_audio",
    "nodes.sd.ace_step",
    "nodes.sd.utility_nodes",
    "nodes.sd.audio",
)


class DuplicateNodeError(Exception):
    def __init__(self, name: str, existing: str, new: str) -> None:
        super().__init__(f"node type {name!r} from {new} clashes with the one already registered from {existing}")
        self.name, self.existing, self.new = name, existing, new


@dataclass
class PluginInfo:
    """How loading one plugin went, for `main.py nodes --plugins` and the server."""

    name: str
    source: str  # a folder, a file, or an entry point
    loaded: bool
    error: str | None = None
    import_s: float = 0.0
    node_names: list[str] = field(default_factory=list)
    web_dir: Path | None = None  # editor extensions (JS/CSS) the plugin ships


class NodeRegistry:
    def __init__(self) -> None:
        self._nodes: dict[str, NodeInfo] = {}
        self.plugins: list[PluginInfo] = []

    def register(self, cls: type[Node], source: str = "builtin", **extras: Any) -> None:
        existing = self._nodes.get(cls.name)
        if existing is not None:
            raise DuplicateNodeError(cls.name, existing.source, source)
        self._nodes[cls.name] = NodeInfo(cls=cls, source=source, extras=extras)

    def register_all(self, classes: Iterable[type[Node]], source: str) -> None:
        for cls in classes:
            self.register(cls, source)

    def register_module(self, module: ModuleType, source: str | None = None) -> None:
        """Register the node classes a module lists in `NODES`."""
        self.register_all(module.NODES, source or module.__name__)

    def get(self, name: str) -> type[Node] | None:
        info = self._nodes.get(name)
        return info.cls if info else None

    def info(self, name: str) -> NodeInfo | None:
        return self._nodes.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def object_info(self, name: str | None = None) -> dict[str, Any]:
        names = [name] if name is not None else list(self._nodes)
        return {n: self._nodes[n].cls.object_info() for n in names if n in self._nodes}


def builtin_registry(modules: Iterable[str] = BUILTIN_MODULES) -> NodeRegistry:
    """A fresh registry holding the built-in node packs (imported on demand, not at import time)."""
    registry = NodeRegistry()
    for module_name in modules:
        registry.register_module(importlib.import_module(module_name), "builtin")
    return registry
