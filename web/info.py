"""Routes that describe the server: node types, models, plugins and their editor extensions, system stats."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import sys
from typing import Any

from aiohttp import web

from nodes.folders import MODEL_KINDS
from web.http import dumps, json_error
from web.paths import UnsafePath, safe_join
from web.state import STATE, ServerState

routes = web.RouteTableDef()


@routes.get("/object_info")
async def object_info(request: web.Request) -> web.Response:
    registry = request.app[STATE].registry
    return web.json_response(registry.object_info(), dumps=dumps)


@routes.get("/object_info/{node_class}")
async def object_info_one(request: web.Request) -> web.Response:
    registry = request.app[STATE].registry
    name = request.match_info["node_class"]
    if name not in registry:
        return web.json_response({})  # ComfyUI's answer for a name it does not know: an empty object
    return web.json_response(registry.object_info(name), dumps=dumps)


def _model_kinds(state: ServerState) -> list[str]:
    return sorted({*MODEL_KINDS, *state.paths.extra_model_paths, *state.paths.first_model_paths})


@routes.get("/models")
async def models(request: web.Request) -> web.Response:
    return web.json_response(_model_kinds(request.app[STATE]))


@routes.get("/models/{folder}")
async def models_in(request: web.Request) -> web.Response:
    state = request.app[STATE]
    folder = request.match_info["folder"]
    if folder not in _model_kinds(state):
        raise json_error(404, "unknown_folder", f"no model folder named {folder!r}")
    return web.json_response(await asyncio.to_thread(state.paths.list_models, folder))


@routes.get("/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    names = await asyncio.to_thread(request.app[STATE].paths.list_models, "embeddings")
    return web.json_response([os.path.splitext(n)[0] for n in names])


def _torch_info() -> tuple[str, list[dict[str, Any]]]:
    """Torch's version and devices, without importing torch if nothing has yet (it is slow to import)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    torch = sys.modules.get("torch")
    devices: list[dict[str, Any]] = []
    if torch is not None and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = _vram(torch, index)
            devices.append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                            "vram_total": total, "vram_free": free})
    if not devices:
        devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0})
    return version, devices


def _vram(torch: Any, index: int) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device. `mem_get_info` needs a CUDA context, which costs the
    process hundreds of MB of the card: only where this process already has one (the thread
    worker). Otherwise (the server beside a worker process) NVML answers without one, where
    nvidia-ml-py is installed; else the total from the device's properties, and free unknown (0)."""
    if torch.cuda.is_initialized():
        return torch.cuda.mem_get_info(index)
    properties = torch.cuda.get_device_properties(index)
    try:
        import pynvml

        pynvml.nvmlInit()
        try:  # by UUID: NVML numbers the devices without regard to CUDA_VISIBLE_DEVICES
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{properties.uuid}")
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML here (not installed, or no driver library)
        return 0, properties.total_memory


def _ram() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 0


@routes.get("/system_stats")
async def system_stats(request: web.Request) -> web.Response:
    version, devices = _torch_info()
    total, free = _ram()
    return web.json_response({
        "system": {"os": platform.system().lower(), "python_version": sys.version, "embedded_python": False,
                   "pytorch_version": version, "argv": sys.argv, "ram_total": total, "ram_free": free,
                   "loom_version": "0.1.0"},
        "devices": devices,
    })


@routes.get("/plugins")
async def plugins(request: web.Request) -> web.Response:
    registry = request.app[STATE].registry
    return web.json_response([
        {"name": p.name, "source": p.source, "loaded": p.loaded, "error": p.error, "import_s": p.import_s,
         "node_names": p.node_names, "web_dir": str(p.web_dir) if p.web_dir else None}
        for p in registry.plugins
    ])


@routes.get("/extensions")
async def extensions(request: web.Request) -> web.Response:
    """URLs of the editor scripts that plugins ship, as ComfyUI lists them."""
    urls = []
    for plugin in request.app[STATE].registry.plugins:
        if plugin.loaded and plugin.web_dir is not None and plugin.web_dir.is_dir():
            for path in sorted(plugin.web_dir.rglob("*.js")):
                urls.append(f"/extensions/{plugin.name}/{path.relative_to(plugin.web_dir).as_posix()}")
    return web.json_response(urls)


@routes.get("/extensions/{plugin}/{path:.+}")
async def extension_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["plugin"]
    plugin = next((p for p in request.app[STATE].registry.plugins if p.name == name and p.web_dir), None)
    if plugin is None or plugin.web_dir is None:
        raise json_error(404, "unknown_plugin", f"no plugin named {name!r} with editor files")
    try:
        path = safe_join(plugin.web_dir, "", request.match_info["path"])
    except UnsafePath as exc:
        raise json_error(400, "invalid_path", str(exc)) from None
    if not path.is_file():
        raise json_error(404, "not_found", "no such file")
    return web.FileResponse(path)
