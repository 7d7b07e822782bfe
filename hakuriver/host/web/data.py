"""What the dashboard reads from the ledger beyond the RPC's queries: filtered task pages,
counts by state, the latest failures, and the sums behind ``/metrics``.

Why it is separate from :mod:`hakuriver.host.ledger`: these reads serve one window onto the
ledger (its filters, its columns) and change with it; the ledger keeps the write rules.

Paging is by key, never by offset: a page is "the ``limit`` newest tasks below the id
``before`` that match", so every filter walks an index ``(column, task_id)`` backwards and
stops after ``limit`` rows, on page 1 as on page 2,000. The command text filter is a
substring match (``LIKE``, no index can serve it): it scans at most ``TEXT_SCAN_ROWS``
tasks below the cursor per page, so a rare word costs a bounded scan and the page says
where to continue.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import and_, case, func, select

from hakuriver.bounds import INT64
from hakuriver.host.ledger import Ledger, nodes_table, node_dict, tasks_table
from hakuriver.states import TERMINAL, TaskState

PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
TEXT_SCAN_ROWS = 20_000     # tasks a command-text page looks through at most
FAILURE_STATES = (TaskState.FAILED, TaskState.KILLED_OOM, TaskState.LOST, TaskState.REJECTED)
# Histogram buckets (seconds) for task duration and time waiting before start.
DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 1800, 3600)

# The columns a task table row shows (the environment and mounts stay on the task page).
_ROW_COLUMNS = [tasks_table.c[name] for name in (
    "task_id", "batch_id", "state", "node", "numa", "target", "user", "command", "args", "cores", "memory",
    "submitted_at", "started_at", "finished_at", "exit_code")]


class TaskFilter(BaseModel):
    """The tasks table's filters, as the URL (``/tasks?state=running&user=ana``) and the API take them."""

    model_config = ConfigDict(extra="forbid")
    state: TaskState | None = None
    node: str | None = Field(default=None, max_length=255)
    user: str | None = Field(default=None, max_length=255)
    batch: int | None = Field(default=None, ge=0, lt=INT64)
    q: str | None = Field(default=None, max_length=200)    # a substring of the command
    before: int | None = Field(default=None, ge=0, lt=INT64)
    limit: int = Field(default=PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)

    @field_validator("state", "node", "user", "q", "batch", "before", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # An HTML form sends every field, empty ones as "".
        return None if value == "" else value

    @classmethod
    def parse(cls, query: dict[str, str]) -> "TaskFilter":
        """From URL query parameters; ValueError naming the bad parameter and value."""
        try:
            return cls.model_validate(query)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"bad filter {name}={error.get('input')!r}: {error['msg']}") from None

    def url_params(self, **changes: Any) -> dict[str, str]:
        """The non-empty filters as query parameters (``changes`` override), for links."""
        values = self.model_dump(mode="json") | changes
        if values.get("limit") == PAGE_SIZE:
            values.pop("limit")
        return {key: str(value) for key, value in values.items() if value is not None}


class TaskPage(BaseModel):
    tasks: list[dict[str, Any]]
    next_before: int | None    # the cursor of the next page; None on the last one
    scanned_to: int | None = None   # text search: the lowest id looked at (the search goes on below it)


async def ensure_indexes(ledger: Ledger) -> None:
    """Create the filter indexes a ledger made by an older version lacks (create_all skips
    the indexes of tables that exist)."""
    async with ledger.engine.begin() as conn:
        await conn.run_sync(lambda sync: [index.create(sync, checkfirst=True) for index in tasks_table.indexes])


async def task_page(ledger: Ledger, where: TaskFilter) -> TaskPage:
    """One page of tasks matching ``where``, newest first."""
    t = tasks_table.c
    conditions = []
    if where.state is not None:
        conditions.append(t.state == where.state.value)
    if where.node is not None:
        conditions.append(t.node == where.node)
    if where.user is not None:
        conditions.append(t.user == where.user)
    if where.batch is not None:
        conditions.append(t.batch_id == where.batch)
    if where.before is not None:
        conditions.append(t.task_id < where.before)
    async with ledger.engine.connect() as conn:
        floor = None
        if where.q:
            # The lowest id among the next TEXT_SCAN_ROWS candidates bounds the scan.
            window = select(t.task_id).where(*conditions).order_by(t.task_id.desc()).limit(TEXT_SCAN_ROWS)
            floor = (await conn.execute(select(func.min(window.subquery().c.task_id)))).scalar()
            conditions += [t.command.contains(where.q, autoescape=True)]
            if floor is not None:
                conditions.append(t.task_id >= floor)
        query = select(*_ROW_COLUMNS).where(*conditions).order_by(t.task_id.desc()).limit(where.limit + 1)
        rows = [dict(row._mapping) for row in await conn.execute(query)]
    more = len(rows) > where.limit
    rows = rows[:where.limit]
    if where.q and not more:
        # The text window is used up: the next page starts below it (if anything is left there).
        next_before = floor if floor is not None and await _any_below(ledger, where, floor) else None
        return TaskPage(tasks=rows, next_before=next_before, scanned_to=floor)
    return TaskPage(tasks=rows, next_before=rows[-1]["task_id"] if more else None)


async def _any_below(ledger: Ledger, where: TaskFilter, floor: int) -> bool:
    lower = where.model_copy(update={"q": None, "before": floor, "limit": 1})
    return bool((await task_page(ledger, lower)).tasks)


async def task_row(ledger: Ledger, task_id: int) -> dict[str, Any] | None:
    found = await ledger.get_tasks([task_id])
    return found[0] if found else None


async def counts_by_state(ledger: Ledger) -> dict[str, int]:
    """Every state with its number of tasks (0 for none), from the state index alone."""
    query = select(tasks_table.c.state, func.count()).group_by(tasks_table.c.state)
    found = dict(await ledger.run(_all_rows, query))
    return {state.value: found.get(state.value, 0) for state in TaskState}


async def latest_failures(ledger: Ledger, limit: int = 10) -> list[dict[str, Any]]:
    """The newest tasks that ended badly, one index walk per failure state, merged."""
    queries = [select(*_ROW_COLUMNS, tasks_table.c.message).where(tasks_table.c.state == state.value)
               .order_by(tasks_table.c.task_id.desc()).limit(limit) for state in FAILURE_STATES]
    rows = [dict(row._mapping) for query in queries for row in await ledger.run(_all_rows, query)]
    return sorted(rows, key=lambda row: row["task_id"], reverse=True)[:limit]


async def nodes(ledger: Ledger) -> list[dict[str, Any]]:
    """Every node with its last heartbeat, and how long ago it was heard from."""
    now = time.time()
    rows = [node_dict(row) for row in await ledger.run(_all_rows, select(nodes_table).order_by(nodes_table.c.name))]
    for node in rows:
        node["heartbeat_age"] = None if node["last_seen"] is None else max(0.0, now - node["last_seen"])
    return rows


def allocation(node: dict[str, Any]) -> dict[str, float | int | None]:
    """What a node's tasks hold of its cores, memory and GPUs (GPUs: None on a node without any)."""
    cores_total = node.get("cores_total") or 0
    memory_total = node.get("memory_total") or 0
    gpus = node.get("gpus")
    return {"cores_total": cores_total, "cores_allocated": max(0.0, cores_total - (node.get("cores_free") or 0)),
            "memory_total": memory_total,
            "memory_allocated": max(0, memory_total - (node.get("memory_free") or 0)),
            # from the heartbeat's GPU inventory; None (shown "—") on a node without GPUs
            "gpus_total": len(gpus) if gpus else None,
            "gpus_allocated": max(0, len(gpus) - len(node.get("gpus_free") or [])) if gpus else None}


async def finished_by_node(ledger: Ledger) -> list[tuple[str, str, int]]:
    """(node, outcome, tasks) for every ended task: the finished counter of /metrics (a walk of
    the covering index ``(state, node)``, not of the table)."""
    return [(node, state, count) for node, state, count in await ledger.run(_all_rows, finished_by_node_query())]


def finished_by_node_query() -> Any:
    t = tasks_table.c
    return (select(func.coalesce(t.node, ""), t.state, func.count())
            .where(t.state.in_([state.value for state in TERMINAL])).group_by(t.state, t.node))


async def histogram(ledger: Ledger, start: Any, end: Any, buckets: tuple[float, ...]) -> tuple[list[int], int, float]:
    """Cumulative counts of ``end - start`` per bucket bound, the count and the sum, in one scan."""
    span = end - start
    where = and_(start.is_not(None), end.is_not(None))
    columns = [func.sum(case((span <= bound, 1), else_=0)) for bound in buckets]
    query = select(*columns, func.count(), func.coalesce(func.sum(span), 0.0)).where(where)
    row = (await ledger.run(_all_rows, query))[0]
    return [int(value or 0) for value in row[:len(buckets)]], int(row[-2]), float(row[-1])


def _all_rows(conn: Any, query: Any) -> list[Any]:
    """Every row of ``query`` (run by :meth:`Ledger.run`: in one hop to a ledger thread on SQLite)."""
    return conn.execute(query).all()
