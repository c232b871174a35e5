"""Validation problems as data, and their ComfyUI-compatible answer shape (REFERENCE.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INVALID_PROMPT = "invalid_prompt"
NO_OUTPUTS = "prompt_no_outputs"
REQUIRED_INPUT_MISSING = "required_input_missing"
BAD_LINKED_INPUT = "bad_linked_input"
RETURN_TYPE_MISMATCH = "return_type_mismatch"
INVALID_INPUT_TYPE = "invalid_input_type"
VALUE_TOO_SMALL = "value_smaller_than_min"
VALUE_TOO_BIG = "value_bigger_than_max"
VALUE_NOT_IN_LIST = "value_not_in_list"
CUSTOM_VALIDATION_FAILED = "custom_validation_failed"
DEPENDENCY_CYCLE = "dependency_cycle"


@dataclass(frozen=True)
class Problem:
    type: str
    message: str
    node_id: str | None = None
    class_type: str | None = None
    input_name: str | None = None
    details: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        extra = dict(self.extra)
        if self.input_name is not None:
            extra.setdefault("input_name", self.input_name)
        return {"type": self.type, "message": self.message, "details": self.details, "extra_info": extra}

    def __str__(self) -> str:
        node = self.node_id or "''"  # an empty id is still a node's
        where = "workflow" if self.node_id is None else f"node {node} ({self.class_type})"
        if self.input_name:
            where += f", input '{self.input_name}'"
        detail = f": {self.details}" if self.details else ""
        return f"{where}: {self.message}{detail} [{self.type}]"


def error_response(problems: list[Problem], dependents: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The 400 body of POST /prompt: a top-level error plus errors grouped by node, each with the output
    nodes that need that node (`dependents`)."""
    node_errors: dict[str, Any] = {}
    general = [p for p in problems if p.node_id is None]
    for p in problems:
        if p.node_id is None:
            continue
        entry = node_errors.setdefault(
            p.node_id, {"class_type": p.class_type, "errors": [],
                        "dependent_outputs": list((dependents or {}).get(p.node_id, []))}
        )
        entry["errors"].append(p.to_dict())
    # An unknown node type is the document's fault (ComfyUI answers invalid_prompt for it).
    invalid = [p for p in problems if p.type == INVALID_PROMPT]
    if invalid or general:
        top = (invalid or general)[0]
        error = {"type": top.type, "message": top.message, "details": top.details, "extra_info": {}}
    else:
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "; ".join(str(p) for p in problems[:5]),
            "extra_info": {},
        }
    return {"error": error, "node_errors": node_errors}
