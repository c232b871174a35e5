"""Routes for prompts and the queue: POST/GET /prompt, GET /prompt/{id}, GET/POST /queue, POST /interrupt."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from graph.document import DocumentError
from graph.load import graph_from_data
from graph.ui_format import is_ui_format, ui_to_api
from graph.validate import ValidatedWorkflow, validate
from web.http import describe, dumps, json_error, read_body, read_json
from web.state import STATE, ServerState
from web.store import MAX_NUMBER, PromptRecord

routes = web.RouteTableDef()


class PromptRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: dict[str, Any]
    client_id: str | None = Field(default=None, max_length=256)
    extra_data: dict[str, Any] = Field(default_factory=dict)
    front: bool = False
    number: float | None = Field(default=None, allow_inf_nan=False, gt=-MAX_NUMBER, lt=MAX_NUMBER)
    partial_execution_targets: list[str] | None = None


class QueueAction(BaseModel):
    clear: bool = False
    delete: list[str] = Field(default_factory=list)


class FreeRequest(BaseModel):
    unload_models: bool = False
    free_memory: bool = False


class InterruptRequest(BaseModel):
    prompt_id: str | None = None


def _invalid(message: str) -> web.HTTPException:
    return json_error(400, "invalid_prompt", message, node_errors={})


def _check(body: PromptRequest, state: ServerState) -> ValidatedWorkflow:
    """Parse and validate the workflow (combo inputs may list model folders, so not on the event loop)."""
    try:
        graph = graph_from_data(body.prompt, state.registry)
    except DocumentError as exc:
        raise _invalid(str(exc)) from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # odd UI-format documents
        raise _invalid(f"the workflow could not be read: {type(exc).__name__}: {exc}") from None
    targets = body.partial_execution_targets
    if targets is not None:  # as ComfyUI: the output nodes among them run; other ids are ignored
        targets = [nid for nid in dict.fromkeys(targets) if nid in graph.nodes
                   and (cls := state.registry.get(graph.nodes[nid].class_type)) and cls.output_node]
    return validate(graph, state.registry, targets)


def _check_and_add(body: PromptRequest, state: ServerState, prompt_id: str) -> ValidatedWorkflow | PromptRecord:
    """Validate, then queue: the problems when invalid, else the stored record.

    One call on the database thread rather than three hops (validate, add, read back): while the worker
    runs Python code each hop waits for the GIL twice, and those waits, not the work, made POST /prompt slow.
    """
    checked = _check(body, state)
    if not checked.ok:
        return checked
    extra_data = {**body.extra_data}
    if body.client_id is not None:
        extra_data["client_id"] = body.client_id
    store = state.db.store
    store.add(prompt_id, checked.graph.to_api(), extra_data, checked.outputs, body.client_id, body.number, body.front)
    record = store.get(prompt_id)
    assert record is not None
    return record


async def enqueue(request: web.Request, prompt_id: str | None = None) -> PromptRecord:
    """Validate the body of POST /prompt and add it to the queue; raises the 400 answers."""
    state = request.app[STATE]
    data = await read_json(request)
    if not isinstance(data, dict) or "prompt" not in data:
        raise _invalid("the body must be a JSON object with a 'prompt' (the workflow)")
    try:
        body = PromptRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(f"malformed request: {describe(exc)}") from None
    result = await state.db.call(_check_and_add, body, state, prompt_id or str(uuid.uuid4()))
    if isinstance(result, ValidatedWorkflow):
        raise web.HTTPBadRequest(text=dumps(result.error_response()), content_type="application/json")
    record = result
    if state.worker is not None:
        state.worker.wake()
    state.queue_changed()
    return record


def _queued_answer(record: PromptRecord) -> dict[str, Any]:
    return {"prompt_id": record.id, "number": record.display_number, "node_errors": {}}


@routes.post("/prompt")
async def post_prompt(request: web.Request) -> web.Response:
    wait = request.query.get("wait", "").lower() in ("1", "true", "yes")
    if wait:
        return await post_prompt_wait(request)
    return web.json_response(_queued_answer(await enqueue(request)))


@routes.post("/prompt/wait")
async def post_prompt_wait(request: web.Request) -> web.Response:
    """Queue a prompt and answer when it has run, with its outputs (for simple clients)."""
    state = request.app[STATE]
    if state.worker is None:
        raise json_error(409, "no_worker", "this server runs no worker; it cannot wait for a result")
    prompt_id = str(uuid.uuid4())
    waiter = state.worker.wait_for(prompt_id)  # before queueing: a quick run could end before we wait
    try:
        record = await enqueue(request, prompt_id)
    except web.HTTPException:
        state.worker.cancel_waiters(prompt_id, None)
        raise
    done = await waiter
    if done is None:
        raise json_error(409, "prompt_deleted", f"prompt {record.id} was deleted before it ran")
    return web.json_response({**_queued_answer(record), **_status(done)}, dumps=dumps)


@routes.get("/prompt")
async def get_prompt(request: web.Request) -> web.Response:
    remaining = await request.app[STATE].queue_remaining()
    return web.json_response({"exec_info": {"queue_remaining": remaining}})


def _status(record: PromptRecord) -> dict[str, Any]:
    state = record.status_str if record.state == "done" else record.state
    body: dict[str, Any] = {"prompt_id": record.id, "number": record.display_number, "status": state,
                            "queued_at": record.queued_at, "started_at": record.started_at,
                            "finished_at": record.finished_at}
    if record.state == "done":
        body.update(outputs=record.outputs, error=record.error, messages=record.messages)
    return body


@routes.get("/prompt/{prompt_id}")
async def get_prompt_status(request: web.Request) -> web.Response:
    db = request.app[STATE].db
    prompt_id = request.match_info["prompt_id"]
    record = await db.call(db.store.get, prompt_id)
    if record is None:
        raise json_error(404, "unknown_prompt", f"no prompt with id {prompt_id!r} (it may have left the history)")
    body = _status(record)
    if record.state == "pending":
        body["position"] = await db.call(db.store.position, prompt_id)
    return web.json_response(body, dumps=dumps)


@routes.get("/queue")
async def get_queue(request: web.Request) -> web.Response:
    db = request.app[STATE].db
    return web.Response(text=await db.call(db.store.queue_json), content_type="application/json")


@routes.post("/queue")
async def post_queue(request: web.Request) -> web.Response:
    state = request.app[STATE]
    action = await read_body(request, QueueAction)
    deleted = await state.db.call(state.db.store.delete_pending, None if action.clear else action.delete)
    for prompt_id in deleted:
        if state.worker is not None:
            state.worker.cancel_waiters(prompt_id, None)
    state.queue_changed()
    return web.json_response({"deleted": deleted})


@routes.post("/workflow/api")
async def post_workflow_api(request: web.Request) -> web.Response:
    """Convert an editor (UI-format) workflow to the native API format, layout in `_meta`: the editor's Save."""
    state = request.app[STATE]
    data = await read_json(request)
    workflow = data.get("workflow") if isinstance(data, dict) else None
    if not is_ui_format(workflow):
        raise _invalid("the body must be {'workflow': <a UI-format workflow with 'nodes' and 'links'>}")
    try:
        api = ui_to_api(workflow, state.registry)
    except DocumentError as exc:
        raise _invalid(str(exc)) from None
    return web.json_response(api, dumps=dumps)


@routes.post("/interrupt")
async def post_interrupt(request: web.Request) -> web.Response:
    state = request.app[STATE]
    action = await read_body(request, InterruptRequest)
    interrupted = state.worker.interrupt(action.prompt_id) if state.worker is not None else False
    return web.json_response({"interrupted": interrupted})


@routes.post("/free")
async def post_free(request: web.Request) -> web.Response:
    state = request.app[STATE]
    action = await read_body(request, FreeRequest)
    if state.worker is not None:
        state.worker.free(action.unload_models, action.free_memory)
    return web.json_response({"unload_models": action.unload_models, "free_memory": action.free_memory})
