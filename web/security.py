"""Who may talk to the server: loopback Host names, same-origin browser pages, and the access token."""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

from aiohttp import web

from web.http import Handler, json_error
from web.state import STATE, ServerConfig, is_loopback

TOKEN_COOKIE = "loom_token"


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_name(host: str) -> str:
    """`127.0.0.1:8188` -> `127.0.0.1`, `[::1]:8188` -> `::1`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def origin_allowed(request: web.Request, config: ServerConfig) -> bool:
    """A browser request from a page of another origin is refused (the page could drive the server)."""
    origin = request.headers.get("Origin")
    if origin is None:
        # Requests without Origin (scripts, or a browser's plain GET of an image) may still say where they
        # come from: a page of another site is refused.
        return request.headers.get("Sec-Fetch-Site", "same-origin") != "cross-site"
    if origin in config.allowed_origins:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == request.host.lower()


def presented_token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query.get("token") or request.cookies.get(TOKEN_COOKIE)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    config = request.app[STATE].config
    # A loopback-only server answers only to loopback names: this defeats DNS rebinding.
    host = request.headers.get("Host")
    if config.loopback_only and host is not None and not is_loopback(_host_name(host)):
        raise json_error(403, "forbidden_host", f"this server answers only to localhost, not {host!r}")
    if not origin_allowed(request, config):
        raise json_error(403, "forbidden_origin",
                         "requests from a page of another origin are refused; use --allow-origin to permit one")
    if config.token is not None:
        token = presented_token(request)
        if token is None or not hmac.compare_digest(token.encode(), config.token.encode()):
            raise json_error(401, "unauthorized", "an access token is required: open /?token=TOKEN, or send "
                                                  "'Authorization: Bearer TOKEN'")
        response = await handler(request)
        if request.query.get("token") and request.path == "/" and isinstance(response, web.Response):
            # The editor's page was opened with ?token=: let its own requests carry the token from now on.
            response.set_cookie(TOKEN_COOKIE, config.token, httponly=True, samesite="Strict")
        return response
    return await handler(request)
