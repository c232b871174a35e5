"""Writing plugin files and loading them into a fresh registry, for the plugin tests."""

import textwrap

from nodes.plugins import load_plugins
from nodes.registry import NodeRegistry, PluginInfo, builtin_registry


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(*folders, entry_points=False) -> NodeRegistry:
    registry = builtin_registry()
    load_plugins(registry, folders, entry_points=entry_points)
    return registry


def plugin(registry: NodeRegistry, name: str) -> PluginInfo:
    return next(p for p in registry.plugins if p.name == name)
