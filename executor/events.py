"""Typed events of a run. The CLI and the server subscribe to the same ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


@dataclass
class Event:
    # The websocket message type of REFERENCE.md section 5.
    kind: ClassVar[str] = ""
    prompt_id: str

    def data(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExecutionStart(Event):
    kind: ClassVar[str] = "execution_start"


@dataclass
class ExecutionCached(Event):
    kind: ClassVar[str] = "execution_cached"
    nodes: list[str] = field(default_factory=list)


@dataclass
class Executing(Event):
    """A node started (ComfyUI sends `executing` with node null when the prompt is done)."""

    kind: ClassVar[str] = "executing"
    node: str | None = None
    class_type: str = ""


@dataclass
class Progress(Event):
    kind: ClassVar[str] = "progress"
    node: str = ""
    value: int = 0
    max: int = 0
    # A preview of the work in progress (e.g. a latent), for the server to turn into an image.
    preview: Any = field(default=None, repr=False)

    def data(self) -> dict[str, Any]:
        return {"prompt_id": self.prompt_id, "node": self.node, "value": self.value, "max": self.max}


@dataclass
class Executed(Event):
    kind: ClassVar[str] = "executed"
    node: str = ""
    class_type: str = ""
    output: dict[str, Any] | None = None
    cached: bool = False
    duration_s: float = 0.0


@dataclass
class ExecutionSuccess(Event):
    kind: ClassVar[str] = "execution_success"
    duration_s: float = 0.0
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)


@dataclass
class ExecutionError(Event):
    kind: ClassVar[str] = "execution_error"
    node_id: str = ""
    node_type: str = ""
    exception_type: str = ""
    exception_message: str = ""
    traceback: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)


@dataclass
class ExecutionInterrupted(Event):
    kind: ClassVar[str] = "execution_interrupted"
    node_id: str | None = None
    node_type: str = ""
    executed: list[str] = field(default_factory=list)
