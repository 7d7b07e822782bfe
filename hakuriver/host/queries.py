"""The host's answers to RPC queries (status, list, health, output): one method per query.

Why it exists: the service (:mod:`hakuriver.host.service`) owns connections and loops; what
a query may ask and how it is answered from the ledger is here, callable without a broker.
Parameters are pydantic models (the edge); every failure becomes ``ok=false`` with one line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Annotated, Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hakuriver import __version__, identity
from hakuriver.bounds import INT64, LIST_PAGE_BYTES, MAX_LIST_LIMIT, MAX_READ_BYTES, MAX_RETRIES
from hakuriver.host.ledger import Ledger, OutputMissing, UnknownTask
from hakuriver.messages import RpcReply, one_line
from hakuriver.states import TaskState

log = logging.getLogger("hakuriver.host")

MAX_OUTPUT_WAIT = 300.0   # longest "follow" wait one request may ask for


TaskId = Annotated[int, Field(ge=0, lt=INT64)]  # ids are 64-bit in the database


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusParams(_Params):
    task_ids: list[TaskId] = Field(max_length=MAX_LIST_LIMIT)


class ListTasksParams(_Params):
    state: TaskState | None = None
    node: str | None = None
    batch: TaskId | None = None
    user: str | None = None
    limit: int = Field(default=50, ge=1, le=MAX_LIST_LIMIT)
    before: TaskId | None = None


class HealthParams(_Params):
    node: str | None = None


class OutputParams(_Params):
    task_id: TaskId
    stream: Literal["stdout", "stderr"] = "stdout"
    offset: int = Field(default=0, ge=0, lt=INT64)
    length: int = Field(default=MAX_READ_BYTES, ge=0, le=MAX_READ_BYTES)
    wait: float = Field(default=0.0, ge=0, le=MAX_OUTPUT_WAIT)
    attempt: int | None = Field(default=None, ge=1, le=MAX_RETRIES + 1)  # a retried task's earlier run; None: the latest


class LedgerChanges:
    """A generation counter with a condition: "output" queries that follow a task sleep
    here until ingestion stores something, instead of polling the ledger."""

    def __init__(self) -> None:
        self.generation = 0
        self._changed = asyncio.Condition()

    async def notify(self) -> None:
        self.generation += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_past(self, generation: int, timeout: float) -> None:
        """Return once something changed after ``generation`` was read, or after ``timeout``."""
        async with self._changed:
            if generation == self.generation:
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout)
                except asyncio.TimeoutError:
                    pass


def list_page(tasks: list[dict[str, Any]], more: bool, max_bytes: int = LIST_PAGE_BYTES) -> dict[str, Any]:
    """A list reply: the first ``tasks`` that fit in ``max_bytes`` encoded, and ``next_before``,
    the cursor for the next page (None when the ledger has no more for this query)."""
    page, size = [], 0
    for task in tasks:
        size += len(json.dumps(task)) + 2
        if size > max_bytes and page:
            more = True
            break
        page.append(task)
    return {"tasks": page, "next_before": page[-1]["task_id"] if more and page else None}


class Queries:
    """Answers RPC methods from the ledger; ``counters()`` gives the service's ingestion figures."""

    def __init__(self, ledger: Ledger, changes: LedgerChanges, counters: Callable[[], dict[str, int]],
                 admins: Iterable[str] = ()):
        self.ledger = ledger
        self.changes = changes
        self.counters = counters
        self.admins = frozenset(admins)

    async def handle(self, method: str, params: dict[str, Any], user: str | None = None) -> RpcReply:
        """Answer one query of ``user`` (the request's broker-checked ``user_id``; None: nobody
        vouched for); every failure becomes ``ok=false`` with a message. Who runs what is
        everyone's to see; a task's output and env values only its owner's and the admins'."""
        handler = getattr(self, f"_rpc_{method}", None)
        if handler is None:
            return RpcReply(ok=False, error=f"unknown method {method!r}")
        try:
            return RpcReply(ok=True, result=await handler(params, user))
        except ValidationError as exc:
            return RpcReply(ok=False, error=f"bad params for {method}: {one_line(exc)}")
        except (UnknownTask, OutputMissing, ValueError) as exc:
            return RpcReply(ok=False, error=str(exc))
        except Exception as exc:
            log.exception("RPC %s failed", method)
            return RpcReply(ok=False, error=f"internal error in {method}: {one_line(exc)}")

    async def _rpc_status(self, params: dict, user: str | None) -> dict:
        query = StatusParams.model_validate(params)
        tasks = await self.ledger.get_tasks(query.task_ids)
        return {"tasks": [identity.hide_env(task, user, self.admins) for task in tasks],
                "admin": bool(user) and user in self.admins}   # the client's kill asks this first

    async def _rpc_list_tasks(self, params: dict, user: str | None) -> dict:
        query = ListTasksParams.model_validate(params)
        tasks = await self.ledger.list_tasks(state=query.state, node=query.node, batch=query.batch,
                                             limit=query.limit + 1, before=query.before, user=query.user)
        return list_page(tasks[:query.limit], more=len(tasks) > query.limit)

    async def _rpc_list_nodes(self, params: dict, user: str | None) -> dict:
        _Params.model_validate(params)
        return {"nodes": await self.ledger.list_nodes()}

    async def _rpc_health(self, params: dict, user: str | None) -> dict:
        query = HealthParams.model_validate(params)
        nodes = await self.ledger.list_nodes(query.node)
        if query.node is not None and not nodes:
            raise ValueError(f"unknown node {query.node!r}")
        return {"nodes": nodes,
                "host": {"version": __version__, "database": self.ledger.dialect,
                         **self.counters()}}

    async def _rpc_output(self, params: dict, user: str | None) -> dict:
        query = OutputParams.model_validate(params)
        owner = await self.ledger.owner(query.task_id)
        if (why := identity.refusal(user, query.task_id, owner, self.admins)) is not None:
            raise ValueError(why)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.wait
        while True:
            generation = self.changes.generation
            piece = await self.ledger.read_output(query.task_id, query.stream, query.offset, query.length,
                                                  query.attempt)
            remaining = deadline - loop.time()
            if piece.data or piece.terminal or remaining <= 0:
                break
            await self.changes.wait_past(generation, remaining)
        return {"data": base64.b64encode(piece.data).decode("ascii"), "offset": piece.offset, "size": piece.size,
                "state": piece.state, "terminal": piece.terminal, "attempt": piece.attempt}
