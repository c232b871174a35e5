"""Request bodies checked with pydantic, and JSON error answers: bad input always gets a clear 4xx."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

log = logging.getLogger("loom.web")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dumps(data: Any) -> str:
    """JSON for answers that may hold values JSON does not know (paths, numpy numbers): as strings."""
    return json.dumps(data, default=str)


def json_error(status: int, kind: str, message: str, **extra: Any) -> web.HTTPException:
    """An HTTP error whose body is `{"error": {"type", "message"}, ...}`; raise it."""
    body = json.dumps({"error": {"type": kind, "message": message, "details": "", "extra_info": {}}, **extra})
    classes: dict[int, type[web.HTTPException]] = {
        400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
        409: web.HTTPConflict, 413: web.HTTPRequestEntityTooLarge, 415: web.HTTPUnsupportedMediaType,
    }
    if status == 413:
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=body, content_type="application/json")
    return classes[status](text=body, content_type="application/json")


def describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


async def read_json(request: web.Request) -> Any:
    if not request.body_exists:
        return {}
    try:
        return json.loads(await request.read())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        raise json_error(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise json_error(400, "invalid_json", "the request body is nested too deeply") from None


async def read_body(request: web.Request, model: type[M], error_type: str = "invalid_request") -> M:
    data = await read_json(request)
    if not isinstance(data, dict):
        raise json_error(400, error_type, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise json_error(400, error_type, describe(exc)) from None


def query_int(request: web.Request, name: str, default: int | None = None, minimum: int | None = 0,
              maximum: int = 2**62) -> int | None:
    """An integer query parameter, at least `minimum` (None: any); above `maximum` (which SQLite could not
    hold) it is `maximum`."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise json_error(400, "invalid_request", f"query parameter {name!r} must be an integer") from None
    if minimum is not None and value < minimum:
        raise json_error(400, "invalid_request", f"query parameter {name!r} must be at least {minimum}")
    return min(value, maximum)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answers JSON; an unexpected exception is logged and answered 500 without details."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        kind = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response({"error": {"type": kind, "message": message, "details": "", "extra_info": {}}},
                                 status=exc.status, headers=headers)
    except (ConnectionResetError, TimeoutError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return web.json_response({"error": {"type": "server_error", "message": "internal error (see the log)"}},
                                 status=500)

