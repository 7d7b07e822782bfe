"""The client's conversation with the broker, usable from Python as well as from the CLI.

Submitting needs only the broker: targets are checked against each runner's retained
node info, every task is encoded and checked against the receivers' bounds before the
first one goes out, task messages go out ``mandatory`` with pipelined publisher confirms,
and ``wait`` listens on the events exchange (subscribed before publishing, so no event
can slip by). Queries go to the host over RPC.

    async with Client(config) as client:
        tasks = client.make_tasks(spec, targets=["node1"])
        await client.check_targets(tasks)
        waiter = await client.waiter([t.task_id for t in tasks])
        await client.submit(tasks)
        results = await waiter.wait()

Callbacks (``on_confirmed``, a waiter's ``on_state`` and ``on_output``) run inside the
broker library's consumer; an exception one raises ends the wait with that exception
instead of being lost there.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from pydantic import ValidationError

from client.checks import node_refusal, offline_note, pool_refusal
from client.errors import BadRequest, NotYours, WrongState  # noqa: F401  (part of this API)
from hakuriver import broker, identity, ids, rpc
from hakuriver.rpc import HostUnavailable
from hakuriver.config import Config
from hakuriver.messages import Kill, MessageTooLarge, NodeInfo, OutputChunk, StateEvent, Task, one_line
from hakuriver.states import TaskState
from hakuriver.tls import client_ssl_context
from hakuriver.topology import ALL_NODES_KEY, HELD_KEY, POOL_KEY, Topology, parse_target

PER_TASK_BINDINGS_UP_TO = 200   # beyond this a waiter binds task.*.<kind> and filters
PUBLISH_WINDOW = 512            # publishes awaiting their confirm at once
POOL_CHECK_TIMEOUT = 2.0        # how long a pool submission asks the host for its nodes' sizes
CATCH_UP_EVERY_S = 2.0          # after a reconnect, how often a waiter asks the ledger for missed ends

Output = Callable[[str, bytes], None]   # (stream, bytes) of a followed task's output


def write_output(stream: str, data: bytes) -> None:
    """The default for followed output: the task's stdout on ours, its stderr on ours."""
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    out.write(data)
    out.flush()


@dataclass
class TaskSpec:
    """What the user asked for, before it becomes one task per target."""

    command: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cores: float = 0
    memory: int | None = None
    gpus: int = 0                      # any N free GPUs (a target's ::IDS names them instead)
    container: str | None = None
    privileged: bool = False
    mounts: list = field(default_factory=list)
    retries: int = 0                   # runs after the first, for an attempt that ends failed or lost
    retry_delay: float | None = None   # None: the messages' default
    after: list[int] = field(default_factory=list)  # held by the host until these tasks completed


class Client:
    def __init__(self, config: Config):
        self.config = config
        self.topo = Topology(config.broker.prefix, config.broker.queue_type)
        # Who we are to the broker: every message we send carries it as ``user_id``, and the
        # broker refuses any other, so runners and the host know the owner for certain.
        self.user = identity.broker_user(config.broker.url)
        self._connection = None
        self._exchanges: broker.Exchanges | None = None
        self._events_queue = None
        self._waiters: set[Waiter] = set()
        self._background: set[asyncio.Task] = set()

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        self._connection = await broker.connect(self.config.broker.url, "hakuriver.client",
                                                ssl_context=client_ssl_context(self.config.broker))
        self._channel = await self._connection.channel(publisher_confirms=True)
        self._rpc = rpc.RpcClient(self._channel, self.topo, user_id=self.user)

    async def exchanges(self) -> broker.Exchanges:
        """The exchanges, found on first use (queries need none). Looked up, not declared: a
        client user may not configure them (the runners and the host declare them)."""
        if self._exchanges is None:
            self._exchanges = await broker.find_exchanges(self._connection, self._channel, self.topo)
        return self._exchanges

    async def _events(self):
        """This client's one exclusive queue on the events exchange; waiters bind their keys to it."""
        if self._events_queue is None:
            channel = await self._connection.channel()
            self._events_exchange = await channel.get_exchange(self.topo.events, ensure=False)
            self._events_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await self._events_queue.consume(self._on_event, no_ack=True)
            self._connection.reconnect_callbacks.add(self._on_reconnect)
        return self._events_queue

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        for waiter in list(self._waiters):
            waiter.on_message(message)

    def _on_reconnect(self, *_: Any) -> None:
        for waiter in list(self._waiters):
            self._in_background(waiter.resubscribe())

    async def _bind_events(self, keys: list[str]) -> None:
        """Bind ``keys`` to this client's events queue without waiting for the broker's answers.

        Why: a bind the broker answers costs a broker round trip (about 2 ms here, 40 % of
        the submit) before the task may be published, and the waiter must be bound first, or an
        early event could pass by. Sent ``nowait`` on the channel the tasks (and queries) are
        published on, the binds reach the broker before whatever this client sends next on it,
        and RabbitMQ works through a channel's methods in order: the binding exists before the
        task is routed. A bind the broker refuses closes that channel; the publish after it then
        fails, with the broker's reason.

        aio-pika does not know these bindings, so it cannot restore them after a reconnect:
        :meth:`Waiter.resubscribe` binds them again (a new events queue has none).
        """
        queue = await self._events()
        channel = await self._channel.get_underlay_channel()
        for key in keys:
            await channel.queue_bind(queue.name, self.topo.events, key, nowait=True)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._connection is not None:
            await self._connection.close()
        self._connection, self._exchanges, self._events_queue = None, None, None
        self._waiters.clear()

    def _in_background(self, coro) -> None:
        """Run ``coro`` without waiting for it (house-keeping nobody needs to wait on; ``close``
        cancels what is left)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- submitting -------------------------------------------------------------------

    def make_tasks(self, spec: TaskSpec, targets: list[str],
                   arg_lists: Iterable[list[str]] | None = None) -> list[Task]:
        """One task per target (or per combination, round-robin over the targets), one batch id."""
        batch = ids.new_id()
        user, host, now = self.user, socket.gethostname(), time.time()
        parsed = [parse_target(t) for t in (targets or [POOL_KEY])]
        common = dict(batch_id=batch, command=spec.command, env=spec.env, cores=spec.cores, memory=spec.memory,
                      container=spec.container, privileged=spec.privileged, mounts=spec.mounts,
                      user=user, submit_host=host, submitted_at=now, retries=spec.retries, after=spec.after)
        if spec.retry_delay is not None:
            common["retry_delay"] = spec.retry_delay

        def placed(target) -> dict:
            gpus = None if target.gpus is None else list(target.gpus)
            return dict(target=target.node, numa=target.numa, gpus=gpus,
                        gpu_count=spec.gpus if gpus is None else len(gpus))

        try:
            if arg_lists is None:
                return [Task(task_id=ids.new_id(), args=spec.args, **placed(target), **common) for target in parsed]
            return [Task(task_id=ids.new_id(), args=args, **placed(parsed[i % len(parsed)]), **common)
                    for i, args in enumerate(arg_lists)]
        except ValidationError as exc:  # the receivers' own rules, said in one line
            raise BadRequest(f"invalid task: {one_line(exc)}") from None

    async def node_info(self, node: str) -> NodeInfo | None:
        """The runner's retained self-description; None if the node is unknown to the broker."""
        found = await self._node_view(node)
        return None if found is None else found[0]

    async def _node_view(self, node: str) -> tuple[NodeInfo, bool] | None:
        """The node's info and whether its runner is connected now (it consumes its control
        queue whenever it is); None if the node is unknown to the broker."""
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(self.topo.nodeinfo_queue(node), passive=True)
            control = await channel.declare_queue(self.topo.control_queue(node), passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return None
        connected = control.declaration_result.consumer_count > 0
        try:
            for _ in range(50):  # another client may hold the one message for a moment
                message = await queue.get(no_ack=False, fail=False)
                if message is not None:
                    await message.nack(requeue=True)
                    return NodeInfo.from_bytes(message.body), connected
                await asyncio.sleep(0.01)
            return NodeInfo(node=node), connected
        finally:
            await channel.close()

    async def check_targets(self, tasks: list[Task]) -> list[str]:
        """Refuse what can never run, before anything is published: unknown nodes, NUMA ids a
        node does not have, more cores or memory than the node (or, for the pool, any node)
        has. Returns notes for people: targeted nodes whose runner is not connected now."""
        wanted: dict[str, set[int]] = {}
        gpu_ids: dict[str, set[int]] = {}
        for task in tasks:
            if task.target != POOL_KEY:
                wanted.setdefault(task.target, set())
                if task.numa is not None:
                    wanted[task.target].add(task.numa)
                gpu_ids.setdefault(task.target, set()).update(task.gpus or ())
        cores, memory = max((t.cores for t in tasks), default=0), max((t.memory or 0 for t in tasks), default=0)
        views = await asyncio.gather(*(self._node_view(node) for node in wanted))
        notes = []
        for (node, numas), view in zip(wanted.items(), views):
            if view is None:
                raise BadRequest(f"unknown node {node!r}")
            info, connected = view
            refusal = node_refusal(node, info.numa, info.cores, info.memory, info.gpus, numas, cores, memory,
                                   sorted(gpu_ids[node]),
                                   max((t.gpu_count for t in tasks if t.target == node), default=0))
            if refusal is not None:
                raise BadRequest(refusal)
            if not connected:
                notes.append(offline_note(node))
        pool = [t for t in tasks if t.target == POOL_KEY and (t.cores or t.memory or t.gpu_count)]
        if pool:
            await self._check_pool_fits(max(t.cores for t in pool), max(t.memory or 0 for t in pool),
                                        max(t.gpu_count for t in pool))
        return notes

    async def _check_pool_fits(self, cores: float, memory: int, gpus: int = 0) -> None:
        """Refuse a pool task that no node the host knows could ever hold (it would wait
        forever). Without an answer from the host the check is skipped: submitting needs
        the broker only."""
        try:
            nodes = (await self.query("list_nodes", {}, timeout=POOL_CHECK_TIMEOUT))["nodes"]
        except (HostUnavailable, BadRequest):
            return
        refusal = pool_refusal(nodes, cores, memory, gpus)
        if refusal is not None:
            raise BadRequest(refusal)

    async def submit(self, tasks: list[Task], on_confirmed: Callable[[Task], None] | None = None) -> None:
        """Publish the tasks, pipelined, confirms awaited.

        Every task is encoded first: one that its receivers would refuse for its size
        raises BadRequest before anything is published. ``on_confirmed`` is called in
        submission order once a task is safely with the broker (the CLI prints its id then).
        A task that comes back unroutable raises BadRequest.
        """
        try:
            bodies = [task.to_bytes() for task in tasks]
        except MessageTooLarge as exc:
            raise BadRequest(str(exc)) from None
        exchanges = await self.exchanges()
        returned: list[str] = []
        for start in range(0, len(tasks), PUBLISH_WINDOW):
            window = tasks[start:start + PUBLISH_WINDOW]
            results = await asyncio.gather(*(self._publish_task(exchanges, task, body) for task, body
                                             in zip(window, bodies[start:start + PUBLISH_WINDOW])))
            for task, result in zip(window, results):
                if result is not None:
                    returned.append(HELD_KEY if task.after else task.routing_key)
                elif on_confirmed is not None:
                    on_confirmed(task)
            if HELD_KEY in returned:
                raise BadRequest("no host holds tasks for --after yet (is hakuriver.host running?)")
            if returned and set(returned) == {POOL_KEY}:
                raise BadRequest("no runner has joined the pool yet (--target any)")
            if returned:
                raise BadRequest(f"unknown node {next(key for key in returned if key != POOL_KEY)!r}")

    async def _publish_task(self, exchanges: broker.Exchanges, task: Task, body: bytes):
        """Publish one task (``body``, its encoding); returns the returned message if the
        broker could not route it.

        The ledger queue is bound to the tasks exchange too, so this one publish is
        also the task's ``pending`` event for the host.
        """
        key = HELD_KEY if task.after else task.routing_key  # --after: to the host, which holds it
        result = await exchanges.tasks.publish(broker.persistent(body, user_id=self.user),
                                               routing_key=key, mandatory=True)
        return result if hasattr(result, "delivery") else None

    async def run(self, spec: TaskSpec, targets: list[str], timeout: float | None = None) -> dict[int, StateEvent]:
        """Submit one task per target and wait until every one has ended: the whole round trip.

        No target pre-check: an unknown node still fails, as the broker returns the task.
        """
        tasks = self.make_tasks(spec, targets)
        waiter = await self.waiter([t.task_id for t in tasks])
        await self.submit(tasks)
        return await waiter.wait(timeout)

    async def waiter(self, task_ids: list[int], follow: bool = False, on_output: Output = write_output) -> "Waiter":
        waiter = Waiter(self, task_ids, follow, on_output)
        await waiter.subscribe()
        return waiter

    async def check_after(self, task_ids: list[int]) -> None:
        """:class:`BadRequest` naming the first of ``task_ids`` (``--after``) the host does not know."""
        if not task_ids:
            return
        known = {t["task_id"] for t in (await self.query("status", {"task_ids": task_ids}))["tasks"]}
        missing = [task_id for task_id in task_ids if task_id not in known]
        if missing:
            raise BadRequest(f"invalid --after {missing[0]}: unknown task")

    # ---- control and queries ----------------------------------------------------------

    async def kill(self, task_id: int) -> dict[str, Any] | None:
        """Send a kill to the task's node, or to every node (routing key ``all``) while the
        host does not know the task's node: the host may not have recorded a task that was
        just submitted, and a runner that receives the task later never runs it.

        Returns the task as the ledger had it; None if the ledger has no record of it (yet)
        or the host could not be asked. :class:`NotYours`, and nothing sent, if the ledger
        says it is someone else's (the runner checks again: it has the owner from ``user_id``)."""
        try:
            answer = await self.query("status", {"task_ids": [task_id]}, timeout=3.0)
        except HostUnavailable:
            answer = {"tasks": []}
        task = answer["tasks"][0] if answer["tasks"] else None
        if task is not None:
            self._check_ours(task_id, task, answer)
        if task is not None and TaskState(task["state"]).terminal:
            return task
        # Held by the host, or between two attempts (a pool task's next may go anywhere): to everyone,
        # the host included (it ends a held task itself).
        anywhere = task is None or not task.get("node") or task["state"] in (TaskState.HELD, TaskState.RETRYING)
        node = ALL_NODES_KEY if anywhere else task["node"]
        body = broker.persistent(Kill(task_id=task_id, user=self.user).to_bytes(), user_id=self.user)
        control = (await self.exchanges()).control
        result = await control.publish(body, routing_key=node, mandatory=True)
        if hasattr(result, "delivery") and node != ALL_NODES_KEY:
            await control.publish(body, routing_key=ALL_NODES_KEY, mandatory=False)
        return task

    def _check_ours(self, task_id: int, task: dict[str, Any], answer: dict[str, Any]) -> None:
        """:class:`NotYours` unless we own ``task`` or are an admin (the host's status answer says which)."""
        admins = [self.user] if answer.get("admin") else []
        if (why := identity.refusal(self.user, task_id, task.get("user"), admins)) is not None:
            raise NotYours(why)

    async def pause(self, task_id: int, resume: bool = False) -> dict[str, Any]:
        """Send a pause (or resume) to the node of a running (or paused) task; the task as the
        ledger had it. Unlike a kill it needs the task's node and state from the host:
        :class:`BadRequest` for an unknown task, :class:`WrongState` (nothing sent) for a task
        in any other state. The runner checks again, for a task that ended meanwhile."""
        answer = await self.query("status", {"task_ids": [task_id]})
        if not answer["tasks"]:
            raise BadRequest(f"unknown task {task_id}")
        task = answer["tasks"][0]
        self._check_ours(task_id, task, answer)
        needed = TaskState.PAUSED if resume else TaskState.RUNNING
        if task["state"] != needed:
            raise WrongState(f"task {task_id} is {task['state']}: only a {needed} task can be "
                             f"{'resumed' if resume else 'paused'}")
        body = broker.persistent(Kill(task_id=task_id, user=self.user, action="resume" if resume else "pause").to_bytes(),
                                 user_id=self.user)
        await (await self.exchanges()).control.publish(body, routing_key=task["node"], mandatory=True)
        return task

    async def query(self, method: str, params: dict[str, Any], timeout: float = 5.0) -> Any:
        try:
            return await self._rpc.call(method, params, timeout=timeout)
        except rpc.RpcError as exc:
            if identity.is_refusal(str(exc)):
                raise NotYours(str(exc)) from None
            raise BadRequest(str(exc)) from None

    async def list_tasks(self, limit: int = 50, before: int | None = None, **filters: Any
                         ) -> tuple[list[dict[str, Any]], int | None]:
        """Up to ``limit`` task summaries, newest first, asking page by page (the host bounds
        each reply in bytes); and the cursor for the next page (``before``), None at the end.
        ``filters``: state, node, batch, user."""
        tasks: list[dict[str, Any]] = []
        while len(tasks) < limit:
            page = await self.query("list_tasks", {**filters, "limit": limit - len(tasks), "before": before})
            tasks += page["tasks"]
            before = page.get("next_before")
            if before is None or not page["tasks"]:
                return tasks, None
        return tasks, before

    async def read_output(self, task_id: int, stream: str, write: Callable[[bytes], None],
                          follow: bool = False, attempt: int | None = None) -> dict[str, Any]:
        """Copy a task's stored output to ``write``, page by page; with ``follow``, until the task ends.
        ``attempt``: that attempt of a retried task (default: the latest)."""
        import base64

        offset, following = 0, None
        while True:
            params = {"task_id": task_id, "stream": stream, "offset": offset, "length": 4 << 20,
                      "wait": 5.0 if follow else 0.0}
            if attempt is not None:
                params["attempt"] = attempt
            page = await self.query("output", params, timeout=15.0)
            if following is not None and page.get("attempt", 1) != following:
                offset = 0  # --follow across a retry: the next attempt's output, from its start
                following = page.get("attempt", 1)
                continue
            following = page.get("attempt", 1)
            data = base64.b64decode(page["data"])
            if data:
                write(data)
                offset += len(data)
            if offset < page["size"]:
                continue
            if not follow or page["terminal"]:
                return page


class Waiter:
    """Follows the events of some tasks until each one is terminal."""

    def __init__(self, client: Client, task_ids: list[int], follow: bool, on_output: Output = write_output):
        self.client = client
        self.task_ids = frozenset(task_ids)
        self.pending = set(task_ids)
        self.results: dict[int, StateEvent] = {}
        self.follow = follow
        self.on_state: Callable[[StateEvent], None] | None = None
        self.on_output = on_output
        self._failure: BaseException | None = None   # raised by a callback; ends the wait
        self._done = asyncio.Event()
        self._written: dict[tuple[int, str, int], int] = {}  # bytes of each task's stream (per attempt) written so far
        self._catching_up = False
        if not self.pending:
            self._done.set()

    async def subscribe(self) -> None:
        self._keys: list[str] = []
        # Many tasks: one wildcard binding per kind instead of thousands, the others' events filtered here.
        self._wildcard = len(self.pending) > PER_TASK_BINDINGS_UP_TO
        for task_id in ["*"] if self._wildcard else self.pending:  # "*": any one word of a topic key
            self._keys.append(Topology.state_key(task_id))
            if self.follow:
                self._keys += [Topology.output_key(task_id, "stdout"), Topology.output_key(task_id, "stderr")]
        self.client._waiters.add(self)
        await self.client._bind_events(self._keys)

    async def resubscribe(self) -> None:
        """After a reconnect: bind again (the events queue is new), then catch up on what passed."""
        try:
            await self.client._bind_events(self._keys)
        finally:
            await self.catch_up()

    def on_message(self, message: AbstractIncomingMessage) -> None:
        key = message.routing_key or ""
        try:
            if key.endswith(".state"):
                try:
                    events = StateEvent.all_from_bytes(message.body)  # others' too, if combined with ours
                except ValueError:
                    return
                for event in events:
                    self._record(event)
            elif self.follow:
                self._write_chunk(message)
        except Exception as exc:  # from a callback: end the wait with it, not lost in aio-pika's consumer
            self._failure = exc
            self._done.set()

    def _record(self, event: StateEvent) -> None:
        if event.task_id not in self.pending:
            return
        if self.on_state is not None:
            self.on_state(event)
        if event.state.terminal:
            self.pending.discard(event.task_id)
            self.results[event.task_id] = event
            if not self.pending:
                self._done.set()
                self.client._waiters.discard(self)

    def _write_chunk(self, message: AbstractIncomingMessage) -> None:
        try:
            chunk = OutputChunk.from_headers(message.headers or {}, message.body)
        except ValueError:
            return
        if chunk.task_id not in self.task_ids:
            return  # another client's task, under a wildcard binding
        already = self._written.get((chunk.task_id, chunk.stream, chunk.attempt), 0)
        end = chunk.offset + len(message.body)
        if end <= already or chunk.offset > already:
            return  # a duplicate, or ahead of a gap (the ledger still has every byte)
        self.on_output(chunk.stream, message.body[already - chunk.offset:])
        self._written[(chunk.task_id, chunk.stream, chunk.attempt)] = end

    async def catch_up(self) -> None:
        """After a reconnect: ask the ledger for tasks whose final event passed while we were away.

        Events published while this client's queue was gone (its broker node died, it is
        re-declared on the next one) never reach it; the ledger queue is durable, so the host
        gets them, but perhaps only after it has itself reconnected and caught up. So ask
        again every CATCH_UP_EVERY_S until every task is terminal, not once."""
        if self._catching_up:
            return
        self._catching_up = True
        try:
            while self.pending:
                try:
                    found = await self.client.query("status", {"task_ids": sorted(self.pending)}, timeout=5.0)
                except Exception:  # host or broker not back yet: ask again
                    found = {"tasks": []}
                for task in found["tasks"]:
                    state = TaskState(task["state"])
                    if state.terminal:
                        self._record(StateEvent(task_id=task["task_id"], node=task.get("node"), state=state,
                                                seq=0, exit_code=task.get("exit_code"),
                                                message=task.get("message") or ""))
                if self.pending:
                    await asyncio.sleep(CATCH_UP_EVERY_S)
        finally:
            self._catching_up = False

    async def wait(self, timeout: float | None = None) -> dict[int, StateEvent]:
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        finally:
            self.client._waiters.discard(self)
        if not self._wildcard:  # per-task bindings are of no use to anyone now (a wildcard may be shared)
            self.client._in_background(self._unbind())
        if self._failure is not None:
            raise self._failure
        return self.results

    async def _unbind(self) -> None:
        queue, exchange = self.client._events_queue, self.client._events_exchange
        await asyncio.gather(*(queue.unbind(exchange, key) for key in self._keys), return_exceptions=True)
