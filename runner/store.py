"""The runner's own durable store: the tasks it accepted, their state, and its outbox.

It is the runner's real queue. A task is recorded here (together with its
``queued`` event in the outbox, in one transaction) before the broker delivery is
acknowledged, so a task waiting for cores waits here, not as an unacked delivery,
and a restarted runner finds everything it had. One SQLite file per node, WAL mode.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hakuriver.messages import StateEvent, Task
from hakuriver.outbox import Outbox
from hakuriver.states import TaskState
from hakuriver.topology import Topology

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id INTEGER PRIMARY KEY,
    arrival INTEGER NOT NULL,
    body TEXT NOT NULL,
    state TEXT NOT NULL,
    seq INTEGER NOT NULL,
    handle TEXT,
    stdout_sent INTEGER NOT NULL DEFAULT 0,
    stderr_sent INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    kill_requested INTEGER NOT NULL DEFAULT 0,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state);
-- kills of tasks not seen yet, with who sent each (only the owner's or an admin's ends the task);
-- replaces the table "tombstones" of earlier versions, which did not know who killed
DROP TABLE IF EXISTS tombstones;
CREATE TABLE IF NOT EXISTS early_kills (task_id INTEGER NOT NULL, killer TEXT NOT NULL, at REAL NOT NULL,
                                        PRIMARY KEY (task_id, killer));
"""


@dataclass
class StoredTask:
    task: Task
    arrival: int
    state: TaskState
    seq: int
    handle: dict[str, Any] | None
    stdout_sent: int
    stderr_sent: int
    outcome: dict[str, Any] | None
    kill_requested: bool


class RunnerStore:
    def __init__(self, path: Path, topo: Topology, node: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.outbox = Outbox(self.db)
        self.topo, self.node = topo, node
        self._arrival = self.db.execute("SELECT coalesce(max(arrival), 0) FROM tasks").fetchone()[0]

    def has(self, task_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is not None

    def accept(self, task: Task, state: TaskState = TaskState.QUEUED, message: str = "") -> int:
        """Record a new task with its first event (``queued``, or a terminal one such as
        ``rejected``); returns the outbox row to wait on before acking the delivery."""
        with self.db:
            self._arrival += 1
            self.db.execute(
                "INSERT INTO tasks (task_id, arrival, body, state, seq) VALUES (?, ?, ?, ?, 0)",
                (task.task_id, self._arrival, task.model_dump_json(), TaskState.QUEUED))
            return self._event(task.task_id, state, message=message, task=task)

    def transition(self, task_id: int, state: TaskState, handle: dict[str, Any] | None = None, **fields: Any) -> int:
        """Move a task to ``state`` and queue its event (with the executor's ``handle`` when it
        just started), in one transaction; returns the outbox row id."""
        with self.db:
            if handle is not None:
                self.db.execute("UPDATE tasks SET handle = ? WHERE task_id = ?", (json.dumps(handle), task_id))
            return self._event(task_id, state, **fields)

    def _event(self, task_id: int, state: TaskState, **fields: Any) -> int:
        seq = self.db.execute("SELECT seq FROM tasks WHERE task_id = ?", (task_id,)).fetchone()[0] + 1
        finished = time.time() if state.terminal else None
        self.db.execute("UPDATE tasks SET state = ?, seq = ?, finished_at = coalesce(?, finished_at) WHERE task_id = ?",
                        (state, seq, finished, task_id))
        event = StateEvent(task_id=task_id, node=self.node, state=state, seq=seq, **fields)
        return self.outbox.add(self.topo.events, self.topo.state_key(task_id), event.to_bytes())

    def tell_waiting(self, reasons: dict[int, str]) -> None:
        """Queue a ``queued`` event again for each waiting task, its message saying why it
        waits, all in one transaction (a long queue is told in one commit, not one each).
        A task that is no longer ``queued`` is left alone: a reason never reopens a task."""
        with self.db:
            for task_id, reason in reasons.items():
                row = self.db.execute("SELECT state FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
                if row is not None and row[0] == TaskState.QUEUED:
                    self._event(task_id, TaskState.QUEUED, message=reason)

    def set_outcome(self, task_id: int, outcome: dict[str, Any]) -> None:
        """How the task ended, kept until its output is flushed and its final event queued."""
        with self.db:
            self.db.execute("UPDATE tasks SET outcome = ? WHERE task_id = ?", (json.dumps(outcome), task_id))

    def set_sent(self, task_id: int, stream: str, offset: int) -> None:
        with self.db:
            self.db.execute(f"UPDATE tasks SET {stream}_sent = ? WHERE task_id = ?", (offset, task_id))

    def request_kill(self, task_id: int) -> None:
        with self.db:
            self.db.execute("UPDATE tasks SET kill_requested = 1 WHERE task_id = ?", (task_id,))

    def add_tombstone(self, task_id: int, killer: str) -> None:
        """A kill by ``killer`` for a task this runner has not seen: if it arrives later and
        ``killer`` may kill it (the runner decides then: it learns the owner with the task), it never runs."""
        with self.db:
            self.db.execute("INSERT OR IGNORE INTO early_kills VALUES (?, ?, ?)", (task_id, killer, time.time()))

    def has_tombstone(self, task_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM early_kills WHERE task_id = ?", (task_id,)).fetchone() is not None

    def take_tombstone(self, task_id: int) -> list[str]:
        """Who sent kills before task ``task_id`` arrived (none: an empty list); forgets them."""
        with self.db:
            killers = [row[0] for row in self.db.execute("SELECT killer FROM early_kills WHERE task_id = ?",
                                                         (task_id,))]
            self.db.execute("DELETE FROM early_kills WHERE task_id = ?", (task_id,))
        return killers

    def unfinished(self) -> list[StoredTask]:
        """Every task not yet in a terminal state, in arrival order."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE state IN ('queued', 'running', 'paused') ORDER BY arrival").fetchall()
        return [_stored(row) for row in rows]

    def prune(self, older_than: float) -> None:
        """Forget finished tasks and tombstones older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        with self.db:
            self.db.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoff,))
            self.db.execute("DELETE FROM early_kills WHERE at < ?", (cutoff,))

    def close(self) -> None:
        self.db.close()


_COLUMNS = "body, arrival, state, seq, handle, stdout_sent, stderr_sent, outcome, kill_requested"


def _stored(row: tuple) -> StoredTask:
    body, arrival, state, seq, handle, out_sent, err_sent, outcome, kill = row
    return StoredTask(Task.model_validate_json(body), arrival, TaskState(state), seq,
                      json.loads(handle) if handle else None, out_sent, err_sent,
                      json.loads(outcome) if outcome else None, bool(kill))
