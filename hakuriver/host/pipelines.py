"""Pipelines: tasks submitted with ``--after`` are held by the host until the tasks they wait for completed.

Why it exists: a pipeline must not need a shell kept open on ``--wait``. Someone has to hold
the later stage and release it when the earlier ones end, and survive restarts while doing so.
The host is that holder: it is the one process that learns every task's end (the ledger), and
the ledger is durable. So a task with ``after`` is published with the routing key ``_held``
(:data:`hakuriver.topology.HELD_KEY`), which only the host's ``<p>.pipelines`` queue binds; the host
records it (state ``held``, its whole body in the table ``held_tasks``) and acks.

After every ledger batch that ended a task, after each newly held task, and at start,
:meth:`Pipelines.resolve` looks at every held task (:func:`verdict`, a pure function):

- every task it waits for ``completed``: it is published to its real target through the
  host's outbox, and its row goes ``pending`` (from there on it is an ordinary task);
- one of them ended any other way (failed, killed, lost, rejected, or was itself rejected
  for a failed dependency): it never runs; it ends ``rejected``, saying which dependency
  ended how, and that rejection reaches the tasks held after it in the same pass;
- otherwise it waits on.

Each decision is made once: the outbox row is committed first, then the ledger row leaves
``held`` and the held body is deleted in one transaction. A crash between the two finds the
task still held on restart and publishes it again; runners drop a task id they already have.

A kill of a held task comes to every runner (``all``: it has no node), and ``<p>.pipelines`` binds
``all`` on the control exchange too, so the host sees it and ends the task ``killed`` (owner or
admin, :mod:`hakuriver.identity`); the runners' tombstones are then never used.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from sqlalchemy import JSON, BigInteger, Column, Integer, Table, Text, delete, insert, select, update

from hakuriver import broker, identity
from hakuriver.host.ledger import Ledger, metadata, tasks_table
from hakuriver.messages import Kill, StateEvent, Task, one_line
from hakuriver.outbox import Outbox
from hakuriver.states import TaskState
from hakuriver.topology import ALL_NODES_KEY, HELD_KEY, Topology

log = logging.getLogger(__name__)

SOURCE = "host (pipelines)"
# The event that ends a held task (rejected or killed) is its first after ``held`` (seq 0).
END_SEQ = 1

held_table = Table(
    "held_tasks", metadata,
    Column("task_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),     # the task as submitted, published as it is when released
    Column("after", JSON, nullable=False),
)


def verdict(after: Iterable[int], states: dict[int, str]) -> tuple[str, str] | None:
    """What becomes of a task held ``after`` these tasks, whose states are ``states`` now:
    ``("release", why)``, ``("reject", why)``, or None (it waits on). A task not in ``states``
    (not recorded yet) is one that has not ended."""
    after = list(after)
    for task_id in after:
        state = states.get(task_id)
        if state is not None and state != TaskState.COMPLETED and TaskState(state).terminal:
            return "reject", f"dependency {task_id} ended {state}: never run"
    if all(states.get(task_id) == TaskState.COMPLETED for task_id in after):
        return "release", f"released: {', '.join(map(str, after))} completed"
    return None


class Pipelines:
    """The host's holder of ``--after`` tasks (see the module docstring)."""

    def __init__(self, ledger: Ledger, outbox: Outbox, topo: Topology, services: frozenset[str],
                 admins: Iterable[str]):
        self.ledger, self.outbox, self.topo = ledger, outbox, topo
        self.services, self.admins = services, frozenset(admins)
        self._exchanges: broker.Exchanges | None = None
        # Whether any task may be held: resolve() after a batch costs nothing while none is (the usual case).
        self._holding = True

    async def open(self) -> None:
        async with self.ledger.engine.begin() as conn:
            await conn.run_sync(lambda sync: held_table.create(sync, checkfirst=True))

    async def consume(self, channel: AbstractChannel, exchanges: broker.Exchanges) -> tuple[Any, str]:
        """Declare and consume ``<p>.pipelines``: tasks sent with HELD_KEY, and kills sent to every node."""
        self._exchanges = exchanges
        queue = await channel.declare_queue(self.topo.pipelines, durable=True,
                                            arguments=self.topo.durable_args(delivery_limit=True))
        await queue.bind(exchanges.tasks, HELD_KEY)
        await queue.bind(exchanges.control, ALL_NODES_KEY)
        return queue, await queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            if message.exchange == self.topo.tasks:
                await self.hold(self._task(message))
            elif message.user_id:  # a kill without a user is the runners' to dead-letter
                control = Kill.from_bytes(message.body)
                if control.action == "kill":
                    await self.kill(control.task_id, message.user_id)
        except ValueError as exc:
            await broker.dead_letter(self._exchanges, message, f"invalid held task: {one_line(exc)}", SOURCE)
            return
        await message.ack()

    def _task(self, message: AbstractIncomingMessage) -> Task:
        task = Task.from_bytes(message.body)
        if not task.after:
            raise ValueError(f"task {task.task_id} was sent to be held but waits for nothing")
        return task.model_copy(update={"user": identity.task_owner(message.user_id, message.headers, self.services)})

    # -- holding, killing, releasing -----------------------------------------------------

    async def hold(self, task: Task) -> None:
        """Record ``task`` as held (again, if this is a redelivery: nothing changes), then resolve."""
        async with self.ledger.write_lock, self.ledger.engine.begin() as conn:
            known = (await conn.execute(select(held_table.c.task_id)
                                        .where(held_table.c.task_id == task.task_id))).first()
            recorded = (await conn.execute(select(tasks_table.c.state)
                                           .where(tasks_table.c.task_id == task.task_id))).first()
            if known is None and recorded is None:  # a redelivery after its release finds its row: nothing to hold
                await conn.execute(insert(held_table), [{"task_id": task.task_id, "body": task.model_dump_json(),
                                                         "after": task.after}])
        await self.ledger.ingest(events=[StateEvent(task_id=task.task_id, state=TaskState.HELD, seq=0, task=task,
                                                    time=task.submitted_at)])
        self._holding = True
        await self.resolve()

    async def kill(self, task_id: int, by: str) -> bool:
        """End a held task ``killed`` if ``by`` may (owner or admin); False if it is not held here."""
        async with self.ledger.write_lock, self.ledger.engine.begin() as conn:
            row = (await conn.execute(select(held_table.c.body).where(held_table.c.task_id == task_id))).first()
            if row is None:
                return False
            owner = Task.model_validate_json(row.body).user
            if by not in self.services and (why := identity.refusal(by, task_id, owner, self.admins)):
                log.warning("kill of held task %d by %s refused: %s", task_id, by, why)
                return False
            event = StateEvent(task_id=task_id, state=TaskState.KILLED, seq=END_SEQ, message="killed while held")
            self._send(events=[event])
            await self._end(conn, [event])
        return True

    async def resolve(self) -> None:
        """Release or reject every held task whose dependencies decided it (module docstring)."""
        if not self._holding:
            return
        async with self.ledger.write_lock, self.ledger.engine.begin() as conn:
            held = {row.task_id: row for row in await conn.execute(
                select(held_table.c.task_id, held_table.c.body, held_table.c.after))}
            if not held:
                self._holding = False
                return
            wanted = sorted({d for row in held.values() for d in row.after} | set(held))
            states = {row.task_id: row.state for row in await conn.execute(
                select(tasks_table.c.task_id, tasks_table.c.state).where(tasks_table.c.task_id.in_(wanted)))}
            released: list[tuple[Task, str]] = []
            rejected: list[StateEvent] = []
            undecided = dict(held)
            changed = True
            while changed:  # a rejection reaches the tasks held after the rejected one, in this pass
                changed = False
                for task_id, row in list(undecided.items()):
                    decided = verdict(row.after, states)
                    if decided is None:
                        continue
                    kind, why = decided
                    del undecided[task_id]
                    changed = True
                    if kind == "release":
                        released.append((Task.model_validate_json(row.body), why))
                    else:
                        rejected.append(StateEvent(task_id=task_id, state=TaskState.REJECTED, seq=END_SEQ,
                                                   message=why))
                        states[task_id] = TaskState.REJECTED.value
            if not released and not rejected:
                return
            self._send(events=rejected, tasks=[task for task, _ in released])
            await self._end(conn, rejected)
            for task, why in released:
                log.info("task %d %s", task.task_id, why)
                await conn.execute(update(tasks_table)
                                   .where(tasks_table.c.task_id == task.task_id,
                                          tasks_table.c.state == TaskState.HELD.value)
                                   .values(state=TaskState.PENDING.value, message=why))
            await conn.execute(delete(held_table).where(held_table.c.task_id.in_([t.task_id for t, _ in released])))

    def _send(self, events: list[StateEvent] = (), tasks: list[Task] = ()) -> None:
        """Commit what the decision publishes to the outbox first: a crash after this and before the
        ledger's commit publishes it again on restart (a duplicate the runners drop), never not at all."""
        with self.outbox.db:
            for event in events:
                self.outbox.add(self.topo.events, Topology.state_key(event.task_id), event.to_bytes())
            for task in tasks:
                self.outbox.add(self.topo.tasks, task.routing_key, task.to_bytes(), {identity.OWNER_HEADER: task.user})

    async def _end(self, conn: Any, events: list[StateEvent]) -> None:
        """Apply ending events (rejected, killed) to held tasks' rows and forget their held bodies."""
        if not events:
            return
        now = time.time()
        for event in events:
            log.info("held task %d: %s", event.task_id, event.message)
            await conn.execute(update(tasks_table)
                               .where(tasks_table.c.task_id == event.task_id,
                                      tasks_table.c.state == TaskState.HELD.value)
                               .values(state=event.state.value, seq=event.seq, message=event.message,
                                       finished_at=now))
        await conn.execute(delete(held_table).where(held_table.c.task_id.in_([e.task_id for e in events])))
