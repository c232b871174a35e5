"""`main.py serve`: check the exposure settings, say loudly what they mean, and run the server."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from nodes.folders import FolderPaths
from nodes.registry import NodeRegistry
from web.app import create_app
from web.dispatch import StartError
from web.security import new_token
from web.state import ServerConfig
from web.store import StoreInUse

BANNER = "!" * 78


def _warn(lines: list[str]) -> None:
    print("\n".join([BANNER, *(f"!! {line}" for line in lines), BANNER]), file=sys.stderr, flush=True)


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
    try:
        app = create_app(config, registry, paths)
    except StoreInUse as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        web.run_app(app, host=host, port=config.port, print=None, access_log=None, handle_signals=True)
    except StartError as exc:
        raise SystemExit(f"error: {exc}") from None
