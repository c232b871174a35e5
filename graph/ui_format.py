"""Import of the editor ("UI") format into the native API format (REFERENCE.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graph.document import DocumentError, current_id
from graph.group_nodes import expand_group_nodes, group_definitions
from graph.subgraphs import BYPASSED, MUTED, flatten_subgraphs, has_subgraphs
from nodes.registry import NodeRegistry

VIRTUAL_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
CONTROL_VALUES = frozenset({"fixed", "randomize", "increment", "decrement", True, False})
SEED_NAMES = frozenset({"seed", "noise_seed"})


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


@dataclass(frozen=True)
class _Source:
    node: int
    slot: int


class _Converter:
    def __init__(self, data: dict[str, Any], registry: NodeRegistry) -> None:
        self.registry = registry
        self.nodes: dict[int, dict[str, Any]] = {}
        for raw in data["nodes"]:
            if not isinstance(raw, dict) or "id" not in raw or "type" not in raw:
                raise DocumentError("every node of a UI-format workflow needs an 'id' and a 'type'")
            self.nodes[raw["id"]] = _with_current_id(raw, registry)
        self.links: dict[int, _Source] = {}
        for link in data.get("links") or []:
            if isinstance(link, dict):  # schema 1.0 stores links as objects
                self.links[link["id"]] = _Source(link["origin_id"], link["origin_slot"])
            elif isinstance(link, list) and len(link) >= 5:
                self.links[link[0]] = _Source(link[1], link[2])
            else:
                raise DocumentError(f"malformed link {link!r}: expected [id, from, from_slot, to, to_slot, type]")

    def _input_link(self, node: dict[str, Any], index: int) -> int | None:
        inputs = node.get("inputs") or []
        return inputs[index].get("link") if index < len(inputs) else None

    def resolve(self, link_id: int, depth: int = 0) -> _Source | tuple[str, Any] | None:
        """Follow a link through reroutes and bypassed nodes; a PrimitiveNode yields ('value', v)."""
        source = self.links.get(link_id)
        if source is None or depth > 256:
            return None
        node = self.nodes.get(source.node)
        if node is None:
            return source  # a node the file lacks: convert() decides
        if node.get("mode") == MUTED:
            return None
        if node["type"] == "Reroute":
            upstream = self._input_link(node, 0)
            return self.resolve(upstream, depth + 1) if upstream is not None else None
        if node["type"] == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node.get("mode") == BYPASSED:
            return self._through_bypassed(node, source.slot, depth)
        return source

    def _through_bypassed(self, node: dict[str, Any], slot: int, depth: int) -> _Source | tuple[str, Any] | None:
        """What a bypassed node's output `slot` passes on, as ComfyUI's editor picks it: the input at the same index
        if its type matches, else the first input of that type, connected or not (an unconnected one passes nothing);
        without output types, the first connected input."""
        outputs, inputs = node.get("outputs") or [], node.get("inputs") or []
        wanted = outputs[slot].get("type") if slot < len(outputs) else None
        if wanted is None:
            linked = [inp["link"] for inp in inputs if inp.get("link") is not None]
            return self.resolve(linked[0], depth + 1) if linked else None
        for index in (slot, *range(len(inputs))):
            if index < len(inputs) and inputs[index].get("type") == wanted:
                link = inputs[index].get("link")
                return self.resolve(link, depth + 1) if link is not None else None
        return None

    def widget_values(self, node: dict[str, Any]) -> dict[str, Any]:
        """The node's widget values by name; widgets the file holds no value for get their defaults, as
        ComfyUI's editor gives a node it loads (a SaveImage saved without widgets_values still saves)."""
        cls = self.registry.get(node["type"])
        if cls is None:
            return {}
        defaults = {name: cls.inputs[name].default for name in cls.widget_names()
                    if cls.inputs[name].default is not None}
        # widget_overrides: values an enclosing subgraph instance promoted (see graph/subgraphs.py).
        return {**defaults, **self._stored_widget_values(cls, node.get("widgets_values")),
                **{k: v for k, v in (node.get("widget_overrides") or {}).items() if k in cls.inputs}}

    def _stored_widget_values(self, cls: Any, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        if isinstance(raw, dict):  # some frontends store widgets by name
            return {k: v for k, v in raw.items() if k in cls.inputs or cls.accept_all_inputs}
        named = cls.widgets_from_ui(raw) if isinstance(raw, list) else None
        if named is not None:  # widgets the node's editor extension adds (CustomCombo's options)
            return named
        values: dict[str, Any] = {}
        position = 0
        for name in cls.widget_names():
            if position >= len(raw):
                break
            values[name] = raw[position]
            position += 1
            spec = cls.inputs[name]
            has_control = spec.control_after_generate or (name in SEED_NAMES and spec.type == "INT")
            if has_control and position < len(raw) and raw[position] in CONTROL_VALUES:
                position += 1
            if spec.image_upload and position < len(raw) and raw[position] in ("image", "upload"):
                position += 1
        return values

    def convert(self) -> dict[str, Any]:
        api: dict[str, Any] = {}
        for node_id, node in self.nodes.items():
            if node["type"] in VIRTUAL_TYPES or node.get("mode") in (MUTED, BYPASSED):
                continue
            inputs = self.widget_values(node)
            for inp in node.get("inputs") or []:
                if inp.get("link") is None:
                    continue
                resolved = self.resolve(inp["link"])
                if isinstance(resolved, tuple):
                    inputs[inp["name"]] = resolved[1]
                elif isinstance(resolved, _Source) and (resolved.node in self.nodes
                                                        or self._required(node, inp["name"])):
                    # A link from a node the file lacks is kept on a required input, so that validation names
                    # that node; on an optional one it is dropped, as ComfyUI's editor does.
                    inputs[inp["name"]] = [str(resolved.node), resolved.slot]
                else:
                    inputs.pop(inp["name"], None)
            meta: dict[str, Any] = {"title": node.get("title") or self._display_name(node["type"])}
            if "pos" in node:
                meta["pos"] = _pair(node["pos"])
            if "size" in node:
                meta["size"] = _pair(node["size"])
            if self.registry.get(node["type"]) is None and node.get("widgets_values"):
                # Widget values can be named only by the node's declaration: for a type this engine lacks
                # (a plugin not installed here), they are kept as they were, so converting loses nothing.
                meta["widgets_values"] = node["widgets_values"]
            pack = (node.get("properties") or {}).get("cnr_id")
            if self.registry.get(node["type"]) is None and isinstance(pack, str):
                meta["cnr_id"] = pack  # the pack the editor says the node is from ("comfy-core": a built-in)
            api[str(node_id)] = {"class_type": node["type"], "inputs": inputs, "_meta": meta}
        return api

    def _required(self, node: dict[str, Any], name: str) -> bool:
        cls = self.registry.get(node["type"])
        spec = cls.inputs.get(name) if cls is not None else None
        return spec is not None and not spec.optional

    def _display_name(self, class_type: str) -> str:
        cls = self.registry.get(class_type)
        return cls.display_name if cls else class_type


def _with_current_id(node: dict[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    """A node of an old id under its new one, with its inputs' new names (see `graph.document.current_id`)."""
    class_type, names = current_id(node["type"], registry)
    if class_type == node["type"]:
        return node
    inputs = [{**inp, "name": names.get(inp.get("name"), inp.get("name"))} if isinstance(inp, dict) else inp
              for inp in node.get("inputs") or []]
    renamed = {**node, "type": class_type, "inputs": inputs}
    if isinstance(node.get("widgets_values"), dict):  # widgets stored by name
        renamed["widgets_values"] = {names.get(k, k): v for k, v in node["widgets_values"].items()}
    return renamed


def _pair(value: Any) -> list[float] | None:
    if isinstance(value, dict):  # older files store {"0": x, "1": y}
        value = [value.get("0"), value.get("1")]
    if isinstance(value, list | tuple) and len(value) >= 2:
        return [float(value[0]), float(value[1])]
    return None


def ui_to_api(data: dict[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    """Convert a UI-format workflow to the API format (widgets by position, links resolved)."""
    if not is_ui_format(data):
        raise DocumentError("not a UI-format workflow: expected an object with 'nodes' and 'links'")
    try:
        if group_definitions(data):
            data = expand_group_nodes(data, registry)
        if has_subgraphs(data):
            data = flatten_subgraphs(data)
        return _Converter(data, registry).convert()
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise DocumentError(f"malformed UI-format workflow: {type(exc).__name__}: {exc}") from None
