"""List outputs (one value per item) and running a node once per item, as ComfyUI node packs expect."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nodes.spec import OutputSpec


class ItemList(list):
    """An output that holds one value per item: a node fed by it runs once per item.

    The executor wraps outputs declared `is_list` (and every output of a node that ran per item)
    in this type, so the marker survives the output cache. Node code never sees it: a node that
    takes lists gets plain lists, any other node gets the items one at a time.
    """


def calls_for(inputs: dict[str, Any], takes_lists: bool) -> tuple[list[dict[str, Any]], bool]:
    """The keyword arguments of each call of a node, and whether it runs per item.

    A node that takes lists runs once with every input as a list (a single value becomes a list
    of one). Any other node runs once per item of its longest list input; shorter lists repeat
    their last item, and an empty list input means the node does not run at all.
    """
    if takes_lists:
        return [{k: list(v) if isinstance(v, ItemList) else [v] for k, v in inputs.items()}], False
    lists = {k: v for k, v in inputs.items() if isinstance(v, ItemList)}
    if not lists:
        return [inputs], False
    count = 0 if any(not v for v in lists.values()) else max(len(v) for v in lists.values())
    calls = [{**inputs, **{k: v[min(i, len(v) - 1)] for k, v in lists.items()}} for i in range(count)]
    return calls, True


def merge_outputs(specs: Sequence[OutputSpec], results: list[tuple[Any, ...]], per_item: bool) -> tuple[Any, ...]:
    """Join the outputs of a node's calls: list outputs are concatenated, others collected per call."""
    for outputs in results:
        for spec, value in zip(specs, outputs, strict=True):
            if spec.is_list and not isinstance(value, list | tuple):
                raise TypeError(f"output {spec.display_name} is declared a list but got {type(value).__name__}")
    if not per_item:
        return tuple(ItemList(v) if s.is_list else v for s, v in zip(specs, results[0], strict=True))
    merged: list[ItemList] = [ItemList() for _ in specs]
    for outputs in results:
        for column, spec, value in zip(merged, specs, outputs, strict=True):
            if spec.is_list:
                column.extend(value)
            else:
                column.append(value)
    return tuple(merged)


def merge_ui(uis: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One UI document for several calls: the lists under each key are concatenated."""
    present = [ui for ui in uis if ui]
    if len(present) <= 1:
        return present[0] if present else None
    merged: dict[str, Any] = {}
    for ui in present:
        for key, value in ui.items():
            items = value if isinstance(value, list | tuple) else [value]
            merged.setdefault(key, []).extend(items)
    return merged
