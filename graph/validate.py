"""Validation of a workflow against the node registry: every problem at once, before anything runs."""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from graph import errors as E
from graph.document import BadLink, Graph, GraphNode, Link
from nodes.comfy_compat import COMFY_CORE_NODES_MISSING
from nodes.node import Node
from nodes.registry import NodeRegistry
from nodes.spec import ANY_TYPE, InputSpec


@dataclass
class ValidatedWorkflow:
    """A workflow checked against a registry: what to run, in which order, with which constants."""

    graph: Graph
    problems: list[E.Problem]
    outputs: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    # For each node with a problem, the output nodes that need it (ComfyUI's `dependent_outputs`).
    dependents: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def error_response(self) -> dict[str, Any]:
        """The 400 body of POST /prompt for this workflow's problems."""
        return E.error_response(self.problems, self.dependents)


class _BadValue(Exception):
    pass


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _BadValue
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            number = _to_float(value)
            if number.is_integer():
                return int(number)
    raise _BadValue


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _BadValue
    try:
        number = float(value) if isinstance(value, int | float | str) else math.nan
    except ValueError:
        raise _BadValue from None
    if not math.isfinite(number):
        raise _BadValue
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _BadValue


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _BadValue


_COERCE = {"INT": _to_int, "FLOAT": _to_float, "BOOLEAN": _to_bool, "STRING": _to_str}


def types_match(output_type: str, input_type: str) -> bool:
    if output_type == input_type or ANY_TYPE in (output_type, input_type):
        return True
    if input_type == "COMBO":
        return output_type in ("COMBO", "STRING")
    return output_type in input_type.split(",")


class _Checker:
    def __init__(self, graph: Graph, registry: NodeRegistry) -> None:
        self.graph = graph
        self.registry = registry
        self.problems: list[E.Problem] = []

    def add(self, type_: str, message: str, node: GraphNode | None = None, input_name: str | None = None,
            details: str = "", **extra: Any) -> None:
        self.problems.append(
            E.Problem(type_, message, node.id if node else None, node.class_type if node else None,
                      input_name, details, extra)
        )

    def check_link(self, node: GraphNode, name: str, spec: InputSpec, link: Link) -> None:
        source = self.graph.nodes.get(link.node)
        if source is None:
            self.add(E.BAD_LINKED_INPUT, "Linked node does not exist", node, name,
                     f"input '{name}' links to node {link.node!r}, which is not in the workflow")
            return
        source_cls = self.registry.get(source.class_type)
        if source_cls is None:
            return  # reported as an unknown type on the source node
        if not 0 <= link.output < len(source_cls.outputs):
            self.add(E.BAD_LINKED_INPUT, "Linked output does not exist", node, name,
                     f"node {link.node} ({source.class_type}) has {len(source_cls.outputs)} outputs; "
                     f"input '{name}' asks for output {link.output}")
            return
        output_type = source_cls.outputs[link.output].type
        if not types_match(output_type, spec.type):
            self.add(E.RETURN_TYPE_MISMATCH, "Return type mismatch between linked nodes", node, name,
                     f"input '{name}' expects {spec.type}, but node {link.node} ({source.class_type}) "
                     f"output {link.output} is {output_type}",
                     received_type=output_type, expected_type=spec.type)

    def check_constant(self, node: GraphNode, name: str, spec: InputSpec, value: Any) -> Any:
        if spec.checked_by_node:
            return value
        if spec.type == "COMBO":
            choices = spec.current_choices()
            if value not in choices and spec.choices_where and isinstance(value, str):
                # A file name saved on Windows ("SD15\\canny.safetensors") names the file listed as "SD15/...".
                normalized = value.replace("\\", "/")
                if normalized in choices:
                    return normalized
            if value not in choices:
                shown = ", ".join(map(str, choices[:20])) + (" ..." if len(choices) > 20 else "")
                where = f" (the files in {spec.choices_where()})" if spec.choices_where else ""
                self.add(E.VALUE_NOT_IN_LIST, "Value not in list", node, name,
                         f"{name}: {value!r} is not one of [{shown}]{where}", received_value=value)
            return value
        coerce = _COERCE.get(spec.type)
        if coerce is None:
            if spec.type == ANY_TYPE:
                return value
            self.add(E.INVALID_INPUT_TYPE, "Input must be linked", node, name,
                     f"input '{name}' of type {spec.type} takes a link to another node's output, "
                     f"not the constant {value!r}")
            return value
        try:
            coerced = coerce(value)
        except _BadValue:
            self.add(E.INVALID_INPUT_TYPE, "Failed to convert an input value to a "
                     f"{spec.type} value", node, name, f"{name}: {value!r} is not a valid {spec.type}",
                     received_value=value)
            return value
        if spec.min is not None and isinstance(coerced, int | float) and coerced < spec.min:
            self.add(E.VALUE_TOO_SMALL, f"Value {coerced} smaller than min of {spec.min}", node, name,
                     f"{name}: {coerced} < {spec.min}", received_value=coerced)
        if spec.max is not None and isinstance(coerced, int | float) and coerced > spec.max:
            self.add(E.VALUE_TOO_BIG, f"Value {coerced} bigger than max of {spec.max}", node, name,
                     f"{name}: {coerced} > {spec.max}", received_value=coerced)
        return coerced

    def check_node(self, node: GraphNode, cls: type[Node]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        before = len(self.problems)
        for name, spec in cls.inputs.items():
            if spec.hidden:
                continue
            value = node.inputs.get(name)
            if name not in node.inputs or value is None and spec.type not in (ANY_TYPE, "STRING"):
                if not spec.optional:
                    self.add(E.REQUIRED_INPUT_MISSING, "Required input is missing", node, name, name)
                continue
            if isinstance(value, BadLink):
                self.add(E.BAD_LINKED_INPUT, "Bad linked input, must be a length-2 list of "
                         "[node_id, output_index]", node, name,
                         f"{name}: {value.raw!r} (wrap a list constant as {{\"__value__\": [...]}})")
            elif isinstance(value, Link):
                self.check_link(node, name, spec, value)
            else:
                values[name] = self.check_constant(node, name, spec, value)
        if cls.accept_all_inputs:  # the constants of inputs it does not declare, for its own checks (see Node)
            values.update((name, value) for name, value in node.inputs.items()
                          if name not in cls.inputs and not isinstance(value, Link | BadLink))
        if not _takes_any_input(cls):
            # A link into an input the node does not declare (an old input name, such as the opt_hooks of ComfyUI's
            # first hook nodes) would reach its execute as an unexpected argument: named here, before anything runs.
            for name, value in node.inputs.items():
                if name not in cls.inputs and isinstance(value, Link):
                    declared = ", ".join(n for n, s in cls.inputs.items() if not s.hidden)
                    self.add(E.BAD_LINKED_INPUT, "Linked input is not an input of this node", node, name,
                             f"{name}: {node.class_type} has no input of this name (its inputs: {declared})")
        if len(self.problems) == before:
            try:
                message = cls.check_inputs(values)
            except Exception as exc:  # a node's (or plugin's) own check failing is a problem of that node, not a 500
                message = f"{cls.__name__} could not check its inputs: {type(exc).__name__}: {exc}"
            if message:
                self.add(E.CUSTOM_VALIDATION_FAILED, "Custom validation failed for node", node, None, message)
        return values


def _takes_any_input(cls: type[Node]) -> bool:
    """Whether the node's execute takes inputs it does not declare (**kwargs: classic ComfyUI nodes, whose classes
    may take dynamic inputs)."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.execute).parameters.values())


def _needed_nodes(graph: Graph, outputs: list[str]) -> list[str]:
    """Output nodes and everything they link to, transitively (ids of existing nodes only)."""
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        for link in graph.nodes[node_id].links().values():
            if link.node in graph.nodes and link.node not in seen:
                stack.append(link.node)
    return [nid for nid in graph.nodes if nid in seen]


def _check_links(checker: _Checker, order: list[str], values: dict[str, dict[str, Any]]) -> None:
    """Pass each node's declared output facts downstream, in graph order, and let nodes judge them
    (e.g. a LoRA for another model family than the checkpoint it is applied to)."""
    facts: dict[tuple[str, int], dict[str, Any]] = {}
    clean = {nid for nid in order if not any(p.node_id == nid for p in checker.problems)}
    for nid in order:
        node = checker.graph.nodes[nid]
        cls = checker.registry.get(node.class_type)
        if cls is None or nid not in clean:
            continue
        linked = {name: facts.get((link.node, link.output), {}) for name, link in node.links().items()}
        try:
            message = cls.check_links(values[nid], linked)
            found = {} if message else cls.output_facts(values[nid], linked) or {}
        except Exception as exc:  # e.g. a model file that is not one (CheckpointError): that node's problem, not a 500
            message = f"{type(exc).__name__}: {exc}"
        if message:
            checker.add(E.CUSTOM_VALIDATION_FAILED, "Custom validation failed for node", node, None, message)
            continue
        for index, output_facts in found.items():
            facts[(nid, index)] = output_facts


def validate(graph: Graph, registry: NodeRegistry, outputs: list[str] | None = None) -> ValidatedWorkflow:
    """Check a workflow and plan its run (with old node ids under their new ones, and the seeds GlobalSeedNodes
    set); `outputs` restricts the run to some output nodes."""
    graph = graph.with_current_ids(registry).with_global_seeds()
    checker = _Checker(graph, registry)
    for node in graph.nodes.values():
        if node.class_type not in registry:
            if node.class_type in COMFY_CORE_NODES_MISSING or node.meta.get("cnr_id") == "comfy-core":
                hint = "; it is one of ComfyUI's built-in nodes, which Loom does not provide yet"
            else:
                close = difflib.get_close_matches(node.class_type, list(registry), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                hint += "; a custom node pack in custom_nodes/ may provide it"
            checker.add(E.INVALID_PROMPT, f"Cannot execute because node {node.class_type} does not exist.",
                        node, None, f"Node ID '#{node.id}'{hint}")

    if outputs is None:
        outputs = [nid for nid, n in graph.nodes.items() if (cls := registry.get(n.class_type)) and cls.output_node]
    else:
        for nid in outputs:
            if nid not in graph.nodes:
                checker.add(E.INVALID_PROMPT, f"Requested output node {nid!r} is not in the workflow")
        outputs = [nid for nid in outputs if nid in graph.nodes]
    if not outputs:
        checker.add(E.NO_OUTPUTS, "Prompt has no outputs",
                    details="add an output node such as SaveImage, PreviewImage or PreviewAny")
        return ValidatedWorkflow(graph, checker.problems)

    needed = _needed_nodes(graph, outputs)
    values: dict[str, dict[str, Any]] = {}
    dag = nx.DiGraph()
    dag.add_nodes_from(needed)
    for nid in needed:
        node = graph.nodes[nid]
        cls = registry.get(node.class_type)
        if cls is not None:
            values[nid] = checker.check_node(node, cls)
        dag.add_edges_from((link.node, nid) for link in node.links().values() if link.node in graph.nodes)

    order: list[str] = []
    try:
        order = list(nx.topological_sort(dag))
    except nx.NetworkXUnfeasible:
        for component in nx.strongly_connected_components(dag):
            members = sorted(component)
            if len(members) == 1 and not dag.has_edge(members[0], members[0]):
                continue
            for nid in members:
                checker.add(E.DEPENDENCY_CYCLE, "Dependency cycle", graph.nodes[nid], None,
                            "nodes " + " -> ".join(members) + " depend on each other", cycle=members)
    if order:
        _check_links(checker, order, values)
    failing = {p.node_id for p in checker.problems if p.node_id in dag}
    needs = {out: nx.ancestors(dag, out) | {out} for out in outputs} if failing else {}
    dependents = {nid: [out for out in outputs if nid in needs[out]] for nid in failing}
    return ValidatedWorkflow(graph, checker.problems, outputs, order, values, dependents)
