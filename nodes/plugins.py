"""Plugin loading from custom_nodes folders and `loom.nodes` entry points, each plugin isolated and timed."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from nodes.comfy_compat import ComfyInternalsError, adapt_classic, comfy_module_in
from nodes.node import Node
from nodes.registry import DuplicateNodeError, NodeRegistry, PluginInfo, builtin_registry

ENTRY_POINT_GROUP = "loom.nodes"


@dataclass
class PluginCandidate:
    """A plugin found by discovery, not yet imported."""

    name: str
    source: str
    load: Callable[[], Any]  # imports it; returns the module (or object) that lists its nodes


def discover_folder(folder: Path) -> list[PluginCandidate]:
    """Each `.py` file and package folder in `folder`, sorted by name.

    Skipped: names ending in `.disabled`, names starting with `_` or `.`, and folders without
    an `__init__.py` (not a package, so not a plugin).
    """
    if not folder.is_dir():
        return []
    found = [_candidate(entry) for entry in sorted(folder.iterdir())
             if not entry.name.startswith(("_", ".")) and not entry.name.endswith(".disabled")]
    return [c for c in found if c is not None]


def _candidate(path: Path) -> PluginCandidate | None:
    if path.is_file() and path.suffix == ".py":
        return PluginCandidate(path.stem, str(path), _importer(path.stem, path, path))
    if path.is_dir() and (path / "__init__.py").is_file():
        return PluginCandidate(path.name, str(path), _importer(path.name, path / "__init__.py", path))
    return None


def discover_entry_points(group: str = ENTRY_POINT_GROUP) -> list[PluginCandidate]:
    """Installed packages that declare `[project.entry-points."loom.nodes"] name = "module[:object]"`."""
    found = []
    for ep in importlib.metadata.entry_points(group=group):
        dist = f"{ep.dist.name} " if ep.dist is not None else ""
        found.append(PluginCandidate(ep.name, f"entry point {dist}({ep.value})", ep.load))
    return found


def _module_name(name: str, path: Path) -> str:
    """The name to import a plugin under: its own (as ComfyUI does) unless that is taken or importable."""
    if name.isidentifier() and name not in sys.modules and importlib.util.find_spec(name) is None:
        return name
    digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
    safe = re.sub(r"\W", "_", name)
    return f"loom_plugin_{safe}_{digest}"


def _importer(name: str, init: Path, location: Path) -> Callable[[], ModuleType]:
    def load() -> ModuleType:
        module_name = _module_name(name, location)
        search = [str(location)] if location.is_dir() else None
        spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=search)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # Registered before running so that the package's own relative imports find it.
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            for key in [k for k in sys.modules if k == module_name or k.startswith(module_name + ".")]:
                del sys.modules[key]
            raise
        return module

    return load


def describe_failure(exc: BaseException) -> str:
    """One line on why a plugin failed to import, with the plugin line that failed."""
    comfy = comfy_module_in(exc)
    if comfy is not None:
        return str(ComfyInternalsError(comfy))
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(exc, ModuleNotFoundError):
        return f"missing dependency: {exc}{where}"
    return f"{type(exc).__name__}: {exc}{where}"


def _node_types(target: Any, plugin: str) -> tuple[list[type[Node]], list[str]]:
    """The node types a plugin module declares (native `NODES`, classic `NODE_CLASS_MAPPINGS`) and problems."""
    found: list[type[Node]] = []
    problems: list[str] = []
    for cls in getattr(target, "NODES", None) or ():
        if isinstance(cls, type) and issubclass(cls, Node):
            found.append(cls)
        else:
            problems.append(f"NODES entry {cls!r} is not a Node subclass")
    display = getattr(target, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
    for name, cls in (getattr(target, "NODE_CLASS_MAPPINGS", None) or {}).items():
        if isinstance(cls, type) and issubclass(cls, Node):
            found.append(cls)
            continue
        try:
            found.append(adapt_classic(name, cls, display.get(name), f"custom_nodes.{plugin}"))
        except Exception as exc:
            problems.append(f"node type {name!r} refused: {exc}")
    return found, problems


def _web_dir(target: Any, problems: list[str]) -> Path | None:
    """The plugin's editor extension folder: WEB_DIRECTORY, relative to the module's own folder."""
    declared = getattr(target, "WEB_DIRECTORY", None)
    if not declared:
        return None
    module = target if isinstance(target, ModuleType) else sys.modules.get(getattr(target, "__module__", ""))
    base = Path(module.__file__).parent if module is not None and module.__file__ else Path.cwd()
    folder = (base / declared).resolve()
    if not folder.is_dir():
        problems.append(f"WEB_DIRECTORY {declared!r} is not a folder ({folder})")
        return None
    return folder


def _within(module: str, root: str) -> bool:
    return bool(root) and (module == root or module.startswith(root + "."))


def load_plugin(registry: NodeRegistry, candidate: PluginCandidate) -> PluginInfo:
    """Import one plugin and register its nodes; every failure is recorded in the result, never raised."""
    info = PluginInfo(candidate.name, candidate.source, loaded=False)
    same_name = next((p for p in registry.plugins if p.name == candidate.name), None)
    if same_name is not None:
        info.error = f"a plugin named {candidate.name!r} is already loaded from {same_name.source}"
        registry.plugins.append(info)
        return info
    began = time.perf_counter()
    try:
        target = candidate.load()
        classes, problems = _node_types(target, candidate.name)
    # SystemExit too: a plugin calling sys.exit() at import must not stop the engine.
    except (Exception, SystemExit) as exc:
        info.error = describe_failure(exc)
        info.import_s = time.perf_counter() - began
        registry.plugins.append(info)
        return info
    info.web_dir = _web_dir(target, problems)
    root = target.__name__ if isinstance(target, ModuleType) else getattr(target, "__module__", "")
    if not classes and info.web_dir is None and not problems:
        problems.append("declares no nodes: expected a NODES list or NODE_CLASS_MAPPINGS")
    for cls in classes:
        try:
            registry.register(cls, f"plugin {candidate.name} ({candidate.source})")
        except DuplicateNodeError as exc:
            replaceable = "" if exc.existing != "builtin" else " (built-in node types cannot be replaced)"
            problems.append(f"refused: {exc}{replaceable}")
            continue
        if cls.python_module == cls.__module__ and _within(cls.__module__, root):
            # What the editor groups a pack's nodes by, whatever module name it was imported under.
            cls.python_module = f"custom_nodes.{candidate.name}"
        info.node_names.append(cls.name)
    info.loaded = bool(info.node_names) or info.web_dir is not None
    info.error = "; ".join(problems) or None
    info.import_s = time.perf_counter() - began
    registry.plugins.append(info)
    return info


def load_plugins(registry: NodeRegistry, folders: Iterable[Path] = (), entry_points: bool = True) -> list[PluginInfo]:
    """Load every plugin of the folders (in order), then those installed as entry points."""
    candidates = [c for folder in folders for c in discover_folder(Path(folder))]
    if entry_points:
        candidates += discover_entry_points()
    return [load_plugin(registry, candidate) for candidate in candidates]


def engine_registry(plugin_folders: list[Path] | None = None) -> NodeRegistry:
    """The built-in nodes plus the plugins of these folders and of entry points (None: the built-in nodes only).

    What `main.py` builds, and what every Ray worker builds again from the same (shared) folders.
    """
    registry = builtin_registry()
    if plugin_folders is not None:
        load_plugins(registry, plugin_folders)
    return registry


def load_plugin_path(registry: NodeRegistry, path: Path) -> PluginInfo:
    """Load the one plugin at `path` (a `.py` file or a package folder), as a pack's own tests do."""
    candidate = _candidate(Path(path))
    if candidate is None:
        raise ValueError(f"{path} is neither a .py file nor a folder with an __init__.py")
    return load_plugin(registry, candidate)


def plugin_summary(info: PluginInfo) -> dict[str, Any]:
    """A PluginInfo as JSON-ready data, for `nodes --plugins --json` (the shape of the server's GET /plugins)."""
    return {"name": info.name, "source": info.source, "loaded": info.loaded, "error": info.error,
            "import_s": info.import_s, "node_names": list(info.node_names),
            "web_dir": str(info.web_dir) if info.web_dir else None}
