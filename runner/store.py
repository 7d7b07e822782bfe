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

from hakuriver.identity import OWNER_HEADER
from hakuriver.messages import StateEvent, Task, state_event_combiner
from hakuriver.outbox import Outbox
from hakuriver.states import TaskState
from hakuriver.topology import POOL_KEY, Topology
from runner.retries import retry_message, seq_base

# Columns added after the first release: a store made before them gets them on open.
_ADDED_COLUMNS = {"attempt": "INTEGER NOT NULL DEFAULT 1", "not_before": "REAL"}

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
    finished_at REAL,
    attempt INTEGER NOT NULL DEFAULT 1,
    not_before REAL
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
    not_before: float | None = None  # a ``retrying`` task: when its next attempt may wait for room again


class RunnerStore:
    def __init__(self, path: Path, topo: Topology, node: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(tasks)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                self.db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")
        self.outbox = Outbox(self.db, combine=state_event_combiner(topo.events))
        self.topo, self.node = topo, node
        self._arrival = self.db.execute("SELECT coalesce(max(arrival), 0) FROM tasks").fetchone()[0]

    def has(self, task_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is not None

    def holds(self, task: Task) -> bool:
        """Whether this delivery of ``task`` is one we have already: the same attempt or an earlier one
        (the attempt of a pool task this runner handed back to the pool is new when it comes back)."""
        row = self.db.execute("SELECT attempt, state, not_before FROM tasks WHERE task_id = ?",
                              (task.task_id,)).fetchone()
        if row is None:
            return False
        attempt, state, not_before = row
        handed_on = state == TaskState.RETRYING and not_before is None
        return attempt > task.attempt if handed_on else attempt >= task.attempt

    def accept(self, task: Task, state: TaskState = TaskState.QUEUED, message: str = "") -> int:
        """Record a new task (or a new attempt of one) with its first event (``queued``, or a
        terminal one such as ``rejected``); returns the outbox row to wait on before acking the delivery."""
        with self.db:
            if task.attempt > 1 and self.handed_on(task.task_id) and not self.holds(task):
                # the attempt of a pool task this runner handed back, come back: it replaces the old row
                self.db.execute("DELETE FROM tasks WHERE task_id = ?", (task.task_id,))
            self._arrival += 1
            self.db.execute(
                "INSERT INTO tasks (task_id, arrival, body, state, seq, attempt) VALUES (?, ?, ?, ?, ?, ?)",
                (task.task_id, self._arrival, task.model_dump_json(), TaskState.QUEUED, seq_base(task.attempt),
                 task.attempt))
            return self._event(task.task_id, state, message=message, task=task)

    def transition(self, task_id: int, state: TaskState, handle: dict[str, Any] | None = None, **fields: Any) -> int:
        """Move a task to ``state`` and queue its event (with the executor's ``handle`` when it
        just started), in one transaction; returns the outbox row id."""
        with self.db:
            if handle is not None:
                self.db.execute("UPDATE tasks SET handle = ? WHERE task_id = ?", (json.dumps(handle), task_id))
            return self._event(task_id, state, **fields)

    def _event(self, task_id: int, state: TaskState, **fields: Any) -> int:
        seq, attempt = self.db.execute("SELECT seq, attempt FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        seq += 1
        finished = time.time() if state.terminal else None
        self.db.execute("UPDATE tasks SET state = ?, seq = ?, finished_at = coalesce(?, finished_at) WHERE task_id = ?",
                        (state, seq, finished, task_id))
        event = StateEvent(task_id=task_id, node=self.node, state=state, seq=seq, attempt=attempt, **fields)
        return self.outbox.add(self.topo.events, self.topo.state_key(task_id), event.to_bytes())

    def retry(self, task: Task, following: Task, state: TaskState, exit_code: int | None, message: str) -> float:
        """End attempt ``task.attempt`` as ``retrying`` and record ``following`` (the next attempt),
        in one transaction: the decision (runner/retries.py) is durable the moment it is made.
        The task waits here, ``retrying``, until the returned time; then :meth:`requeue`."""
        not_before = time.time() + following.retry_delay
        with self.db:
            self._event(task.task_id, TaskState.RETRYING, exit_code=exit_code, ended=state,
                        message=retry_message(task, state, exit_code, message))
            self.db.execute(
                "UPDATE tasks SET body = ?, attempt = ?, seq = ?, handle = NULL, stdout_sent = 0, stderr_sent = 0, "
                "outcome = NULL, kill_requested = 0, not_before = ?, finished_at = ? WHERE task_id = ?",
                (following.model_dump_json(), following.attempt, seq_base(following.attempt), not_before, None,
                 task.task_id))
        return not_before

    def requeue(self, task: Task) -> bool:
        """A ``retrying`` task's delay is over. A task for this node waits for room again (``queued``,
        its next attempt; True). A pool task goes back to the pool through the outbox, for any node
        with room (False): the row then only remembers which attempt was handed on.
        False, and nothing changed, if it is no longer ``retrying`` (killed meanwhile)."""
        with self.db:
            row = self.db.execute("SELECT state, not_before FROM tasks WHERE task_id = ?", (task.task_id,)).fetchone()
            if row is None or row[0] != TaskState.RETRYING or row[1] is None:
                return False
            if task.target == POOL_KEY:
                self.db.execute("UPDATE tasks SET not_before = NULL, finished_at = ? WHERE task_id = ?",
                                (time.time(), task.task_id))
                self.outbox.add(self.topo.tasks, POOL_KEY, task.to_bytes(), {OWNER_HEADER: task.user})
                return False
            self.db.execute("UPDATE tasks SET not_before = NULL WHERE task_id = ?", (task.task_id,))
            self._event(task.task_id, TaskState.QUEUED, message="")
        return True

    def task(self, task_id: int) -> Task:
        return Task.model_validate_json(self.db.execute("SELECT body FROM tasks WHERE task_id = ?",
                                                        (task_id,)).fetchone()[0])

    def handed_on(self, task_id: int) -> bool:
        """Whether this runner handed the task's next attempt back to the pool (it may come back here or not)."""
        row = self.db.execute("SELECT state, not_before FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return row is not None and row[0] == TaskState.RETRYING and row[1] is None

    def waiting_retry(self, task_id: int) -> bool:
        """Whether task ``task_id`` waits here for its next attempt (not one handed to the pool)."""
        row = self.db.execute("SELECT state, not_before FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return row is not None and row[0] == TaskState.RETRYING and row[1] is not None

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
            f"SELECT {_COLUMNS} FROM tasks WHERE state IN ('queued', 'running', 'paused') "
            "OR (state = 'retrying' AND not_before IS NOT NULL) ORDER BY arrival").fetchall()
        return [_stored(row) for row in rows]

    def prune(self, older_than: float) -> None:
        """Forget finished tasks and tombstones older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        with self.db:
            self.db.execute("DELETE FROM tasks WHERE finished_at IS NOT NULL AND finished_at < ?", (cutoff,))
            self.db.execute("DELETE FROM early_kills WHERE at < ?", (cutoff,))

    def close(self) -> None:
        self.db.close()


_COLUMNS = "body, arrival, state, seq, handle, stdout_sent, stderr_sent, outcome, kill_requested, not_before"


def _stored(row: tuple) -> StoredTask:
    body, arrival, state, seq, handle, out_sent, err_sent, outcome, kill, not_before = row
    return StoredTask(Task.model_validate_json(body), arrival, TaskState(state), seq,
                      json.loads(handle) if handle else None, out_sent, err_sent,
                      json.loads(outcome) if outcome else None, bool(kill), not_before)
