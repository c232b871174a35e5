"""A workflow as the editor opens it: subgraphs and group nodes expanded in place, missing node types sorted."""

from __future__ import annotations

from typing import Any

from graph.group_nodes import PREFIXES, expand_group_nodes, group_definitions
from graph.subgraphs import BYPASSED, MUTED, flatten_subgraphs, has_subgraphs
from graph.ui_format import CONTROL_VALUES, SEED_NAMES, VIRTUAL_TYPES, is_ui_format
from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
from nodes.registry import NodeRegistry

DEFAULT_SIZE = (300.0, 120.0)
GAP = 40.0  # between an expanded block and what it pushes aside
Rect = tuple[float, float, float, float]


def _pair(value: Any, default: tuple[float, float] | None) -> tuple[float, float] | None:
    if isinstance(value, dict):  # older files store {"0": x, "1": y}
        value = [value.get("0"), value.get("1")]
    if isinstance(value, list | tuple) and len(value) >= 2 and all(isinstance(v, int | float) for v in value[:2]):
        return float(value[0]), float(value[1])
    return default


def _flat_id(value: Any) -> Any:
    """The flattener writes every id as text; plain numbers go back to numbers, as the editor numbers nodes."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


class _Placer:
    """Where each expanded node goes: a definition's own layout, moved to where its instance stood; what stood
    right of or below the instance moves aside by as much as the expansion grew."""

    def __init__(self, data: dict[str, Any]) -> None:
        subgraphs = (data.get("definitions") or {}).get("subgraphs") or [] if has_subgraphs(data) else []
        self.subgraphs = {d["id"]: d for d in subgraphs if isinstance(d, dict) and "id" in d}
        self.groups = group_definitions(data)
        self.pos: dict[str, tuple[float, float]] = {}
        self.size: dict[str, tuple[float, float]] = {}
        self.labels: dict[str, str] = {}  # flat prefix "11:" -> "Subgraph name", nested ones "Outer › Inner"
        self.instances: list[dict[str, Any]] = []  # the top level's, for the notice and the frames

    def definition(self, node: dict[str, Any], top: bool) -> tuple[str, str, list[tuple[str, dict[str, Any]]]] | None:
        """(kind, name, inner nodes with their local ids) when the node is an instance."""
        kind = node.get("type")
        if kind in self.subgraphs:
            found = self.subgraphs[kind]
            return "subgraph", str(found.get("name") or kind), [(str(n.get("id")), n) for n in found.get("nodes") or []]
        for prefix in PREFIXES if top and isinstance(kind, str) else ():
            if kind.startswith(prefix) and kind[len(prefix):] in self.groups:
                inner = sorted(self.groups[kind[len(prefix):]].get("nodes") or [], key=lambda n: n.get("index", 0))
                return "group node", kind[len(prefix):], [(str(n.get("index", i)), n) for i, n in enumerate(inner)]
        return None

    def place(self, nodes: list[tuple[str, dict[str, Any]]], prefix: str, label: str, top: bool) -> Rect:
        """Lay out one level (local ids with nodes) in its own coordinates; returns its bounding box."""
        items = []  # (original rect, grown rect, flat ids)
        for index, (local, node) in enumerate(nodes):
            size = _pair(node.get("size"), DEFAULT_SIZE)
            x, y = _pair(node.get("pos"), (index * 340.0, 0.0))
            found = self.definition(node, top)
            if found is None:
                self.pos[f"{prefix}{local}"], self.size[f"{prefix}{local}"] = (x, y), size
                items.append(((x, y, *size), (x, y, *size), [f"{prefix}{local}"]))
                continue
            kind, name, inner = found
            inner_prefix = f"{prefix}{local}:"
            title = node.get("title") or name
            self.labels[inner_prefix] = f"{label} › {title}" if label else title
            first = len(self.pos)
            bx, by, bw, bh = self.place(inner, inner_prefix, self.labels[inner_prefix], False)
            moved = list(self.pos)[first:]
            for flat in moved:  # the block's top-left corner where the instance's was
                px, py = self.pos[flat]
                self.pos[flat] = (px - bx + x, py - by + y)
            items.append(((x, y, *size), (x, y, bw, bh), moved))
            if top:
                self.instances.append({"id": _flat_id(local), "kind": kind, "name": name, "title": title,
                                       "nodes": len(moved), "mode": node.get("mode") or 0})
        self.push_aside(items)
        flats = [f for _, _, moved in items for f in moved]
        if not flats:
            return 0.0, 0.0, *DEFAULT_SIZE
        left, top_y = min(self.pos[f][0] for f in flats), min(self.pos[f][1] for f in flats)
        right = max(self.pos[f][0] + self.size[f][0] for f in flats)
        bottom = max(self.pos[f][1] + self.size[f][1] for f in flats)
        return left, top_y, right - left, bottom - top_y

    def push_aside(self, items: list[tuple[Rect, Rect, list[str]]]) -> None:
        shifts = [[0.0, 0.0] for _ in items]
        for original, grown, _ in items:
            dw, dh = grown[2] - original[2], grown[3] - original[3]
            ox, oy, ow, oh = original
            for i, (other, _, _) in enumerate(items):
                if dw > 0 and other[0] >= ox + ow - 1:
                    shifts[i][0] += dw + GAP
                elif dh > 0 and other[1] >= oy + oh - 1 and other[0] < ox + grown[2] and other[0] + other[2] > ox:
                    shifts[i][1] += dh + GAP
        for (_, _, flats), (sx, sy) in zip(items, shifts, strict=True):
            for flat in flats:
                self.pos[flat] = (self.pos[flat][0] + sx, self.pos[flat][1] + sy)


def _parse_widgets(cls: Any, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Values by widget name, and the control words ("randomize"...) that follow some, as the server reads them."""
    values: dict[str, Any] = {}
    controls: dict[str, Any] = {}
    if isinstance(raw, dict):
        return {k: v for k, v in raw.items() if k in cls.inputs}, controls
    raw, position = raw if isinstance(raw, list) else [], 0
    for name in cls.widget_names():
        if position >= len(raw):
            break
        values[name], position = raw[position], position + 1
        spec = cls.inputs[name]
        if _has_control(name, spec) and position < len(raw) and raw[position] in CONTROL_VALUES:
            controls[name], position = raw[position], position + 1
        if spec.image_upload and position < len(raw) and raw[position] in ("image", "upload"):
            position += 1
    return values, controls


def _has_control(name: str, spec: Any) -> bool:
    return spec.control_after_generate or (name in SEED_NAMES and spec.type == "INT")


def _widgets_values(cls: Any, raw: Any, changes: dict[str, Any]) -> list[Any]:
    """The node's widgets_values in the editor's order (a seed's control word, an upload button's "image"), with
    `changes` applied: values a subgraph instance promoted, which the editor's nodes cannot hold apart."""
    values, controls = _parse_widgets(cls, raw)
    changes = dict(changes)
    # A promoted seed's control word comes as a widget of its own, named so (ComfyUI's proxyWidgets entry).
    promoted_control = changes.pop("control_after_generate", None)
    values.update(changes)
    out: list[Any] = []
    for name in cls.widget_names():
        spec = cls.inputs[name]
        out.append(values.get(name, spec.default))
        if _has_control(name, spec):
            out.append(promoted_control or controls.get(name, "fixed"))
        if spec.image_upload:
            out.append("image")
    return out


def _fold_constants(nodes: list[dict[str, Any]], links: list[list[Any]], registry: NodeRegistry) -> None:
    """Put the values the flattener carries in PrimitiveNodes of its own (promoted widgets) into the widgets they
    drive, and the instances' promoted values (widget_overrides) into widgets_values, which the editor keeps."""
    by_id = {str(n["id"]): n for n in nodes}
    folded: set[str] = set()
    changes: dict[str, dict[str, Any]] = {}
    for link in links:
        origin, target = by_id.get(str(link[1])), by_id.get(str(link[3]))
        if origin is None or target is None or origin.get("type") != "PrimitiveNode":
            continue
        inputs = target.get("inputs") or []
        inp = inputs[link[4]] if link[4] < len(inputs) else {}
        if str(origin["id"]) != f"{target['id']}:{inp.get('name')}" or registry.get(target["type"]) is None:
            continue  # a PrimitiveNode of the user's own: the editor shows it
        changes.setdefault(str(target["id"]), {})[inp["name"]] = (origin.get("widgets_values") or [None])[0]
        inp["link"] = None
        folded.add(str(origin["id"]))
    for node in nodes:
        overrides = node.pop("widget_overrides", None) or {}
        mine = {**overrides, **changes.get(str(node["id"]), {})}
        cls = registry.get(node.get("type"))
        if mine and cls is not None:
            node["widgets_values"] = _widgets_values(cls, node.get("widgets_values"), mine)
    nodes[:] = [n for n in nodes if str(n["id"]) not in folded]
    links[:] = [link for link in links if str(link[1]) not in folded]


def _relink(nodes: list[dict[str, Any]], links: list[list[Any]]) -> None:
    """Each output's list of links, from the link table: definitions' nodes still list their inner ones."""
    outgoing: dict[tuple[Any, int], list[Any]] = {}
    for link in links:
        outgoing.setdefault((link[1], link[2]), []).append(link[0])
    for node in nodes:
        for slot, out in enumerate(node.get("outputs") or []):
            out["links"] = outgoing.get((node["id"], slot), [])


def _place_unplaced(nodes: list[dict[str, Any]], links: list[list[Any]]) -> None:
    """A node the flattener made (a value nothing here could fold in) goes left of the node it feeds."""
    by_id = {n["id"]: n for n in nodes}
    for link in links:
        origin, target = by_id.get(link[1]), by_id.get(link[3])
        if origin is not None and "pos" not in origin and target is not None and "pos" in target:
            origin["pos"] = [target["pos"][0] - 260, target["pos"][1]]


def missing_types(types: Any, registry: NodeRegistry) -> dict[str, str]:
    """Node types this server lacks: "built-in" (one of ComfyUI's own, not in Loom yet) or "custom" (a plugin's)."""
    return {t: "built-in" if t in COMFY_CORE_NODES_MISSING else "custom" for t in sorted(set(types))
            if isinstance(t, str) and t not in registry and t not in VIRTUAL_TYPES}


def _frames(placer: _Placer, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A titled frame (litegraph group) around each expanded instance's nodes, saying where they came from."""
    frames = []
    for instance in placer.instances:
        inner = [n for n in nodes if str(n["id"]).startswith(f"{instance['id']}:") and "pos" in n]
        if not inner:
            continue
        xs = [n["pos"][0] for n in inner] + [n["pos"][0] + _pair(n.get("size"), DEFAULT_SIZE)[0] for n in inner]
        ys = [n["pos"][1] for n in inner] + [n["pos"][1] + _pair(n.get("size"), DEFAULT_SIZE)[1] for n in inner]
        left, top = min(xs) - 20, min(ys) - 80
        frames.append({"title": f"{instance['title']} ({instance['kind']}, expanded)", "color": "#3f5f7f",
                       "bounding": [left, top, max(xs) + 20 - left, max(ys) + 20 - top], "font_size": 20})
    return frames


def expand_for_editor(data: dict[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    """{"workflow": the graph to show, "expanded": the instances expanded, "missing": {type: kind}}.

    A UI-format workflow's subgraph and group node instances become their nodes, with the ids ComfyUI runs them
    under ("11:3"), titles that name where they came from, and places near their instance; queued from the
    editor, it runs the prompt `main.py run` makes of the file. Other workflows come back as they are."""
    if not is_ui_format(data):
        types = [n.get("class_type") for n in data.values() if isinstance(n, dict)]
        return {"workflow": data, "expanded": [], "missing": missing_types(types, registry)}
    if not (group_definitions(data) or has_subgraphs(data)):
        return {"workflow": data, "expanded": [],
                "missing": missing_types([n.get("type") for n in data["nodes"] if isinstance(n, dict)], registry)}
    placer = _Placer(data)
    placer.place([(str(n.get("id")), n) for n in data["nodes"]], "", "", True)
    # A muted or bypassed instance is expanded too, its nodes muted or bypassed one by one (as a group node's
    # are), so that they stay in view and can be switched back on.
    off = {str(i["id"]): i["mode"] for i in placer.instances if i["mode"] in (MUTED, BYPASSED)}
    flat = {**data, "nodes": [{**n, "mode": 0} if str(n.get("id")) in off else n for n in data["nodes"]]}
    flat = expand_group_nodes(flat, registry) if group_definitions(flat) else flat
    flat = flatten_subgraphs(flat) if has_subgraphs(flat) else flat
    nodes = [{**n, "inputs": [dict(i) for i in n.get("inputs") or []],
              "outputs": [dict(o) for o in n.get("outputs") or []]} for n in flat["nodes"]]
    links = [list(link) for link in flat["links"]]
    _fold_constants(nodes, links, registry)
    for node in nodes:
        flat_id = str(node["id"])
        node["id"] = _flat_id(flat_id)
        if flat_id in placer.pos:
            node["pos"] = list(placer.pos[flat_id])
        prefix = flat_id[:flat_id.rfind(":") + 1]
        if flat_id.split(":")[0] in off and prefix and not node.get("mode"):
            node["mode"] = off[flat_id.split(":")[0]]
        if prefix in placer.labels:
            cls = registry.get(node.get("type"))
            own = node.get("title") or (cls.display_name if cls else node.get("type"))
            node["title"] = f"{placer.labels[prefix]} › {own}"
    for link in links:
        link[1], link[3] = _flat_id(str(link[1])), _flat_id(str(link[3]))
    _relink(nodes, links)
    _place_unplaced(nodes, links)
    extra = {k: v for k, v in (data.get("extra") or {}).items() if k != "groupNodes"}
    numbers = [n["id"] for n in nodes if isinstance(n["id"], int)]
    workflow = {**data, "nodes": nodes, "links": links, "definitions": {}, "extra": extra,
                "groups": list(data.get("groups") or []) + _frames(placer, nodes),
                "last_node_id": max(numbers, default=0), "last_link_id": max((link[0] for link in links), default=0)}
    return {"workflow": workflow, "expanded": placer.instances,
            "missing": missing_types([n.get("type") for n in nodes], registry)}
