"""`main.py serve`: check the exposure settings, say loudly what they mean, and run the server."""

from __future__ import annotations

import gc
import importlib
import json
import logging
import sys
from pathlib import Path

from aiohttp import web

from graph.load import graph_from_data
from graph.validate import validate
from nodes.folders import FolderPaths
from nodes.registry import NodeRegistry
from web.app import create_app
from web.dispatch import StartError
from web.security import new_token
from web.state import ServerConfig
from web.store import StoreInUse

BANNER = "!" * 78
log = logging.getLogger("loom.web")


def _warn(lines: list[str]) -> None:
    print("\n".join([BANNER, *(f"!! {line}" for line in lines), BANNER]), file=sys.stderr, flush=True)


# How often a thread holding the GIL is asked to let another run. Python's default, 5 ms, is paid on every
# hand-over between the event loop, the database thread and a worker busy in Python code (sampling loops,
# model loading): a few hand-overs per request made POST /prompt tens of ms slow while the worker ran.
SWITCH_INTERVAL_S = 0.001


# What the SD nodes import on first use (lazily, so that the command line starts fast). Imported by the worker
# during the first prompt, transformers alone held the GIL for up to a second and stalled every request.
SD_MODULES = ("ldm.checkpoint", "ldm.lora", "ldm.unet", "ldm.text_encoders", "transformers.models.clip.modeling_clip")


def _preload(registry: NodeRegistry, examples: Path, runs_prompts: bool) -> None:
    """Pay the one-time costs before listening, not during the first requests: validation's always, and the SD
    nodes' when prompts run in this process (a worker process pays its own before it takes a prompt)."""
    _validate_examples(registry, examples)
    if not runs_prompts or registry.get("CheckpointLoaderSimple") is None:
        return
    for name in SD_MODULES:
        importlib.import_module(name)
    from ldm.tokenizer import ClipTokenizer

    ClipTokenizer().encode_words("warm up")  # builds the shared BPE tables (about a second)


def _validate_examples(registry: NodeRegistry, folder: Path) -> None:
    """Validate the example workflows once, for what it leaves warm: the model folder listings, the checkpoint
    headers read for family checks, the validator's code. The first POST /prompt paid those (about 12 ms more
    than the next), and a burst of requests queued behind it: they were the slowest of the server benchmark."""
    for path in sorted(folder.glob("*.json")):
        try:
            validate(graph_from_data(json.loads(path.read_text()), registry), registry)
        except Exception:  # an example these node types cannot read is no concern of a warm-up
            log.debug("warm-up: %s did not validate", path.name, exc_info=True)


def run_server(config: ServerConfig, registry: NodeRegistry, paths: FolderPaths) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not config.loopback_only and config.token is None:
        config.token = new_token()
        _warn([f"--listen {config.listen} exposes this server beyond this machine, and no token was given.",
               "A random access token was made for this run; every request must carry it:",
               f"    {config.token}",
               "Open the editor at http://HOST:PORT/?token=<token>, or set --token / LOOM_TOKEN."])
    elif not config.loopback_only:
        _warn([f"--listen {config.listen}: reachable from other machines; the access token is required."])
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    _preload(registry, config.workflows_dir, runs_prompts=config.ray is None and config.worker_process is None)
    host = config.listen
    shown = f"[{host}]" if ":" in host else host
    suffix = f"/?token={config.token}" if config.token and config.loopback_only else ""
    print(f"Loom is serving the editor and API on http://{shown}:{config.port}{suffix}", flush=True)
    try:
        app = create_app(config, registry, paths)
    except StoreInUse as exc:
        raise SystemExit(f"error: {exc}") from None
    # Everything made so far (torch, the node registry: some 200,000 objects) lives as long as the process. Out of
    # the collector's sight, a full collection no longer walks them all: such a pass took 250-300 ms with the
    # GIL held, stalling the event loop whenever loading a model set one off.
    gc.freeze()
    try:
        web.run_app(app, host=host, port=config.port, print=None, access_log=None, handle_signals=True)
    except StartError as exc:
        raise SystemExit(f"error: {exc}") from None
