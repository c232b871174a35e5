"""The queue and history in SQLite: one row per prompt, from pending to running to a finished record.

Crash rule: a prompt found `running` when the store opens was cut off by a crash or a kill. It is
put back at the head of the queue and run once more; if it was already re-run once (it has been
started twice), it is finished as an error whose message says the server stopped during its run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MAX_ATTEMPTS = 2
CRASH_MESSAGE = "the server stopped while this prompt was running"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    id TEXT PRIMARY KEY,
    number REAL NOT NULL,
    state TEXT NOT NULL,              -- pending | running | done
    prompt TEXT NOT NULL,             -- API-format JSON
    extra_data TEXT NOT NULL,
    outputs_to_execute TEXT NOT NULL,
    client_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    status_str TEXT,                  -- success | error | interrupted (when done)
    outputs TEXT,
    messages TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS prompts_state_number ON prompts (state, number);
CREATE INDEX IF NOT EXISTS prompts_finished ON prompts (state, finished_at);
"""

# Queue positions are floats; from 2^53 on they lose integer precision (and past 2^63 overflow SQLite).
MAX_NUMBER = 2.0**53


@dataclass
class PromptRecord:
    id: str
    number: float
    state: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    client_id: str | None
    attempts: int = 0
    queued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    status_str: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    messages: list[Any] = field(default_factory=list)
    error: dict[str, Any] | None = None

    @property
    def display_number(self) -> int | float:
        return int(self.number) if float(self.number).is_integer() else self.number

    def queue_entry(self) -> list[Any]:
        """`[number, prompt_id, prompt, extra_data, outputs_to_execute]` as ComfyUI lists queue items."""
        return [self.display_number, self.id, self.prompt, self.extra_data, self.outputs_to_execute]

    def history_entry(self) -> dict[str, Any]:
        duration = (self.finished_at - self.started_at) if self.finished_at and self.started_at else None
        return {
            "prompt": self.queue_entry(),
            "outputs": self.outputs,
            "status": {"status_str": self.status_str, "completed": self.status_str == "success",
                       "messages": self.messages},
            "meta": {"queued_at": self.queued_at, "started_at": self.started_at, "finished_at": self.finished_at,
                     "duration_s": duration, "attempts": self.attempts, "error": self.error},
        }


def _record(row: sqlite3.Row) -> PromptRecord:
    return PromptRecord(
        id=row["id"], number=row["number"], state=row["state"], prompt=json.loads(row["prompt"]),
        extra_data=json.loads(row["extra_data"]), outputs_to_execute=json.loads(row["outputs_to_execute"]),
        client_id=row["client_id"], attempts=row["attempts"], queued_at=row["queued_at"],
        started_at=row["started_at"], finished_at=row["finished_at"], status_str=row["status_str"],
        outputs=json.loads(row["outputs"] or "{}"), messages=json.loads(row["messages"] or "[]"),
        error=json.loads(row["error"]) if row["error"] else None,
    )


class StoreInUse(RuntimeError):
    """Another server process already runs the queue in this data folder."""


def _lock_exclusively(path: Path) -> IO[bytes]:
    """Hold a lock for the life of the store: two servers on one queue would run its prompts twice."""
    handle = open(path, "ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreInUse(f"another Loom server is using {path.parent} (use a different --data-dir)") from None
    return handle


class QueueStore:
    """Blocking SQLite access; the server calls it from one dedicated thread (see web.state)."""

    def __init__(self, path: Path, history_cap: int = 10000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.history_cap = history_cap
        self._lock = _lock_exclusively(path.with_name(path.name + ".lock"))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # WAL with synchronous=NORMAL survives a killed process (not a power cut) and keeps writes fast.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.recovered = self._recover()
        self._done = self._count_done()  # finished prompts, so that trimming the history is rare work
        self._queue_json: str | None = None  # GET /queue's body until the next write

    def close(self) -> None:
        self._db.close()
        self._lock.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        self._queue_json = None
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _recover(self) -> list[str]:
        """Apply the crash rule to prompts left `running`; returns their ids."""
        rows = self._db.execute("SELECT id, attempts, messages FROM prompts WHERE state = 'running'").fetchall()
        now = time.time()
        with self._transaction():
            for row in rows:
                messages = json.loads(row["messages"] or "[]")
                if row["attempts"] < MAX_ATTEMPTS:
                    messages.append(["execution_restarted", {"timestamp": int(now * 1000), "reason": CRASH_MESSAGE}])
                    self._db.execute("UPDATE prompts SET state = 'pending', messages = ? WHERE id = ?",
                                     (json.dumps(messages), row["id"]))
                else:
                    error = {"exception_type": "ServerStopped",
                             "exception_message": f"{CRASH_MESSAGE} ({row['attempts']} times); not run again"}
                    messages.append(["execution_error", {"timestamp": int(now * 1000), **error}])
                    self._db.execute(
                        "UPDATE prompts SET state = 'done', status_str = 'error', finished_at = ?, messages = ?,"
                        " error = ? WHERE id = ?", (now, json.dumps(messages), json.dumps(error), row["id"]))
        return [row["id"] for row in rows]

    def next_number(self, front: bool) -> float:
        # Numbers from 2^53 on (stored before POST /prompt refused them: inf, 1e300) are not counted from.
        counted, bounds = "number > ? AND number < ?", (-MAX_NUMBER, MAX_NUMBER)
        if front:
            low = self._db.execute(f"SELECT MIN(number) FROM prompts WHERE state != 'done' AND {counted}",
                                   bounds).fetchone()[0]
            return (low if low is not None else 0) - 1
        high = self._db.execute(f"SELECT MAX(number) FROM prompts WHERE {counted}", bounds).fetchone()[0]
        return int(high) + 1 if high is not None else 0

    def add(self, prompt_id: str, prompt: dict[str, Any], extra_data: dict[str, Any], outputs: list[str],
            client_id: str | None, number: float | None = None, front: bool = False) -> float:
        if number is None:
            number = self.next_number(front)
        with self._transaction():
            self._db.execute(
                "INSERT INTO prompts (id, number, state, prompt, extra_data, outputs_to_execute, client_id, queued_at)"
                " VALUES (?, ?, 'pending', ?, ?, ?, ?, ?)",
                (prompt_id, number, json.dumps(prompt), json.dumps(extra_data), json.dumps(outputs), client_id,
                 time.time()))
        return number

    def claim_next(self) -> PromptRecord | None:
        """Mark the first pending prompt running (counting the attempt) and return it."""
        with self._transaction():
            row = self._db.execute(
                "SELECT id FROM prompts WHERE state = 'pending' ORDER BY number, queued_at LIMIT 1").fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE prompts SET state = 'running', attempts = attempts + 1, started_at = ?"
                             " WHERE id = ?", (time.time(), row["id"]))
        return self.get(row["id"])

    def requeue(self, prompt_id: str) -> None:
        """Put a prompt stopped by a clean shutdown back in the queue, not counting that attempt."""
        with self._transaction():
            self._db.execute("UPDATE prompts SET state = 'pending', attempts = MAX(attempts - 1, 0)"
                             " WHERE id = ? AND state = 'running'", (prompt_id,))

    def finish(self, prompt_id: str, status: str, outputs: dict[str, Any], messages: list[Any],
               error: dict[str, Any] | None) -> None:
        with self._transaction():
            self._db.execute(
                "UPDATE prompts SET state = 'done', status_str = ?, outputs = ?, messages = ?, error = ?,"
                " finished_at = ? WHERE id = ?",
                (status, json.dumps(outputs, default=str), json.dumps(messages, default=str),
                 json.dumps(error, default=str) if error else None, time.time(), prompt_id))
            self._trim_history()

    def _trim_history(self) -> None:
        self._done += 1
        if self._done <= self.history_cap:
            return
        self._db.execute(
            "DELETE FROM prompts WHERE state = 'done' AND finished_at < (SELECT finished_at FROM prompts"
            " WHERE state = 'done' ORDER BY finished_at DESC LIMIT 1 OFFSET ?)", (self.history_cap - 1,))
        self._done = self._count_done()

    def _count_done(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM prompts WHERE state = 'done'").fetchone()[0]

    def get(self, prompt_id: str) -> PromptRecord | None:
        row = self._db.execute("SELECT * FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
        return _record(row) if row else None

    def queue_json(self) -> str:
        """GET /queue's body, built from the stored JSON text: no parse and re-dump of every prompt.

        Kept until the next write: clients poll it (the editor on every status message, scripts in a loop), and
        with hundreds of prompts queued, rebuilding it each time kept the database thread busy and POSTs waiting.
        """
        if self._queue_json is None:
            self._queue_json = self._build_queue_json()
        return self._queue_json

    def _build_queue_json(self) -> str:
        rows = self._db.execute(
            "SELECT id, number, state, prompt, extra_data, outputs_to_execute FROM prompts WHERE state != 'done'"
            " ORDER BY number, queued_at").fetchall()
        entries: dict[str, list[str]] = {"running": [], "pending": []}
        for row in rows:
            number = int(row["number"]) if float(row["number"]).is_integer() else row["number"]
            entries[row["state"]].append(f'[{json.dumps(number)}, {json.dumps(row["id"])}, {row["prompt"]}, '
                                         f'{row["extra_data"]}, {row["outputs_to_execute"]}]')
        return (f'{{"queue_running": [{", ".join(entries["running"])}], '
                f'"queue_pending": [{", ".join(entries["pending"])}]}}')

    def remaining(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM prompts WHERE state != 'done'").fetchone()[0]

    def position(self, prompt_id: str) -> int | None:
        """How many prompts run before this pending one (0 = next)."""
        row = self._db.execute("SELECT number, queued_at FROM prompts WHERE id = ? AND state = 'pending'",
                               (prompt_id,)).fetchone()
        if row is None:
            return None
        return self._db.execute(
            "SELECT COUNT(*) FROM prompts WHERE state = 'pending' AND (number < ? OR (number = ? AND queued_at < ?))",
            (row["number"], row["number"], row["queued_at"])).fetchone()[0]

    def delete_pending(self, ids: list[str] | None) -> list[str]:
        """Delete the given pending prompts, or all of them when `ids` is None; returns the ids deleted."""
        return self._delete("pending", ids)

    def _delete(self, state: str, ids: list[str] | None) -> list[str]:
        with self._transaction():
            if ids is None:
                rows = self._db.execute("DELETE FROM prompts WHERE state = ? RETURNING id", (state,)).fetchall()
            else:
                marks = ",".join("?" * len(ids))
                rows = self._db.execute(f"DELETE FROM prompts WHERE state = ? AND id IN ({marks}) RETURNING id",
                                        (state, *ids)).fetchall()
        if state == "done":
            self._done -= len(rows)
        return [row["id"] for row in rows]

    def history(self, max_items: int | None = None, offset: int | None = None) -> tuple[list[PromptRecord], int]:
        """Finished prompts, oldest first, and how many there are in all (read together, so a client can page).

        As in ComfyUI, `offset` counts from the oldest run; without it, `max_items` keeps the most recent ones.
        """
        total = self._count_done()
        if offset is None:
            offset = max(total - max_items, 0) if max_items is not None else 0
        rows = self._db.execute(
            "SELECT * FROM prompts WHERE state = 'done' ORDER BY finished_at LIMIT ? OFFSET ?",
            (max_items if max_items is not None else -1, offset)).fetchall()
        return [_record(r) for r in rows], total

    def delete_history(self, ids: list[str] | None) -> list[str]:
        return self._delete("done", ids)

    def retry(self, prompt_id: str, reason: str) -> None:
        """Put a running prompt whose worker died back in the queue, its attempt counted (the crash rule for
        one prompt while the server runs on: the Ray pool calls it and decides when attempts are used up)."""
        with self._transaction():
            row = self._db.execute("SELECT messages FROM prompts WHERE id = ? AND state = 'running'",
                                   (prompt_id,)).fetchone()
            if row is None:
                return
            messages = json.loads(row["messages"] or "[]")
            messages.append(["execution_restarted", {"timestamp": int(time.time() * 1000), "reason": reason}])
            self._db.execute("UPDATE prompts SET state = 'pending', messages = ? WHERE id = ?",
                             (json.dumps(messages), prompt_id))
