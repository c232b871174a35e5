"""`main.py serve`: check the exposure settings, say loudly what they mean, and run the server."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from nodes.folders import FolderPaths
from nodes.registry import NodeRegistry
from web.app import create_app
from web.security import new_token
from web.state import ServerConfig
from web.store import StoreInUse

BANNER = "!" * 78


def _warn(lines: list[str]) -> None:
    print("\n".join([BANNER, *(f"!! {line}" for line in lines), BANNER]), file=sys.stderr, flush=True)


# How often a thread holding the GIL is asked to let another run. Python's default, 5 ms, is paid on every
# hand-over between the event loop, the database thread and a worker busy in Python code (sampling loops,
# model loading): a few hand-overs per request made POST /prompt tens of ms slow while the worker ran.
SWITCH_INTERVAL_S = 0.001


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
    host = config.listen
    shown = f"[{host}]" if ":" in host else host
    suffix = f"/?token={config.token}" if config.token and config.loopback_only else ""
    print(f"Loom is serving the editor and API on http://{shown}:{config.port}{suffix}", flush=True)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        app = create_app(config, registry, paths)
    except StoreInUse as exc:
        raise SystemExit(f"error: {exc}") from None
    web.run_app(app, host=host, port=config.port, print=None, access_log=None, handle_signals=True)
