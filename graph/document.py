"""Workflow documents: the native (ComfyUI API) format as pydantic models and as a plain graph."""

from __future__ import annotations

import json
import logging
from collections.abc import Container
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

log = logging.getLogger(__name__)

# Old node ids that ComfyUI's editor replaces as it loads a workflow (its comfy_extras/nodes_replacements.py), where
# Loom registers the new node and not the old one: old id -> (new id, {old input name: new input name}). ImageBatch,
# ImageScaleBy and ResizeImagesByLongerEdge, which it replaces too, Loom still registers; Load3DAnimation and
# Preview3DAnimation become Load3D and Preview3D, which Loom lacks.
RENAMED_NODES: dict[str, tuple[str, dict[str, str]]] = {
    "T2IAdapterLoader": ("ControlNetLoader", {"t2i_adapter_name": "control_net_name"}),
    "SDV_img2vid_Conditioning": ("SVD_img2vid_Conditioning", {}),  # a typo, fixed
    "ConditioningAverage ": ("ConditioningAverage", {}),  # a trailing space, dropped
}


def current_id(class_type: str, registered: Container[str]) -> tuple[str, dict[str, str]]:
    """The node id a node of `class_type` runs under, and its inputs' new names: its replacement's (RENAMED_NODES)
    where `registered` lacks it and holds the replacement; else its own, with no new names."""
    new = RENAMED_NODES.get(class_type)
    if new is None or class_type in registered or new[0] not in registered:
        return class_type, {}
    return new


# ComfyUI's node whose seed the prompt's other seeds take before it runs (`Graph.with_global_seeds`).
GLOBAL_SEED = "GlobalSeedNode"


class DocumentError(ValueError):
    """The document is not a workflow at all (not JSON, wrong shapes); one clear message."""


class ListValue(BaseModel):
    """A constant that is itself a list, wrapped so that it is not read as a link."""

    model_config = ConfigDict(extra="forbid")
    value: list[Any] = Field(alias="__value__")


InputValue = tuple[str, int] | ListValue | str | int | float | bool | None | dict[str, Any] | list[Any]


class NodeLayout(BaseModel):
    """Editor layout kept in a node's `_meta`; free-form, ignored by execution."""

    model_config = ConfigDict(extra="allow")
    title: str | None = None
    pos: tuple[float, float] | None = None
    size: tuple[float, float] | None = None


class ApiNode(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    class_type: str = Field(min_length=1)
    inputs: dict[str, InputValue] = Field(default_factory=dict)
    meta: NodeLayout | None = Field(default=None, alias="_meta")


class ApiWorkflow(RootModel[dict[str, ApiNode]]):
    """The native document: node id -> node, exactly ComfyUI's API format (REFERENCE.md section 1)."""


@dataclass(frozen=True, slots=True)
class Link:
    node: str
    output: int


@dataclass(frozen=True, slots=True)
class BadLink:
    """A list input that is not a well-formed `[node_id, output_index]`; validation reports it."""

    raw: Any


@dataclass
class GraphNode:
    id: str
    class_type: str
    inputs: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def links(self) -> dict[str, Link]:
        return {k: v for k, v in self.inputs.items() if isinstance(v, Link)}


@dataclass
class Graph:
    nodes: dict[str, GraphNode]

    def to_api(self) -> dict[str, Any]:
        return {nid: _node_to_api(node) for nid, node in self.nodes.items()}

    def with_global_seeds(self) -> Graph:
        """The graph as ComfyUI's GlobalSeedNode leaves the prompt before it runs (its on-prompt handler): each such
        node, in order, sets the constant `seed` input of the nodes in its scope (every node when `global`; else
        those joined to it by any chain of links) to its own seed, where the seed is 0 ("placeholders only") or
        always ("overwrite all"); a node one of them set, the later ones leave. One whose own seed is linked sets
        none: its value is not known before the run (ComfyUI's handler fails on it)."""
        seeders = [nid for nid, node in self.nodes.items() if node.class_type == GLOBAL_SEED]
        if not seeders:
            return self
        neighbours: dict[str, set[str]] = {nid: set() for nid in self.nodes}
        for nid, node in self.nodes.items():
            for link in node.links().values():
                if link.node in neighbours:
                    neighbours[nid].add(link.node)
                    neighbours[link.node].add(nid)
        seeds: dict[str, int] = {}
        for nid in seeders:
            own = self.nodes[nid].inputs
            master = seeds.get(nid, own.get("seed", 0))  # an earlier seeder may have set this one's seed
            if not isinstance(master, int) or isinstance(master, bool):
                log.warning("GlobalSeedNode %s: its seed is linked, not a number, so it sets no seeds", nid)
                continue
            scope = set(self.nodes) if bool(own.get("global", True)) else _joined(nid, neighbours)
            overwrite = own.get("mode", "placeholders only") == "overwrite all"
            for tid in scope - seeds.keys():
                value = self.nodes[tid].inputs.get("seed")
                if isinstance(value, int) and not isinstance(value, bool) and (overwrite or value == 0):
                    seeds[tid] = master
        changed = {tid: replace(self.nodes[tid], inputs={**self.nodes[tid].inputs, "seed": seed})
                   for tid, seed in seeds.items() if self.nodes[tid].inputs["seed"] != seed}
        for tid, seed in seeds.items():
            log.debug("GlobalSeedNode: node %s's seed set to %d", tid, seed)
        return Graph({**self.nodes, **changed}) if changed else self

    def with_current_ids(self, registered: Container[str]) -> Graph:
        """The graph with each node of an old id under its new one, and its inputs' new names (see `current_id`)."""
        renamed: dict[str, GraphNode] = {}
        for nid, node in self.nodes.items():
            class_type, names = current_id(node.class_type, registered)
            if class_type != node.class_type:
                log.info("node %s: %r is ComfyUI's former id of %s", nid, node.class_type, class_type)
                renamed[nid] = replace(node, class_type=class_type,
                                       inputs={names.get(k, k): v for k, v in node.inputs.items()})
        return Graph({**self.nodes, **renamed}) if renamed else self


def _joined(start: str, neighbours: dict[str, set[str]]) -> set[str]:
    """The nodes joined to `start` by links, either way, it among them."""
    seen, todo = set(), [start]
    while todo:
        nid = todo.pop()
        if nid not in seen:
            seen.add(nid)
            todo.extend(neighbours[nid] - seen)
    return seen


def _node_to_api(node: GraphNode) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    for key, value in node.inputs.items():
        if isinstance(value, Link):
            inputs[key] = [value.node, value.output]
        elif isinstance(value, BadLink):
            inputs[key] = value.raw
        elif isinstance(value, list):
            inputs[key] = {"__value__": value}
        else:
            inputs[key] = value
    out: dict[str, Any] = {"class_type": node.class_type, "inputs": inputs}
    if node.meta:
        out["_meta"] = node.meta
    return out


def _read_input(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__value__"} and isinstance(value["__value__"], list):
        return list(value["__value__"])
    if isinstance(value, list | tuple):
        if (
            len(value) == 2
            and isinstance(value[0], str | int)
            and not isinstance(value[0], bool)
            and isinstance(value[1], int)
            and not isinstance(value[1], bool)
        ):
            return Link(str(value[0]), value[1])
        return BadLink(list(value))
    return value


def parse_api(data: Any) -> Graph:
    """Read an API-format document (already decoded from JSON) into a Graph.

    Shapes are checked by the pydantic model; values are read from the raw data so that a link
    is told from a constant exactly as ComfyUI does (any list is a link unless wrapped).
    """
    if not isinstance(data, dict):
        raise DocumentError(f"a workflow must be a JSON object of node id -> node, not {type(data).__name__}")
    check_with_schema(data)
    return Graph(
        {
            str(node_id): GraphNode(
                id=str(node_id),
                class_type=raw["class_type"],
                inputs={str(k): _read_input(v) for k, v in raw.get("inputs", {}).items()},
                meta=raw.get("_meta") or {},
            )
            for node_id, raw in data.items()
        }
    )


def parse_api_json(text: str | bytes) -> Graph:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DocumentError(f"not valid JSON: {exc}") from None
    return parse_api(data)


def api_json_schema() -> dict[str, Any]:
    """The JSON Schema of the native document, as `main.py schema` publishes it."""
    return ApiWorkflow.model_json_schema()


def check_with_schema(data: Any) -> None:
    """Strict check of a document against the pydantic model; raises DocumentError on failure."""
    try:
        ApiWorkflow.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("tuple[", "function-")))
        raise DocumentError(f"malformed workflow at {where or 'top level'}: {first['msg']}") from None
