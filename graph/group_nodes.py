"""Expansion of the editor's older group nodes (`extra.groupNodes`, types "workflow>NAME") into their nodes."""

from __future__ import annotations

from typing import Any

from graph.document import DocumentError
from nodes.registry import NodeRegistry

# Older editors name instances "workflow/NAME", later ones "workflow>NAME".
PREFIXES = ("workflow>", "workflow/")


def group_definitions(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    extra = data.get("extra")
    groups = extra.get("groupNodes") if isinstance(extra, dict) else None
    return groups if isinstance(groups, dict) else {}


def _definition(node: dict[str, Any], groups: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    kind = node.get("type")
    if not isinstance(kind, str):
        return None
    for prefix in PREFIXES:
        if kind.startswith(prefix) and kind[len(prefix):] in groups:
            return groups[kind[len(prefix):]]
    return None


class _Expander:
    def __init__(self, data: dict[str, Any], registry: NodeRegistry) -> None:
        self.registry = registry
        self.links = [list(link) for link in data.get("links") or [] if isinstance(link, list)]
        if len(self.links) != len(data.get("links") or []):
            raise DocumentError("a workflow with group nodes needs its links as arrays")
        self.next_link = max((link[0] for link in self.links), default=0) + 1

    def expand(self, instance: dict[str, Any], definition: dict[str, Any]) -> list[dict[str, Any]]:
        """The instance's inner nodes, with ids "INSTANCE:INDEX", wired to each other and to the outside."""
        inner = sorted(definition.get("nodes") or [], key=lambda n: n.get("index", 0))
        ids = [f"{instance['id']}:{n.get('index', i)}" for i, n in enumerate(inner)]
        nodes = [{**n, "id": ids[i], "inputs": [dict(inp) for inp in n.get("inputs") or []],
                  "mode": instance.get("mode", 0) or n.get("mode", 0)} for i, n in enumerate(inner)]
        position = {n.get("index", i): i for i, n in enumerate(inner)}
        linked_in: set[tuple[int, int]] = set()
        linked_out: set[tuple[int, int]] = set()
        for link in definition.get("links") or []:  # [from index, from slot, to index, to slot, ...]
            source, slot, target, target_slot = (position.get(link[0]), link[1], position.get(link[2]), link[3])
            if source is None or target is None or target_slot >= len(nodes[target]["inputs"]):
                continue
            self.links.append([self.next_link, ids[source], slot, ids[target], target_slot, link[-1]])
            nodes[target]["inputs"][target_slot]["link"] = self.next_link
            self.next_link += 1
            linked_in.add((target, target_slot))
            linked_out.add((source, slot))
        # The instance's inputs and outputs are its nodes' unlinked ones, node by node, in order.
        exposed_in = [(i, s) for i, n in enumerate(nodes) for s, inp in enumerate(n["inputs"])
                      if (i, s) not in linked_in and "widget" not in inp]
        # "external" lists [index, slot, type] of outputs linked inside that the instance shows as well.
        shown = {(position.get(e[0]), e[1]) for e in definition.get("external") or [] if isinstance(e, list)}
        exposed_out = [(i, s) for i, n in enumerate(inner) for s, _ in enumerate(n.get("outputs") or [])
                       if (i, s) not in linked_out or (i, s) in shown]
        sockets = [inp for inp in instance.get("inputs") or [] if "widget" not in inp]
        for inp, (i, s) in zip(sockets, exposed_in, strict=False):
            if inp.get("link") is not None:
                nodes[i]["inputs"][s]["link"] = inp["link"]
                self.retarget(inp["link"], ids[i], s)
        for inp in instance.get("inputs") or []:  # widgets of the group converted to inputs and linked
            found = self.widget_owner(inp, nodes) if "widget" in inp and inp.get("link") is not None else None
            if found is not None:
                i, name = found
                nodes[i]["inputs"].append({"name": name, "type": inp.get("type"), "link": inp["link"],
                                           "widget": {"name": name}})
                self.retarget(inp["link"], ids[i], len(nodes[i]["inputs"]) - 1)
        outs = {slot: exposed_out[slot] for slot in range(min(len(exposed_out), len(instance.get("outputs") or [])))}
        for link in self.links:
            if link[1] == instance["id"] and link[2] in outs:
                i, s = outs[link[2]]
                link[1], link[2] = ids[i], s
        _spread_widget_values(instance.get("widgets_values"), inner, nodes)
        return nodes


    def retarget(self, link_id: Any, target: str, slot: int) -> None:
        for link in self.links:
            if link[0] == link_id:
                link[3], link[4] = target, slot

    def widget_owner(self, inp: dict[str, Any], nodes: list[dict[str, Any]]) -> tuple[int, str] | None:
        """The inner node and widget a converted input of the instance drives: the editor names it after the
        widget, prefixed with the node's title where several nodes have a widget of that name."""
        wanted = (inp.get("widget") or {}).get("name") or inp.get("name")
        for i, node in enumerate(nodes):
            cls = self.registry.get(node.get("type"))
            for name in cls.widget_names() if cls is not None else ():
                if wanted in (name, f"{node.get('title') or node.get('type')} {name}"):
                    return i, name
        return None


def _spread_widget_values(values: Any, inner: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> None:
    """The instance holds its nodes' widget values one after another: each takes as many as its own list has
    (control values such as "randomize" included). A list of another length is not split: the nodes keep theirs."""
    sizes = [len(n.get("widgets_values") or []) for n in inner]
    if not isinstance(values, list) or len(values) != sum(sizes):
        return
    start = 0
    for node, size in zip(nodes, sizes, strict=True):
        if size:
            node["widgets_values"] = values[start:start + size]
        start += size


def expand_group_nodes(data: dict[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    """The workflow with each group node instance replaced by the nodes of its definition."""
    groups = group_definitions(data)
    expander = _Expander(data, registry)
    nodes: list[dict[str, Any]] = []
    for node in data["nodes"]:
        definition = _definition(node, groups)
        nodes.extend(expander.expand(node, definition) if definition is not None else [node])
    return {**data, "nodes": nodes, "links": expander.links}
