"""Console progress for `main.py run`: one line per node, a bar for nodes that report steps."""

from __future__ import annotations

import sys

from tqdm import tqdm

from executor import events as ev


class ConsoleProgress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._node = ""

    def __call__(self, event: ev.Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, ev.ExecutionCached) and event.nodes:
            print(f"cached: {', '.join(event.nodes)}", file=sys.stderr)
        elif isinstance(event, ev.Executing):
            self.close()
            self._node = f"{event.node} {event.class_type}"
            print(f"running node {self._node}", file=sys.stderr)
        elif isinstance(event, ev.Progress):
            if self._bar is None or self._bar.total != event.max:
                self.close()
                self._bar = tqdm(total=event.max, desc=self._node, file=sys.stderr, leave=False)
            self._bar.n = event.value
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
