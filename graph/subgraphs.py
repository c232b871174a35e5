"""Expansion of the editor's subgraphs (`definitions.subgraphs`) into one flat UI-format graph."""

from __future__ import annotations

from typing import Any

from graph.document import DocumentError

SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20
MUTED, BYPASSED = 2, 4  # node modes in UI-format files
MAX_DEPTH = 32
_CONTROL_WORDS = frozenset({"fixed", "randomize", "increment", "decrement"})

# A source a link is resolved to: (flat node id, output slot), ("value", constant), or None (nothing).
Source = tuple[Any, Any] | None


def has_subgraphs(data: dict[str, Any]) -> bool:
    definitions = data.get("definitions")
    return isinstance(definitions, dict) and bool(definitions.get("subgraphs"))


def _link_table(links: Any) -> dict[Any, tuple[Any, int, Any, int, Any]]:
    """Link id -> (origin, origin_slot, target, target_slot, type), from arrays or schema-1 objects."""
    table = {}
    for link in links or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        elif isinstance(link, list) and len(link) >= 5:
            table[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
        else:
            raise DocumentError(f"malformed link {link!r}: expected [id, from, from_slot, to, to_slot, type]")
    return table


class _Flattener:
    def __init__(self, data: dict[str, Any]) -> None:
        self.definitions = {d["id"]: d for d in data["definitions"]["subgraphs"] if isinstance(d, dict) and "id" in d}
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []

    def new_link(self, source: tuple[Any, int], target: Any, slot: int, type_: Any) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, source[0], source[1], target, slot, type_])
        return link_id

    def constant(self, flat_id: str, value: Any) -> tuple[str, int]:
        """A PrimitiveNode holding a promoted widget's value, which the converter pushes into what it drives."""
        self.nodes.append({"id": flat_id, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                           "outputs": [{"name": "value", "type": "*", "links": []}], "widgets_values": [value]})
        return flat_id, 0

    def level(self, nodes: list[dict[str, Any]], links: Any, prefix: str, inputs: list[Source],
              depth: int, outputs: list[dict[str, Any]] | None = None) -> dict[int, Source]:
        """Flatten one graph level; `inputs` are the sources of its subgraph inputs, `outputs` its declared
        outputs. Returns the sources of its subgraph outputs by slot."""
        if depth > MAX_DEPTH:
            raise DocumentError("subgraphs nested too deeply (a subgraph that contains itself?)")
        table = _link_table(links)
        by_id = {node["id"]: node for node in nodes}
        expanded: dict[Any, dict[int, Source]] = {}

        def source_of(link_id: Any) -> Source:
            link = table.get(link_id)
            if link is None:
                return None
            origin, slot = link[0], link[1]
            if origin == SUBGRAPH_INPUT:
                return inputs[slot] if 0 <= slot < len(inputs) else None
            node = by_id.get(origin)
            if node is not None and node.get("type") in self.definitions:
                return instance(node).get(slot)
            return f"{prefix}{origin}", slot

        def instance(node: dict[str, Any]) -> dict[int, Source]:
            if node["id"] not in expanded:
                expanded[node["id"]] = {}  # a cycle through instances resolves to nothing rather than recursing
                expanded[node["id"]] = self.instance(node, prefix, source_of, depth)
            return expanded[node["id"]]

        for node in nodes:
            if node.get("type") in self.definitions:
                instance(node)
                continue
            flat_id = f"{prefix}{node['id']}"
            flat = {**node, "id": flat_id, "inputs": []}
            for index, inp in enumerate(node.get("inputs") or []):
                inp = dict(inp)
                source = source_of(inp.get("link")) if inp.get("link") is not None else None
                if source is not None and source[0] == "value":
                    source = self.constant(f"{flat_id}:{inp.get('name')}", source[1])
                inp["link"] = None if source is None else self.new_link(source, flat_id, index, inp.get("type"))
                flat["inputs"].append(inp)
            self.nodes.append(flat)
        found = {target_slot: source_of(link_id) for link_id, (_, _, target, target_slot, _) in table.items()
                 if target == SUBGRAPH_OUTPUT}
        for slot, out in enumerate(outputs or []):
            # A subgraph output names its link; other links to that slot may be stale ones the editor left.
            listed = [i for i in out.get("linkIds") or [] if i in table]
            if listed:
                found[slot] = source_of(listed[0])
        return found

    def instance(self, node: dict[str, Any], prefix: str, source_of: Any, depth: int) -> dict[int, Source]:
        """Expand one subgraph instance; returns the sources of its outputs."""
        definition = self.definitions[node["type"]]
        declared = definition.get("inputs") or []
        sockets = {inp.get("name"): inp for inp in node.get("inputs") or []}
        sources: list[Source] = []
        promoted = node.get("promoted_from_outside") or {}
        for spec in declared:
            socket = sockets.get(spec.get("name"))
            source = source_of(socket["link"]) if socket and socket.get("link") is not None else None
            if source is None and spec.get("name") in promoted:
                source = ("value", promoted[spec["name"]])
            sources.append(source)
        if node.get("mode") == MUTED:
            return {}
        if node.get("mode") == BYPASSED:  # outputs pass the first input of the same type through
            passed = {}
            for slot, out in enumerate(definition.get("outputs") or []):
                passed[slot] = next((s for s, spec in zip(sources, declared, strict=False)
                                     if s is not None and spec.get("type") == out.get("type")), None)
            return passed
        overrides = _promoted_values(node, definition, sources)
        inner_prefix = f"{prefix}{node['id']}:"
        for index, value in overrides.pop(None, {}).items():
            sources[index] = ("value", value)
        # A value promoted from a nested instance's widget goes to that instance's subgraph input of that name.
        inner_nodes = [{**n, "promoted_from_outside": overrides[str(n["id"])]}
                       if str(n.get("id")) in overrides and n.get("type") in self.definitions else n
                       for n in definition.get("nodes") or []]
        first = len(self.nodes)
        outputs = self.level(inner_nodes, definition.get("links"), inner_prefix, sources, depth + 1,
                             definition.get("outputs") or [])
        for flat in self.nodes[first:]:
            local = str(flat["id"])[len(inner_prefix):]
            if local in overrides:
                flat["widget_overrides"] = {**flat.get("widget_overrides", {}), **overrides[local]}
        return outputs


def _promoted_values(node: dict[str, Any], definition: dict[str, Any],
                     sources: list[Source]) -> dict[Any, dict[Any, Any]]:
    """Widget values the instance holds for its subgraph: {inner node id: {widget: value}}, and under None
    {subgraph input index: value} for widget inputs of the subgraph left unlinked on the instance."""
    values = node.get("widgets_values")
    if not isinstance(values, list) or not values:
        return {}
    proxies = (node.get("properties") or {}).get("proxyWidgets")
    found: dict[Any, dict[Any, Any]] = {}
    if isinstance(proxies, list) and proxies:
        # Newer editors: properties.proxyWidgets lists [inner node id, widget name] per value, a seed's
        # "control_after_generate" included as an entry of its own (the converter drops it: not an input).
        names = {inp.get("name"): i for i, inp in enumerate(definition.get("inputs") or [])}
        for (inner, widget), value in zip(proxies, values, strict=False):
            if value is None:  # the value lives on the inner node (Z-Image-Turbo's template: its seed)
                continue
            if str(inner) == "-1" and widget in names:  # a widget input of the subgraph itself
                if sources[names[widget]] is None:
                    found.setdefault(None, {})[names[widget]] = value
            else:
                found.setdefault(str(inner), {})[widget] = value
        return found
    # Older editors: one value per widget-typed subgraph input, in declaration order.
    widget_inputs = [i for i, _ in enumerate(definition.get("inputs") or []) if _drives_widget(definition, i)]
    for index, value in zip(widget_inputs, _without_controls(values), strict=False):
        if sources[index] is None:
            found.setdefault(None, {})[index] = value
    return found


def _drives_widget(definition: dict[str, Any], index: int) -> bool:
    """Whether subgraph input `index` feeds a widget of an inner node (an input entry with `widget`)."""
    # Inputs are matched by their link ids, not by the links' target_slot: editors have saved files where the
    # two disagree (an input list reordered when a widget was converted to an input).
    fed = {link_id for link_id, (origin, slot, *_) in _link_table(definition.get("links")).items()
           if origin == SUBGRAPH_INPUT and slot == index}
    return any("widget" in inp and inp.get("link") in fed
               for node in definition.get("nodes") or [] for inp in node.get("inputs") or [])


def _without_controls(values: list[Any]) -> list[Any]:
    """The values less the "randomize"/"fixed"... entries that follow a seed-like number."""
    kept: list[Any] = []
    for value in values:
        if value in _CONTROL_WORDS and kept and isinstance(kept[-1], int) and not isinstance(kept[-1], bool):
            continue
        kept.append(value)
    return kept


def flatten_subgraphs(data: dict[str, Any]) -> dict[str, Any]:
    """The workflow with every subgraph instance replaced by the nodes of its definition (nested ones too),
    their ids prefixed with the instance's as ComfyUI's execution ids are ("10:3"), links wired through the
    subgraph's inputs and outputs."""
    flattener = _Flattener(data)
    flattener.level(data["nodes"], data.get("links"), "", [], 0)
    return {**data, "nodes": flattener.nodes, "links": flattener.links, "definitions": {}}
