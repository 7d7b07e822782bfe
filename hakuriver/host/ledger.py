"""The host's SQL ledger: the history of every task, node and output byte.

Why it exists: runners and clients only ever see the present; the ledger keeps what
happened, so ``--status``, ``--list-tasks`` and ``--stdout`` work after the fact.

Rules it keeps:
- A state event applies only if its ``seq`` is above the row's and the row is not
  terminal, so duplicates and out-of-order deliveries change nothing. One exception:
  a task the *host* marked ``lost`` (its node stopped sending heartbeats) takes the
  runner's later events, because the runner knows better what it still runs.
- Output lives in files ``<log_dir>/<task_id>.<stream>``. A chunk is written with
  ``pwrite`` at its offset, so a chunk delivered twice writes the same bytes in the
  same place and the file stays byte-identical to what the task wrote.
- Work arrives in batches (one transaction each): committing per event would cap
  SQLite at a few hundred events per second.

SQLAlchemy Core (not the ORM) is used on purpose: a batch is one SELECT of the touched
rows, the rules applied to plain dicts in Python, then one executemany of inserts and
one of updates.

Each write (and the RPC reads) is a plain synchronous function of one connection, run by
:meth:`Ledger.run`. On SQLite the whole function runs in one hop to a thread of the
ledger's own (a plain ``sqlite3`` connection), not statement by statement through
aiosqlite: every aiosqlite call is a round trip between the event loop and its thread,
and a small batch (what a steady trickle of tasks gives) made a dozen of them, about
3 ms of CPU per batch on a 2-core machine. Elsewhere (PostgreSQL) the same function runs
on the async engine through ``run_sync``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import (JSON, BigInteger, Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text,
                        bindparam, event, insert, select, update)
from sqlalchemy import create_engine, inspect as inspect_schema, text as sql_text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import SingletonThreadPool

from hakuriver.bounds import LIST_TEXT_CHARS, MAX_LIST_LIMIT, MAX_READ_BYTES
from hakuriver.host.waiting import waiting_reason
from hakuriver.messages import Heartbeat, OutputChunk, StateEvent, Task
from hakuriver.states import TERMINAL, TaskState

log = logging.getLogger(__name__)

DEFAULT_LIST_LIMIT = 50
STREAMS = ("stdout", "stderr")
_IN_CHUNK = 500          # ids per "IN (...)" clause; SQLite's bound-parameter limit is far above
_OPEN_FILES = 64         # output files kept open between batches
LEDGER_THREADS = 2       # SQLite: threads (each with its connection) that run Ledger.run: a write and a read at once

# On SQLite a plain INTEGER PRIMARY KEY is the rowid itself (64-bit signed): lookups and
# "ORDER BY task_id DESC" need no separate index. Elsewhere it is a BIGINT.
_TaskId = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData()

tasks_table = Table(
    "tasks", metadata,
    Column("task_id", _TaskId, primary_key=True, autoincrement=False),
    Column("batch_id", BigInteger),
    Column("node", String(255)),
    Column("numa", Integer),
    Column("target", String(255)),
    Column("command", Text),
    Column("args", JSON),
    Column("env", JSON),
    Column("cores", Float),
    Column("memory", BigInteger),
    Column("gpus", JSON),          # the GPU ids asked for (node::IDS), then the ones it holds while it runs
    Column("gpu_count", Integer),
    Column("container", String(255)),
    Column("privileged", Boolean),
    Column("mounts", JSON),
    Column("user", String(255)),
    Column("submit_host", String(255)),
    Column("state", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("exit_code", BigInteger),
    Column("message", Text),
    Column("submitted_at", Float),
    Column("queued_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("stdout_bytes", BigInteger, nullable=False),
    Column("stderr_bytes", BigInteger, nullable=False),
    Column("unenforced", JSON),
    Column("lost_by_host", Boolean, nullable=False),
    Column("retries", Integer),         # --retries: runs allowed after the first
    Column("retry_delay", Float),
    Column("attempt", Integer),         # the attempt the state, exit code and output columns are about
    Column("attempts", JSON),           # a retried task: one record per attempt (attempt_record)
    Column("after", JSON),              # --after: the tasks it waited for
    # Listing is "filter, newest first": (filter, task_id) lets the database walk the
    # index backwards and stop after `limit` rows instead of sorting every match.
    Index("ix_tasks_state", "state", "task_id"),
    Index("ix_tasks_node", "node", "task_id"),
    Index("ix_tasks_batch", "batch_id", "task_id"),
    Index("ix_tasks_user", "user", "task_id"),         # the dashboard's owner filter
    # /metrics counts ended tasks by node and outcome: a walk of this index, not of 100,000 rows
    Index("ix_tasks_state_node", "state", "node"),
)

nodes_table = Table(
    "nodes", metadata,
    Column("name", String(255), primary_key=True),
    Column("online", Boolean, nullable=False),
    Column("last_seen", Float),
    Column("heartbeat", JSON),
)

# Columns a task's submission fixes; filled from ``event.task`` whenever an event has it.
_SPEC_FIELDS = ("batch_id", "target", "numa", "command", "args", "env", "cores", "memory", "gpus", "gpu_count",
                "container",
                "privileged", "mounts", "user", "submit_host", "submitted_at", "retries", "retry_delay", "after")
_TASK_COLUMNS = tuple(column.name for column in tasks_table.columns)
# What the RPC shows of a task (the ledger's bookkeeping columns stay inside).
TASK_FIELDS = ("task_id", "batch_id", "state", "node", "numa", "target", "exit_code", "command", "args", "env",
               "cores", "memory", "gpus", "gpu_count", "container", "privileged", "mounts", "user", "submit_host",
               "submitted_at", "queued_at", "started_at", "finished_at", "message", "stdout_bytes", "stderr_bytes", "unenforced",
               "retries", "retry_delay", "attempt", "attempts", "after")


def _empty_row(task_id: int) -> dict[str, Any]:
    """A task known only by id (its output or a stale event came before anything that
    describes it). ``seq`` -1 lets the first real event (seq 0, ``pending``) apply."""
    row = dict.fromkeys(_TASK_COLUMNS)
    row.update(task_id=task_id, state=TaskState.PENDING.value, seq=-1, stdout_bytes=0, stderr_bytes=0,
               lost_by_host=False, message="", unenforced=[], attempt=1, retries=0, after=[])
    return row


def _spec_values(task: Task) -> dict[str, Any]:
    values = task.model_dump(mode="json", include=set(_SPEC_FIELDS))
    values["batch_id"] = task.batch_id
    return values


def apply_state_event(row: dict[str, Any], ev: StateEvent) -> bool:
    """Apply ``ev`` to ``row`` in place by the ledger's rules; True if the state changed."""
    if ev.task is not None:
        allocated = row["gpus"] if row["started_at"] is not None else None
        row.update(_spec_values(ev.task))
        if allocated is not None:  # a late ``queued`` event does not undo the GPUs it runs on
            row["gpus"] = allocated
    current = TaskState(row["state"])
    runner_overrides_host = current is TaskState.LOST and row["lost_by_host"]
    if ev.seq <= row["seq"] or (current in TERMINAL and not runner_overrides_host):
        # Not applied, but an out-of-order event still tells when something happened.
        _fill_missing_time(row, ev)
        return False
    row.update(state=ev.state.value, seq=ev.seq, exit_code=ev.exit_code, message=ev.message, lost_by_host=False)
    if ev.attempt != (row["attempt"] or 1):  # a later attempt: the output columns are its own from now on
        row["attempt"] = ev.attempt
        earlier = _attempt_record(row, ev.attempt) if row["attempts"] else {}
        row["stdout_bytes"], row["stderr_bytes"] = earlier.get("stdout_bytes", 0), earlier.get("stderr_bytes", 0)
    if ev.node:
        row["node"] = ev.node
    if ev.unenforced:
        # A terminal event need not repeat what its running event said was unenforced.
        row["unenforced"] = list(ev.unenforced)
    if ev.state is TaskState.QUEUED:
        # a runner sends ``queued`` again to say why the task still waits: it queued at the first
        row["queued_at"] = ev.time if row["queued_at"] is None else min(row["queued_at"], ev.time)
    elif ev.state is TaskState.RUNNING:
        if current is not TaskState.PAUSED:  # a resume goes on running: it started when it first ran
            row["started_at"] = ev.time
        if ev.gpus is not None:
            row["gpus"] = list(ev.gpus)
        row["finished_at"] = None  # back from a host-marked "lost"
    elif ev.state in TERMINAL:
        row["finished_at"] = ev.time
    if row["retries"] or ev.attempt > 1:
        _note_attempt(row, ev)
    return True


def _attempt_record(row: dict[str, Any], attempt: int) -> dict[str, Any]:
    """The record of one attempt of a retried task in ``row["attempts"]`` (made when missing)."""
    records = row["attempts"] = [dict(r) for r in (row["attempts"] or [])]
    for record in records:
        if record["attempt"] == attempt:
            return record
    record = {"attempt": attempt, "node": None, "state": TaskState.PENDING.value, "exit_code": None, "message": "",
              "started_at": None, "finished_at": None, "stdout_bytes": 0, "stderr_bytes": 0}
    records.append(record)
    records.sort(key=lambda r: r["attempt"])
    return record


def _note_attempt(row: dict[str, Any], ev: StateEvent) -> None:
    """Keep the attempt's record up to date with ``ev`` (applied): ``retrying`` ends an attempt as
    ``failed`` or ``lost`` (its ``ended``), a terminal state ends the last one."""
    record = _attempt_record(row, ev.attempt)
    record.update(node=ev.node or record["node"], exit_code=ev.exit_code, message=ev.message)
    if ev.state is TaskState.RETRYING:
        record.update(state=(ev.ended or TaskState.FAILED).value, finished_at=ev.time)
    else:
        record["state"] = ev.state.value
        if ev.state is TaskState.RUNNING and record["started_at"] is None:
            record["started_at"] = ev.time
        if ev.state in TERMINAL:
            record["finished_at"] = ev.time
    record["stdout_bytes"], record["stderr_bytes"] = row["stdout_bytes"], row["stderr_bytes"]


def _fill_missing_time(row: dict[str, Any], ev: StateEvent) -> None:
    column = {TaskState.QUEUED: "queued_at", TaskState.RUNNING: "started_at"}.get(ev.state)
    if column and row[column] is None:
        row[column] = ev.time


# Columns added after the first release: a ledger made before them gets them on open
# (nullable, so the rows it holds read as "asked for no GPU").
_ADDED_COLUMNS = {"gpus": "JSON", "gpu_count": "INTEGER", "retries": "INTEGER", "retry_delay": "FLOAT",
                  "attempt": "INTEGER", "attempts": "JSON", "after": "JSON"}


def _add_missing_columns(conn: Any) -> None:
    have = {column["name"] for column in inspect_schema(conn).get_columns("tasks")}
    for name, kind in _ADDED_COLUMNS.items():
        if name not in have:
            conn.execute(sql_text(f"ALTER TABLE tasks ADD COLUMN {name} {kind}"))


def task_dict(row: Any) -> dict[str, Any]:
    """The public form of a task row (the RPC's TaskDict)."""
    mapping = row if isinstance(row, dict) else row._mapping
    return {name: mapping[name] for name in TASK_FIELDS}


# What a list row carries: what ``--list-tasks`` shows and its ``--json`` documents. Not the
# environment or mounts, and the command line and message cut to LIST_TEXT_CHARS, so a page
# stays small whatever the tasks carry (``--status`` has everything).
LIST_FIELDS = ("task_id", "batch_id", "state", "node", "numa", "target", "exit_code", "cores", "memory", "gpus",
               "container", "user", "submitted_at", "started_at", "finished_at", "stdout_bytes", "stderr_bytes")


# What task_summary reads: a list query selects these alone (not the environment or mounts,
# whose JSON would be decoded for every row only to be dropped).
_SUMMARY_COLUMNS = [tasks_table.c[name] for name in (*LIST_FIELDS, "command", "args", "message")]


def task_summary(row: Any) -> dict[str, Any]:
    """A task as a list shows it: LIST_FIELDS, ``command`` and ``args`` cut to LIST_TEXT_CHARS
    characters together (``truncated`` says whether anything was cut), ``message`` cut too."""
    mapping = row if isinstance(row, dict) else row._mapping
    summary = {name: mapping[name] for name in LIST_FIELDS}
    room = LIST_TEXT_CHARS
    command = (mapping["command"] or "")[:room]
    room -= len(command)
    args: list[str] = []
    full_args = mapping["args"] or []
    for arg in full_args:
        if room <= 0:
            break
        args.append(arg[:room])
        room -= len(args[-1]) + 1
    truncated = command != (mapping["command"] or "") or args != list(full_args)
    message = mapping["message"] or ""
    summary.update(command=command, args=args, truncated=truncated, message=message[:LIST_TEXT_CHARS])
    return summary


def node_dict(row: Any) -> dict[str, Any]:
    """The public form of a node row: name, online, last_seen and its last heartbeat's fields."""
    mapping = row if isinstance(row, dict) else row._mapping
    beat = dict(mapping["heartbeat"] or {})
    for internal in ("v", "node", "time", "stopping"):
        beat.pop(internal, None)
    return {"name": mapping["name"], "online": bool(mapping["online"]), "last_seen": mapping["last_seen"], **beat}


@dataclass
class OutputSlice:
    data: bytes
    offset: int
    size: int
    state: str
    terminal: bool
    attempt: int = 1   # which attempt's output this is (a retried task's later ones restart at offset 0)


class UnknownTask(LookupError):
    def __init__(self, task_id: int):
        super().__init__(f"unknown task {task_id}")
        self.task_id = task_id


class OutputMissing(LookupError):
    """The stored output file is gone or shorter than the ledger records (pruned by an admin):
    the bytes cannot be served, and a reader waiting for them would wait forever."""


class _OutputFiles:
    """Writes output chunks at their offsets, keeping a few files open between batches
    (a busy task sends a chunk every 100 ms; reopening each time would dominate)."""

    def __init__(self, log_dir: Path, capacity: int = _OPEN_FILES):
        self.log_dir = log_dir
        self.capacity = capacity
        self._open: OrderedDict[Path, int] = OrderedDict()

    def path(self, task_id: int, stream: str, attempt: int = 1) -> Path:
        """``<id>.<stream>``; a retried task's later attempts ``<id>.attempt<K>.<stream>``."""
        return self.log_dir / (f"{task_id}.{stream}" if attempt == 1 else f"{task_id}.attempt{attempt}.{stream}")

    def write(self, task_id: int, stream: str, offset: int, data: bytes, attempt: int = 1) -> None:
        path = self.path(task_id, stream, attempt)
        fd = self._open.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o640)
        self._open[path] = fd
        while len(self._open) > self.capacity:
            os.close(self._open.popitem(last=False)[1])
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)

    def read(self, task_id: int, stream: str, offset: int, length: int, attempt: int = 1) -> bytes:
        try:
            fd = os.open(self.path(task_id, stream, attempt), os.O_RDONLY)
        except FileNotFoundError:
            return b""
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])


class Ledger:
    """The database plus the output files. Single writer: only the host's ingestion
    loop calls :meth:`ingest` and :meth:`mark_offline`; queries may run concurrently."""

    def __init__(self, url: str, log_dir: str | Path):
        self.url = url
        self.log_dir = Path(log_dir)
        self.engine: AsyncEngine | None = None
        # SQLite: the same file through the plain sqlite3 driver, for :meth:`run` (see the module docstring)
        self._sync_engine: Engine | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._files = _OutputFiles(self.log_dir)
        # One writer at a time: on SQLite a read transaction that another writer got
        # ahead of cannot be upgraded to a write (SQLITE_BUSY_SNAPSHOT).
        self._write_lock = asyncio.Lock()

    @property
    def write_lock(self) -> asyncio.Lock:
        """Held by whoever writes (ingestion, offline marking, pipelines): one writer at a time."""
        return self._write_lock

    @property
    def dialect(self) -> str:
        return make_url(self.url).get_backend_name()

    async def open(self) -> None:
        url = make_url(self.url)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_async_engine(url)
        if url.get_backend_name() == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            if url.database and url.database != ":memory:":
                # one connection per ledger thread, kept open (never shared between threads)
                self._sync_engine = create_engine(url.set(drivername="sqlite"), poolclass=SingletonThreadPool,
                                                  pool_size=LEDGER_THREADS)
                event.listen(self._sync_engine, "connect", _sqlite_pragmas)
                self._threads = ThreadPoolExecutor(max_workers=LEDGER_THREADS, thread_name_prefix="ledger")
        async with self.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.run_sync(_add_missing_columns)

    async def close(self) -> None:
        self._files.close()
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    async def run(self, body: Callable[..., Any], *args: Any, write: bool = False) -> Any:
        """``body(connection, *args)`` in one transaction (committed if ``write``, else
        rolled back); on SQLite in one hop to a ledger thread, elsewhere on the async engine."""
        if self._sync_engine is not None:
            return await asyncio.get_running_loop().run_in_executor(self._threads, self._run_sync, body, args, write)
        if write:
            async with self.engine.begin() as conn:
                return await conn.run_sync(body, *args)
        async with self.engine.connect() as conn:
            return await conn.run_sync(body, *args)

    def _run_sync(self, body: Callable[..., Any], args: tuple, write: bool) -> Any:
        if write:
            with self._sync_engine.begin() as conn:
                return body(conn, *args)
        with self._sync_engine.connect() as conn:
            return body(conn, *args)

    # -- ingestion -------------------------------------------------------------------

    async def ingest(self, events: Iterable[StateEvent] = (), chunks: Iterable[tuple[OutputChunk, bytes]] = (),
                     heartbeats: Iterable[Heartbeat] = (), now: float | None = None) -> int:
        """Apply one batch in one transaction; returns how many state events applied.
        Output bytes are written to their files first: a crash before the commit leaves
        bytes the redelivered chunk rewrites."""
        now = time.time() if now is None else now
        events, chunks, heartbeats = list(events), list(chunks), list(heartbeats)
        if chunks:
            await asyncio.to_thread(self._write_chunks, chunks)
        # Several events of one task in a batch apply in seq order, as if they had arrived so.
        events.sort(key=lambda ev: (ev.task_id, ev.seq))
        async with self._write_lock:
            return await self.run(_ingest_batch, events, chunks, heartbeats, now, write=True)

    def _write_chunks(self, chunks: list[tuple[OutputChunk, bytes]]) -> None:
        for chunk, data in chunks:
            self._files.write(chunk.task_id, chunk.stream, chunk.offset, data, chunk.attempt)

    async def mark_offline(self, offline_after: float, now: float | None = None) -> list[StateEvent]:
        """Nodes silent for ``offline_after`` seconds go offline; the tasks they were
        running (or paused) become ``lost`` (by the host, seq unchanged). Returns the events to publish."""
        now = time.time() if now is None else now
        async with self._write_lock:
            return await self.run(_mark_offline, offline_after, now, write=True)

    # -- queries ---------------------------------------------------------------------

    async def get_tasks(self, task_ids: Iterable[int]) -> list[dict[str, Any]]:
        """Tasks by id, in the order asked; unknown ids are left out. A task not started
        yet says why it waits (:func:`~hakuriver.host.waiting.waiting_reason`)."""
        ids = list(dict.fromkeys(task_ids))
        rows = await self.run(_load_rows, set(ids))
        tasks = [task_dict(rows[task_id]) for task_id in ids if task_id in rows]
        if any(t["state"] in (TaskState.PENDING.value, TaskState.QUEUED.value) for t in tasks):
            nodes = {node["name"]: node for node in await self.list_nodes()}
            for t in tasks:
                t["message"] = waiting_reason(t, nodes)
        return tasks

    async def list_tasks(self, state: str | None = None, node: str | None = None, batch: int | None = None,
                         limit: int = DEFAULT_LIST_LIMIT, before: int | None = None,
                         user: str | None = None) -> list[dict[str, Any]]:
        """Up to ``limit`` summaries (:func:`task_summary`), newest first. ``before``: only tasks
        older than this id (the smallest id of the previous page), so a caller can page through
        all of them. ``limit`` may be one over MAX_LIST_LIMIT: the query asks for one row more
        than a page to learn whether another page follows."""
        if not 1 <= limit <= MAX_LIST_LIMIT + 1:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}, not {limit}")
        query = select(*_SUMMARY_COLUMNS).order_by(tasks_table.c.task_id.desc()).limit(limit)
        if state is not None:
            query = query.where(tasks_table.c.state == TaskState(state).value)
        if node is not None:
            query = query.where(tasks_table.c.node == node)
        if batch is not None:
            query = query.where(tasks_table.c.batch_id == batch)
        if user is not None:
            query = query.where(tasks_table.c.user == user)
        if before is not None:
            query = query.where(tasks_table.c.task_id < before)
        return await self.run(_summaries, query)

    async def list_nodes(self, name: str | None = None) -> list[dict[str, Any]]:
        query = select(nodes_table).order_by(nodes_table.c.name)
        if name is not None:
            query = query.where(nodes_table.c.name == name)
        return await self.run(_node_dicts, query)

    async def owner(self, task_id: int) -> str:
        """The task's owner (its broker-checked user); :class:`UnknownTask` if there is no such task."""
        row = await self.run(_first, select(tasks_table.c.user).where(tasks_table.c.task_id == task_id))
        if row is None:
            raise UnknownTask(task_id)
        return row[0] or ""

    async def read_output(self, task_id: int, stream: str, offset: int = 0,
                          length: int = MAX_READ_BYTES, attempt: int | None = None) -> OutputSlice:
        """A slice of a task's stored output: of its latest attempt, or of ``attempt`` (a retried task's earlier run)."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be stdout or stderr, not {stream!r}")
        if offset < 0 or not 0 <= length <= MAX_READ_BYTES:
            raise ValueError(f"offset must be >= 0 and length between 0 and {MAX_READ_BYTES}")
        column = tasks_table.c[f"{stream}_bytes"]
        row = await self.run(_first, select(column, tasks_table.c.state, tasks_table.c.attempt, tasks_table.c.attempts)
                             .where(tasks_table.c.task_id == task_id))
        if row is None:
            raise UnknownTask(task_id)
        size, state, latest = row[0], row[1], row[2] or 1
        if attempt is not None and attempt != latest:
            record = next((r for r in row[3] or [] if r["attempt"] == attempt), None)
            if record is None or attempt > latest:
                raise ValueError(f"task {task_id} has no attempt {attempt} (attempts 1 to {latest})")
            size, state = record[f"{stream}_bytes"], record["state"]
            terminal = True  # a later attempt follows it: this one is over
        else:
            attempt, terminal = latest, TaskState(state) in TERMINAL
        wanted = max(0, min(length, size - offset))
        data = await asyncio.to_thread(self._files.read, task_id, stream, offset, wanted, attempt) if wanted else b""
        if len(data) < wanted:
            # Bytes are written to the file before the ledger counts them, so a short read
            # means the file was removed or cut after the fact.
            path = self._files.path(task_id, stream, attempt)
            raise OutputMissing(f"the stored {stream} of task {task_id} is missing or cut short: the ledger "
                                f"records {size} bytes, {path} holds {offset + len(data)}")
        return OutputSlice(data=data, offset=offset, size=size, state=state, terminal=terminal, attempt=attempt)


# ---- the bodies Ledger.run runs, each on one synchronous connection ------------------

def _ingest_batch(conn: Connection, events: list[StateEvent], chunks: list[tuple[OutputChunk, bytes]],
                  heartbeats: list[Heartbeat], now: float) -> int:
    """One batch by the ledger's rules (:meth:`Ledger.ingest`); how many state events applied."""
    states_applied = 0
    task_ids = {ev.task_id for ev in events} | {chunk.task_id for chunk, _ in chunks}
    rows = _load_rows(conn, task_ids)
    new_ids = {task_id for task_id in task_ids if task_id not in rows}
    for task_id in new_ids:
        rows[task_id] = _empty_row(task_id)
    changed = set(new_ids)
    for ev in events:
        if ev.task is not None and ev.task.task_id != ev.task_id:
            continue  # the host validates this before; never trust a mismatch
        if apply_state_event(rows[ev.task_id], ev):
            states_applied += 1
        changed.add(ev.task_id)
    for chunk, data in chunks:
        column = f"{chunk.stream}_bytes"
        row = rows[chunk.task_id]
        end = chunk.offset + len(data)
        if chunk.attempt == (row["attempt"] or 1):
            row[column] = max(row[column], end)
        if row["attempts"] or chunk.attempt != (row["attempt"] or 1):  # a retried task: per attempt too
            record = _attempt_record(row, chunk.attempt)
            record[column] = max(record[column], end)
        changed.add(chunk.task_id)
    _write_rows(conn, [rows[i] for i in changed if i in new_ids], [rows[i] for i in changed if i not in new_ids])
    _apply_heartbeats(conn, heartbeats, now)
    return states_applied


def _load_rows(conn: Connection, task_ids: set[int]) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    ids = sorted(task_ids)
    for start in range(0, len(ids), _IN_CHUNK):
        found = conn.execute(select(tasks_table).where(tasks_table.c.task_id.in_(ids[start:start + _IN_CHUNK])))
        for row in found:
            rows[row.task_id] = dict(row._mapping)
    return rows


def _write_rows(conn: Connection, inserts: list[dict], updates: list[dict]) -> None:
    if inserts:
        conn.execute(insert(tasks_table), inserts)
    if updates:
        # Core executemany: the SET clause comes from the parameter keys.
        params = [{**{k: v for k, v in row.items() if k != "task_id"}, "key_task_id": row["task_id"]}
                  for row in updates]
        conn.execute(update(tasks_table).where(tasks_table.c.task_id == bindparam("key_task_id")), params)


def _apply_heartbeats(conn: Connection, heartbeats: list[Heartbeat], now: float) -> None:
    latest: dict[str, Heartbeat] = {}
    for beat in heartbeats:
        if beat.node not in latest or beat.time >= latest[beat.node].time:
            latest[beat.node] = beat
    if not latest:
        return
    existing = set(conn.execute(select(nodes_table.c.name).where(nodes_table.c.name.in_(list(latest)))).scalars())
    rows = [{"name": name, "online": not beat.stopping, "last_seen": now,
             "heartbeat": beat.model_dump(mode="json")} for name, beat in latest.items()]
    new = [row for row in rows if row["name"] not in existing]
    old = [{**row, "key_name": row["name"]} for row in rows if row["name"] in existing]
    if new:
        conn.execute(insert(nodes_table), new)
    if old:
        conn.execute(update(nodes_table).where(nodes_table.c.name == bindparam("key_name")), old)
    # What a live runner says it runs wins over the host's guess that it was lost.
    still_running = [(name, task_id) for name, beat in latest.items() if not beat.stopping
                     for task_id in beat.running]
    for name, task_id in still_running:
        conn.execute(
            update(tasks_table)
            .where(tasks_table.c.task_id == task_id, tasks_table.c.state == TaskState.LOST.value,
                   tasks_table.c.lost_by_host.is_(True))
            .values(state=TaskState.RUNNING.value, lost_by_host=False, finished_at=None, message="", node=name))


def _mark_offline(conn: Connection, offline_after: float, now: float) -> list[StateEvent]:
    conn.execute(
        update(nodes_table)
        .where(nodes_table.c.online.is_(True), nodes_table.c.last_seen < now - offline_after)
        .values(online=False))
    # Silence is what loses tasks, not the offline flag: a runner that stopped
    # politely (restart, upgrade) gets the same grace to come back and adopt them.
    offline = list(conn.execute(select(nodes_table.c.name).where(nodes_table.c.last_seen < now - offline_after))
                   .scalars())
    if not offline:
        return []
    lost = conn.execute(
        select(tasks_table.c.task_id, tasks_table.c.node, tasks_table.c.seq, tasks_table.c.attempt)
        .where(tasks_table.c.state.in_([TaskState.RUNNING.value, TaskState.PAUSED.value]),
               tasks_table.c.node.in_(offline))).all()
    events = [StateEvent(task_id=row.task_id, node=row.node, state=TaskState.LOST, seq=row.seq, time=now,
                         attempt=row.attempt or 1, message=f"node {row.node} went offline") for row in lost]
    if events:
        conn.execute(
            update(tasks_table).where(tasks_table.c.task_id == bindparam("key_task_id")),
            [{"key_task_id": ev.task_id, "state": TaskState.LOST.value, "lost_by_host": True,
              "message": ev.message, "finished_at": now} for ev in events])
    return events


def _summaries(conn: Connection, query: Any) -> list[dict[str, Any]]:
    return [task_summary(row) for row in conn.execute(query)]


def _node_dicts(conn: Connection, query: Any) -> list[dict[str, Any]]:
    return [node_dict(row) for row in conn.execute(query)]


def _first(conn: Connection, query: Any) -> Any:
    return conn.execute(query).first()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets RPC readers run while ingestion writes. NORMAL skips the fsync per commit:
    # a power cut may lose the last few commits (never corrupt the file); a process
    # crash loses nothing. That is the usual trade for a WAL database of history.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
