"""What a running node can reach: progress reporting, interrupt checks and shared services."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Interrupted(Exception):
    """Raised inside a node when the user stopped the run."""


def _never() -> bool:
    return False


def _ignore(value: int, total: int, preview: Any) -> None:
    return None


@dataclass
class NodeContext:
    node_id: str = ""
    prompt_id: str = ""
    services: Any = None
    report: Callable[[int, int, Any], None] = _ignore
    interrupted: Callable[[], bool] = _never
    extra: dict[str, Any] = field(default_factory=dict)

    def check_interrupt(self) -> None:
        if self.interrupted():
            raise Interrupted(f"interrupted in node {self.node_id}")

    def progress(self, value: int, total: int, preview: Any = None) -> None:
        """Report progress (`value` of `total`) and stop here if the run was interrupted."""
        self.check_interrupt()
        self.report(value, total, preview)
