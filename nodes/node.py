"""The base class every node type derives from: a typed declaration plus an `execute` method."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nodes.context import NodeContext
from nodes.spec import InputSpec, OutputSpec


@dataclass
class NodeResult:
    """What `execute` may return instead of a bare tuple: outputs plus data for the UI."""

    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None


@dataclass
class NodeDefinitionError(Exception):
    node: str
    problem: str

    def __str__(self) -> str:
        return f"node type {self.node}: {self.problem}"


class Node:
    """A node type. Declare inputs as class attributes and outputs in `outputs`:

        class AddInt(Node):
            category = "math"
            a = Int(0)
            b = Int(0)
            outputs = (Output("INT", "sum"),)

            def execute(self, a: int, b: int) -> tuple[int]:
                return (a + b,)

    `execute` receives every input by name (unconnected optional inputs are absent) and may use
    `self.ctx` for progress, interrupts and the shared services.
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""
    category: ClassVar[str] = "misc"
    description: ClassVar[str] = ""
    version: ClassVar[int | str] = 1
    output_node: ClassVar[bool] = False
    # A node whose output is not a function of its inputs (e.g. random without a seed).
    cacheable: ClassVar[bool] = True
    outputs: ClassVar[tuple[OutputSpec, ...]] = ()
    # Take every input as a list, in one call, instead of running once per item of a list output.
    input_is_list: ClassVar[bool] = False
    # ComfyUI's accept_all_inputs: constants the node does not declare (widgets its editor extension adds, such as
    # CustomCombo's options) reach `check_inputs`, `check_links` and `execute`, which takes them as **kwargs.
    accept_all_inputs: ClassVar[bool] = False
    inputs: ClassVar[dict[str, InputSpec]] = {}
    python_module: ClassVar[str] = "nodes"

    ctx: NodeContext

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = {k: v for k, v in vars(cls).items() if isinstance(v, InputSpec)}
        if declared or "inputs" not in vars(cls):
            inherited = {k: v for k, v in getattr(cls, "inputs", {}).items()}
            cls.inputs = {**inherited, **declared}
        for key in declared:
            delattr(cls, key)
        if not vars(cls).get("name"):
            cls.name = cls.__name__
        if not vars(cls).get("display_name"):
            cls.display_name = cls.name
        if not vars(cls).get("description"):
            cls.description = inspect.cleandoc(cls.__doc__ or "") if "__doc__" in vars(cls) else ""
        if "python_module" not in vars(cls):
            cls.python_module = cls.__module__

    # --- Hooks a node type may override -------------------------------------------------------

    def execute(self, **inputs: Any) -> tuple[Any, ...] | NodeResult:
        raise NotImplementedError

    def check_lazy_status(self, **inputs: Any) -> list[str] | None:
        """The lazy inputs (`lazy=True`) this call needs, by name, given the values at hand (ComfyUI's hook).

        Called before `execute` with every input: a linked lazy input whose source has not run yet is None. The
        engine runs the sources of the names returned and asks again; once nothing more is asked for, `execute`
        runs, with the lazy inputs never asked for still None. By default no lazy input is ever evaluated.
        """
        return None

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        """Extra cache-key material for state outside the inputs, e.g. the mtime of a named file.

        Called before the run with the node's constant inputs (linked ones are absent). Return
        a JSON-serialisable value; when it changes, the node re-runs.
        """
        return None

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        """Custom validation of the constant inputs; return an error message to refuse them."""
        return None

    @classmethod
    def output_facts(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Cheap facts about the outputs, known before the run, for the `check_links` of the nodes they feed.

        E.g. a checkpoint loader reads its file's header and says `{"family": "sd1"}` of its MODEL
        and CLIP. Called at validation in graph order with the constant inputs and, in `linked`,
        the facts of each linked input's source output (empty when it said nothing). Returns facts
        by output index; must not load anything heavy.
        """
        return {}

    @classmethod
    def check_links(cls, inputs: dict[str, Any], linked: dict[str, dict[str, Any]]) -> str | None:
        """Custom validation against what the linked inputs will carry (see `output_facts`);
        return an error message to refuse the node before anything runs."""
        return None

    # --- Schema -------------------------------------------------------------------------------

    @classmethod
    def object_info(cls) -> dict[str, Any]:
        """The `/object_info` entry (REFERENCE.md section 4)."""
        required: dict[str, Any] = {}
        optional: dict[str, Any] = {}
        hidden: dict[str, Any] = {}
        for key, spec in cls.inputs.items():
            group = hidden if spec.hidden else optional if spec.optional else required
            group[key] = spec.object_info()
        inputs: dict[str, Any] = {"required": required, "optional": optional}
        order: dict[str, list[str]] = {"required": list(required), "optional": list(optional)}
        if hidden:
            inputs["hidden"] = hidden
            order["hidden"] = list(hidden)
        return {
            "name": cls.name,
            "display_name": cls.display_name,
            "category": cls.category,
            "description": cls.description,
            "python_module": cls.python_module,
            "output_node": cls.output_node,
            "input": inputs,
            "input_order": order,
            "output": [o.type for o in cls.outputs],
            "output_is_list": [o.is_list for o in cls.outputs],
            "output_name": [o.display_name for o in cls.outputs],
            "output_tooltips": [o.tooltip or "" for o in cls.outputs],
        }

    @classmethod
    def widgets_from_ui(cls, values: list[Any]) -> dict[str, Any] | None:
        """The inputs a UI-format file's `widgets_values` list holds, by name, for a node whose editor extension
        adds widgets of its own; None (the default): the values follow `widget_names` by position."""
        return None

    @classmethod
    def widget_names(cls) -> list[str]:
        """Inputs that the editor shows as widgets, in declaration order (required, then optional)."""
        visible = [(k, s) for k, s in cls.inputs.items() if not s.hidden]
        ordered = [k for k, s in visible if not s.optional] + [k for k, s in visible if s.optional]
        return [k for k in ordered if cls.inputs[k].is_widget]


@dataclass
class NodeInfo:
    """A registered node type and where it came from (for error messages and `nodes --plugins`)."""

    cls: type[Node]
    source: str
    extras: dict[str, Any] = field(default_factory=dict)
