"""The runner: one per machine, the whole task life cycle on that machine.

    node queue ──► accept (store + ``queued`` event confirmed, then ack)
    pool queue ──► accept only while there is room; a task this node can never run
                   is left to the others, or rejected when no online node can (peers)
                       │
                 waiting list ──► admission ──► executor.start ──► ``running``
                       └──► why it waits (a ``queued`` event again, when the reason changes)
                                                     │
                              output files ──► chunks (bounded, by offset)
                                                     │
                                             executor.wait ──► flush output ──► final event
                                                     └──► or, failed/lost with retries left (runner/retries.py):
                                                          ``retrying``, then the next attempt waits again
                                                          (a pool task goes back to the pool)
    control queue ──► kill (running or paused: stop the process tree; waiting: never start it)
                  ──► pause / resume (running tasks only: the executor freezes the whole tree)
    every heartbeat_interval ──► heartbeat (resources, NUMA, running ids)
    others' heartbeats ──► peers (who could run a pool task this node cannot), bound only
                           while such a task asks (runner/peers.py): O(N) traffic when idle

Every event leaves through the store's outbox, so none is lost while the broker
is away. The runner only talks to executors through their interface.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import psutil
from aio_pika.abc import AbstractIncomingMessage

import hakuriver
from hakuriver import broker, identity
from hakuriver.config import Config
from hakuriver.messages import Heartbeat, Kill, NodeInfo, Task, one_line
from hakuriver.states import TaskState
from hakuriver.tls import client_ssl_context
from hakuriver.topology import ALL_NODES_KEY, POOL_KEY, Topology
from runner import accounts
from runner.admission import Admission, Capacity, WaitingTasks
from runner.executors.base import Executor, Handle, Outcome, PauseRefused, RunSpec, StartFailed, TaskRejected
from runner.executors.select import available_executors, executor_for, usable
from runner.gpus import Inventory
from runner.numa import detect_topology
from runner.output import OutputStream, create_output_files
from runner.peers import NodeView, Peers, pool_refusal
from runner.policy import refusal
from runner.retries import next_attempt
from runner.store import RunnerStore

log = logging.getLogger(__name__)

OUTPUT_POLL_S = 0.05
FINISHED_KEEP_S = 7 * 24 * 3600
# Why a task waits is worked out at most this often, and told only for tasks that have
# waited this long and only when it changed: a task that starts at once costs no extra
# event, and a long queue costs one event per task per change of reason, not per freed core.
WAIT_REASON_EVERY_S = 1.0
WAIT_REASONS_PER_PASS = 1000  # events per pass at most: a deep queue is told over a few passes
# After a kill of a task this runner has not seen, it looks at the head of the pool for this
# long even without room: the task may wait there, and the kill must end it now, not once
# some node has room for it.
KILL_LOOK_S = 5.0


@dataclass
class Running:
    task: Task
    executor: Executor
    output: OutputStream
    handle: Handle | None = None  # None while the executor starts it (image load, ...)
    starting: asyncio.Future | None = None  # executor.start while it runs: a kill cancels it
    kill_requested: bool = False
    ending: bool = False  # its outcome is known; the final event is on its way
    paused: bool = False  # stopped by a pause; keeps its resources


class Runner:
    def __init__(self, config: Config, executors: dict[str, Executor] | None = None):
        self.config = config
        self.node = config.node.node_name
        self.topo = Topology(config.broker.prefix, config.broker.queue_type)
        # hakuriver.identity: our own broker user (every event we send carries it as user_id),
        # whose events and kills we believe, and who may act on every task.
        self.user = identity.broker_user(config.broker.url)
        self.services = identity.service_accounts(config.broker.url, config.security.service_accounts)
        self.admins = frozenset(config.security.admins)
        self.state_dir = Path(config.paths.state_dir) / f"runner-{self.node}"
        self.output_dir = self.state_dir / "output"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.store = RunnerStore(self.state_dir / "store.db", self.topo, self.node)
        self.numa = detect_topology()
        cores = config.node.cores or os.cpu_count() or 1
        memory = config.node.memory_bytes or psutil.virtual_memory().total
        # executors first: a setting this machine cannot honour stops the runner before anything else is said
        self.executors = executors if executors is not None else available_executors(config)
        self.gpus = Inventory(config.node.gpus)
        self.admission = Admission(Capacity(cores, memory, self.numa, tuple(self.gpus.indices)))
        self.waiting = WaitingTasks()
        self._told: dict[int, tuple[float, str]] = {}  # waiting task → (since, reason last told)
        self._next_reasons = 0.0
        self.running: dict[int, Running] = {}
        self.peers = Peers(self.node, config.timing.offline_after)
        self.peers.stop()  # nobody is heard until a pool task asks (see _update_heartbeat_binding)
        self._background: set[asyncio.Task] = set()
        self._schedule_wakeup = asyncio.Event()
        self._output_wakeup = asyncio.Event()  # a task runs: the output loop polls again
        self._pool_queue = None
        self._pool_tag: str | None = None
        self._pool_paused_until = 0.0
        self._pool_look_until = 0.0
        self._beats = None  # this runner's queue of the others' heartbeats, bound only on demand
        self._beats_bound = False
        self._connection = None

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._connection = await broker.connect(self.config.broker.url, f"hakuriver.runner {self.node}",
                                                ssl_context=client_ssl_context(self.config.broker))
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        self.exchanges = await broker.declare_exchanges(self._publish_channel, self.topo)
        await broker.declare_ledger_queue(self._publish_channel, self.topo, self.exchanges)
        await self._publish_node_info()
        await self._recover()
        self._spawn(self.store.outbox.drain_forever(self._publish_raw))
        self._spawn(self._schedule_loop())
        self._spawn(self._output_loop())
        self._spawn(self._heartbeat_loop())
        await self._start_consumers()
        log.info("runner %s: %g cores, %s bytes, NUMA %s, GPUs %s, executors %s", self.node,
                 self.admission.capacity.cores, self.admission.capacity.memory, sorted(self.numa),
                 self.gpus.indices or "none", sorted(self.executors))

    async def stop(self) -> None:
        """Stop taking work and close. Running tasks are left as they are (a restart recovers them)."""
        try:
            if self._connection is not None and not self._connection.is_closed:
                await self._publish_heartbeat(stopping=True)
        except Exception:  # the broker may be gone; the host's timeout covers it
            pass
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(executor.close() for executor in self.executors.values()), return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
        self.store.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_crash)
        return task

    async def _start_consumers(self) -> None:
        channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=64)
        exchanges = await broker.declare_exchanges(channel, self.topo)
        self._consume_exchanges = exchanges
        queue = await channel.declare_queue(self.topo.node_queue(self.node), durable=True,
                                            arguments=self.topo.durable_args(delivery_limit=True))
        node_keys = [self.node, *(f"{self.node}:{numa}" for numa in self.numa)]
        for key in node_keys:
            await queue.bind(exchanges.tasks, key)
        ledger = await broker.declare_ledger_queue(channel, self.topo, exchanges)
        for key in [*node_keys, POOL_KEY]:  # the ledger learns each task as it is submitted
            await ledger.bind(exchanges.tasks, key)
        control = await channel.declare_queue(self.topo.control_queue(self.node), durable=True,
                                              arguments=self.topo.durable_args(delivery_limit=True))
        await control.bind(exchanges.control, self.node)
        await control.bind(exchanges.control, ALL_NODES_KEY)
        await queue.consume(self._on_task_message)
        await control.consume(self._on_control_message)
        # declared and consumed now, bound to the heartbeats only while a pool task asks
        self._beats = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self._beats.consume(self._on_heartbeat, no_ack=True)
        self._connection.reconnect_callbacks.add(self._listen_again)

        pool_channel = await self._connection.channel(publisher_confirms=True)
        await pool_channel.set_qos(prefetch_count=1)
        self._pool_queue = await broker.declare_pool_queue(pool_channel, self.topo, exchanges)
        await self._update_pool_consumer()

    async def _publish_node_info(self) -> None:
        queue_name = self.topo.nodeinfo_queue(self.node)
        await self._publish_channel.declare_queue(
            queue_name, durable=True,
            arguments=self.topo.durable_args(dead_letter=False, **{"x-max-length": 1, "x-overflow": "drop-head"}))
        info = NodeInfo(node=self.node, numa=sorted(self.numa), cores=self.admission.capacity.cores,
                        memory=self.admission.capacity.memory, gpus=self.gpus.indices)
        await self._publish_channel.default_exchange.publish(
            broker.persistent(info.to_bytes()), routing_key=queue_name, mandatory=False)

    async def _publish_raw(self, exchange: str, key: str, body: bytes, headers: dict | None) -> None:
        await broker.publish_persistent(self._publish_channel, exchange, key, body, headers, self.user)

    # ---- taking tasks -----------------------------------------------------------------

    async def _parse_task(self, message: AbstractIncomingMessage) -> Task | None:
        """The task in ``message``, owned by the message's broker-checked ``user_id`` whatever its
        body says (``user`` empty without one: :meth:`_refusal` rejects it); None (and the message
        dead-lettered) if it is not a valid task."""
        try:
            owner = identity.task_owner(message.user_id, message.headers, self.services)
            return Task.from_bytes(message.body).model_copy(update={"user": owner})
        except ValueError as exc:
            await broker.dead_letter(self._consume_exchanges, message, f"invalid task: {exc}", f"runner {self.node}")
            return None

    async def _on_task_message(self, message: AbstractIncomingMessage) -> None:
        if (task := await self._parse_task(message)) is not None:
            await self._accept(task, message, self._refusal(task))

    async def _accept(self, task: Task, message: AbstractIncomingMessage, rejection: str | None) -> None:
        """Make ``task`` ours: record it and its first event, then ack. A kill that came
        first wins over ``rejection`` (why this node refuses it, if it does)."""
        if self.store.holds(task):  # redelivered: already ours
            await message.ack()
            return
        if self._take_tombstone(task):
            row = self.store.accept(task, TaskState.KILLED, message="killed before it started")
        elif rejection is not None:
            row = self.store.accept(task, TaskState.REJECTED, message=rejection)
        else:
            row = self.store.accept(task)
            self.waiting.append(task)
            self._told[task.task_id] = (time.monotonic(), "")
            self._schedule_wakeup.set()
        await self.store.outbox.wait_confirmed(row)
        await message.ack()

    def _refusal(self, task: Task) -> str | None:
        """Why this node refuses ``task`` for good, or None: nobody vouches for its owner, it can
        never run here, or the node's policy forbids what it asks."""
        if not task.user:
            return identity.NO_USER
        return (self._cannot_run(task) or refusal(task, self.config.node)
                or accounts.refusal(task.user, host_task=task.container is None, privileged=task.privileged,
                                    node=self.node, users=self.config.users, admins=self.admins,
                                    allow_root=self.config.node.allow_root))

    def _cannot_run(self, task: Task) -> str | None:
        """Why this node can never run ``task`` (its size, or no executor of its kind), or None."""
        reason = self.admission.never_fits(task)
        if reason is not None:
            return reason
        try:
            executor_for(task, self.executors)
        except TaskRejected as exc:
            return str(exc)
        return None

    def _pool_verdict(self, task: Task) -> tuple[bool, str | None]:
        """Whether to take pool ``task`` now, and if so, why it is rejected (None: it runs).

        A task killed already (or ours already) is taken whatever it needs: a kill always
        wins. A task this node can never run is left to the others while some online node
        could run it, and rejected only when none can."""
        if self.store.holds(task) or self.store.has_tombstone(task.task_id):
            return True, None
        if not task.user:
            return True, identity.NO_USER
        if self._cannot_run(task) is None:
            # It can run here. Taken while a core is free even if it does not fit yet: it then
            # waits here (and this runner takes nothing more from the pool until it starts)
            # instead of at the head of the pool, where it would hold back tasks that fit elsewhere.
            room = self.admission.has_room_for_more() and not self.waiting
            if room and task.gpu_count and not self.admission.gpus_fit(task):
                # Its GPUs are busy here: leave it to a node that has them free now (waiting here
                # would keep two tasks from running at once), else wait for them here, not at
                # the head of the pool, where it would hold back the tasks behind it.
                if (peers := self._peers_heard()) is None:
                    return False, None  # not everyone heard yet: leave it, look again
                room = not any(len(peer.gpus_free) >= task.gpu_count and peer.cannot_run(task) is None
                               for peer in peers)
            return room, self._refusal(task)
        if (peers := self._peers_heard()) is None:
            return False, None  # not everyone heard yet: do not judge
        rejection = pool_refusal(task, [self._view(), *peers])
        return rejection is not None, rejection

    def _peers_heard(self) -> list[NodeView] | None:
        """The other runners online as heard, or None until listening has settled. Asking
        starts the listening (the schedule loop binds at once) or keeps it going."""
        self.peers.want()
        if not self.peers.settled():
            self._schedule_wakeup.set()
            return None
        return self.peers.online()

    def _view(self) -> NodeView:
        return NodeView(self.node, self.admission.capacity, frozenset(self.executors))

    async def _on_pool_message(self, message: AbstractIncomingMessage) -> None:
        if (task := await self._parse_task(message)) is None:
            return
        take, rejection = self._pool_verdict(task)
        if not take:
            # not for this node now: leave it to another node, look again in a second
            await message.nack(requeue=True)
            self._pool_paused_until = time.monotonic() + 1.0
            await self._update_pool_consumer()
            return
        await self._accept(task, message, rejection)
        await self._update_pool_consumer()

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        if message.user_id not in self.services:  # only runners speak for nodes
            log.debug("heartbeat from %r ignored: no service account", message.user_id)
            return
        try:
            self.peers.heard(Heartbeat.from_bytes(message.body))
        except ValueError as exc:  # the host dead-letters bad heartbeats; here it is only not heard
            log.debug("heartbeat ignored: %s", one_line(exc))

    def _listen_again(self, *_) -> None:
        """After a reconnect the queue is new (bound again if it was): what was heard may be stale."""
        if self._beats_bound:
            self.peers.restart()

    async def _update_heartbeat_binding(self) -> None:
        """Bind this runner's heartbeat queue while a pool task wants the others heard, unbind
        after ``LISTEN_FOR`` quiet windows (runner/peers.py). Settling counts from the bind."""
        if self._beats is None or self.peers.wanted() == self._beats_bound:
            return
        key = self.topo.heartbeat_key("*")
        try:
            if self._beats_bound:
                await self._beats.unbind(self._consume_exchanges.events, key)
            else:
                await self._beats.bind(self._consume_exchanges.events, key)
        except Exception as exc:  # the broker is away: the next pass tries again
            log.debug("heartbeat binding not updated: %s", exc)
            return
        self._beats_bound = not self._beats_bound
        if self._beats_bound:
            self.peers.restart()
        else:
            self.peers.stop()

    async def _update_pool_consumer(self) -> None:
        if self._pool_queue is None:
            return
        now = time.monotonic()
        room = self.admission.has_room_for_more() and not self.waiting
        want = (room or now < self._pool_look_until) and now >= self._pool_paused_until
        try:
            if want and self._pool_tag is None:
                self._pool_tag = await self._pool_queue.consume(self._on_pool_message)
            elif not want and self._pool_tag is not None:
                await self._pool_queue.cancel(self._pool_tag)
                self._pool_tag = None
        except Exception as exc:
            # The broker is away. Nothing changed: the next pass of the schedule loop
            # tries again (a failure here must never end that loop, or nothing starts).
            log.debug("pool consumer not updated: %s", exc)

    # ---- control: kill, pause, resume ---------------------------------------------------

    async def _on_control_message(self, message: AbstractIncomingMessage) -> None:
        """Every control message (kill, pause, resume) passes here: one place for its checks."""
        try:
            control = Kill.from_bytes(message.body)
            if not message.user_id:
                raise ValueError(identity.NO_USER)
        except ValueError as exc:
            await broker.dead_letter(self._consume_exchanges, message, f"invalid control message: {exc}",
                                     f"runner {self.node}")
            return
        if control.action == "kill":
            await self._kill(control.task_id, for_this_node=message.routing_key == self.node, by=message.user_id)
        else:
            await self._pause_or_resume(control.task_id, pause=control.action == "pause", by=message.user_id)
        await message.ack()

    def _may_kill(self, by: str, owner: str) -> bool:
        """The owner, an admin, or a service account (the host's dashboard, which checked the rule itself).
        The same rule holds for pause and resume."""
        return by in self.services or identity.may_act(by, owner, self.admins)

    def _take_tombstone(self, task: Task) -> bool:
        """Whether a kill that came before ``task`` ends it: only one its owner or an admin sent."""
        killers = self.store.take_tombstone(task.task_id)
        for killer in killers:
            if self._may_kill(killer, task.user):
                return True
            log.warning("kill of task %d by %s ignored: %s", task.task_id, killer,
                        identity.refusal(killer, task.task_id, task.user, self.admins))
        return False

    async def _pause_or_resume(self, task_id: int, pause: bool, by: str) -> None:
        """Pause a running task, or resume a paused one; anything else is refused (logged,
        nothing changes: the client checked the state already, this covers a race)."""
        what = "pause" if pause else "resume"
        running = self.running.get(task_id)
        if running is None or running.handle is None or running.ending or running.kill_requested:
            log.info("task %s: %s refused: not running on %s", task_id, what, self.node)
            return
        if not self._may_kill(by, running.task.user):
            log.warning("%s of task %d by %s refused: %s", what, task_id, by,
                        identity.refusal(by, task_id, running.task.user, self.admins))
            return
        if running.paused == pause:
            log.info("task %s: %s refused: already %s", task_id, what, "paused" if pause else "running")
            return
        try:
            how = await (running.executor.pause if pause else running.executor.resume)(running.handle)
        except PauseRefused as exc:
            log.warning("task %s: %s refused: %s", task_id, what, exc)
            return
        if running.ending or running.kill_requested:
            return  # it ended, or a kill came, while the executor worked: that event wins
        running.paused = pause
        self.store.transition(task_id, TaskState.PAUSED if pause else TaskState.RUNNING,
                              message=f"{'paused' if pause else 'resumed'}: {how}")

    async def _kill(self, task_id: int, for_this_node: bool, by: str) -> None:
        running = self.running.get(task_id)
        owned = running.task if running is not None else self.waiting.get(task_id)
        if owned is not None and not self._may_kill(by, owned.user):
            log.warning("kill of task %d by %s refused: %s", task_id, by,
                        identity.refusal(by, task_id, owned.user, self.admins))
            return
        if running is not None:
            running.kill_requested = True  # a paused task is thawed by the executor's stop
            self.store.request_kill(task_id)
            if running.handle is not None:
                self._spawn(running.executor.stop(running.handle, self.config.timing.kill_grace))
            elif running.starting is not None:
                running.starting.cancel()  # still starting (an image loading, Docker slow): it never runs
            return
        waiting = self.waiting.get(task_id)
        if waiting is not None:
            self.waiting.remove(waiting)
            self._told.pop(task_id, None)
            self.admission.forget(task_id)
            self.store.transition(task_id, TaskState.KILLED, message="killed before it started")
            return
        if self.store.waiting_retry(task_id):  # between two attempts: the next one never runs
            owner = self.store.task(task_id).user
            if not self._may_kill(by, owner):
                log.warning("kill of task %d by %s refused: %s", task_id, by,
                            identity.refusal(by, task_id, owner, self.admins))
                return
            self.store.transition(task_id, TaskState.KILLED, message="killed between two attempts")
            return
        if not self.store.has(task_id) or self.store.handed_on(task_id):
            # not here (yet), or a retry handed back to the pool: if it arrives later it must
            # never run; it may wait in the pool
            self.store.add_tombstone(task_id, by)
            self._pool_look_until = time.monotonic() + KILL_LOOK_S
            self._pool_paused_until = 0.0
            await self._update_pool_consumer()

    # ---- running ----------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            try:  # also wake now and then: a paused pool consumer resumes on its own
                await asyncio.wait_for(self._schedule_wakeup.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            self._schedule_wakeup.clear()
            for task in self.admission.choose(self.waiting):
                self.waiting.remove(task)
                self._told.pop(task.task_id, None)
                self._spawn(self._run(task))
            self._tell_why_waiting()
            await self._update_pool_consumer()
            await self._update_heartbeat_binding()

    def _tell_why_waiting(self) -> None:
        """Send a ``queued`` event again, with the reason as its message, for each task
        that has waited a while and whose reason changed (bounded: see WAIT_REASON_EVERY_S)."""
        now = time.monotonic()
        if now < self._next_reasons:
            return
        self._next_reasons = now + WAIT_REASON_EVERY_S
        news: dict[int, str] = {}
        for task in self.waiting:
            since, told = self._told.get(task.task_id, (now, ""))
            if now - since < WAIT_REASON_EVERY_S:
                continue
            reason = self.admission.why_waiting(task)
            if reason != told:
                news[task.task_id] = reason
                self._told[task.task_id] = (since, reason)
                if len(news) >= WAIT_REASONS_PER_PASS:
                    break
        if news:
            self.store.tell_waiting(news)

    def _spec(self, task: Task) -> RunSpec:
        env = {  # the task's own variables only: nothing of the runner's environment (README "Host tasks")
            "HAKURIVER_TASK_ID": str(task.task_id),
            "HAKURIVER_NODE": self.node,
            "HAKURIVER_SHARED_DIR": self.config.paths.shared_dir,
            "HAKURIVER_LOCAL_TEMP_DIR": self.config.paths.local_temp_dir,
            "HAKURIVER_CORES": f"{task.cores:g}",
        }
        cpus = mems = None
        if task.numa is not None:
            env["HAKURIVER_NUMA_NODE"] = str(task.numa)
            cpus, mems = self.numa[task.numa].cpus, [task.numa]
        env.update(task.env)
        gpus = self.admission.allocated.get(task.task_id)
        if task.container is None:  # after the user's variables: a task sees only its own GPUs
            env.update(self.gpus.host_env(gpus))
        elif gpus:
            env["HAKURIVER_GPUS"] = ",".join(map(str, gpus))
        account = accounts.lookup(accounts.account_name(task.user, self.config.users))  # checked at arrival
        container_user = None
        if task.container is not None and account is not None and not self.config.node.allow_root_containers:
            container_user = f"{account.uid}:{account.gid}"
        return RunSpec(env=env, account=account, container_user=container_user,
                       stdout_path=self.output_dir / f"{task.task_id}.stdout",
                       stderr_path=self.output_dir / f"{task.task_id}.stderr", cpus=cpus, mems=mems,
                       gpus=self.gpus.device_ids(gpus),
                       shared_dir=self.config.paths.shared_dir, local_temp_dir=self.config.paths.local_temp_dir)

    @staticmethod
    def _file_owner(spec: RunSpec) -> tuple[int, int] | None:
        """Whose the task's output files are: its account's, where this runner (root) can give them away."""
        if spec.account is None or os.geteuid() != 0:
            return None
        return spec.account.uid, spec.account.gid

    def _output_stream(self, task_id: int, spec: RunSpec, sent: dict[str, int] | None = None,
                       attempt: int = 1) -> OutputStream:
        return OutputStream(task_id, {"stdout": spec.stdout_path, "stderr": spec.stderr_path},
                            sent or {"stdout": 0, "stderr": 0}, attempt=attempt)

    async def _run(self, task: Task) -> None:
        spec = self._spec(task)
        executor = executor_for(task, self.executors, now=False)
        running = Running(task, executor, self._output_stream(task.task_id, spec, attempt=task.attempt))
        self.running[task.task_id] = running
        self._output_wakeup.set()
        # a slow start (a container image to load) is told like any other wait
        telling = asyncio.get_running_loop().call_later(WAIT_REASON_EVERY_S, self.store.tell_waiting, {
            task.task_id: f"starting: the {executor.name} executor prepares it (a container image may be loading)"})
        try:
            try:
                create_output_files((spec.stdout_path, spec.stderr_path), self._file_owner(spec))
                running.starting = asyncio.ensure_future(executor.start(task, spec))
                handle = await running.starting
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # the runner is stopping
                await self._finish(running, TaskState.KILLED, None, "killed before it started")
                return
            except TaskRejected as exc:
                await self._finish(running, TaskState.REJECTED, None, str(exc))
                return
            except StartFailed as exc:
                await self._finish(running, TaskState.FAILED, None, str(exc))
                return
            running.handle = handle
            telling.cancel()
            message = f"limits not enforced: {', '.join(handle.unenforced)}" if handle.unenforced else ""
            gpus = self.admission.allocated.get(task.task_id)
            # the GPUs are stored with the handle: a restart that adopts the task gives it them back
            self.store.transition(task.task_id, TaskState.RUNNING, handle={**handle.to_dict(), "gpus": gpus},
                                  message=message, unenforced=handle.unenforced, gpus=gpus)
            if running.kill_requested:  # a kill came while it was starting
                self._spawn(executor.stop(handle, self.config.timing.kill_grace))
            await self._watch(running)
        except Exception as exc:  # never leave a task without an end
            log.exception("task %s: runner error", task.task_id)
            if task.task_id in self.running:
                await self._finish(running, TaskState.FAILED, None, f"runner error: {exc}")
        finally:
            telling.cancel()

    async def _watch(self, running: Running) -> None:
        outcome = await running.executor.wait(running.handle)
        await self._finish(running, *self._judge(running, outcome))

    @staticmethod
    def _judge(running: Running, outcome: Outcome) -> tuple[TaskState, int | None, str]:
        if running.kill_requested:
            return TaskState.KILLED, outcome.exit_code, "killed by request"
        if outcome.oom:
            return TaskState.KILLED_OOM, outcome.exit_code, outcome.message or "memory limit hit"
        if outcome.exit_code == 0:
            return TaskState.COMPLETED, 0, outcome.message
        return TaskState.FAILED, outcome.exit_code, outcome.message

    async def _finish(self, running: Running, state: TaskState, exit_code: int | None, message: str) -> None:
        """Record the outcome, send all output, then the final event; free the resources."""
        task_id = running.task.task_id
        running.ending = True
        if running.output.has_news():
            # output still to send: keep the outcome, so a crash now cannot lose how it ended
            self.store.set_outcome(task_id, {"state": state, "exit_code": exit_code, "message": message})
        if running.handle is not None:
            try:
                await running.executor.destroy(running.handle)
            except Exception:
                log.exception("task %s: cleanup failed", task_id)
        await self._flush_until_sent(running.output)
        following = None if running.kill_requested else next_attempt(running.task, state)
        if following is None:
            self.store.transition(task_id, state, exit_code=exit_code, message=message)
        else:  # decided here, once, durably with the ``retrying`` event (runner/retries.py)
            not_before = self.store.retry(running.task, following, state, exit_code, message)
            self._spawn(self._retry_later(following, not_before))
        running.output.remove_files()
        self.running.pop(task_id, None)
        self.admission.release(running.task)
        self._schedule_wakeup.set()

    async def _retry_later(self, task: Task, not_before: float) -> None:
        """After the retry delay, the next attempt waits for room like any task, here or (a pool
        task) in the pool; unless it was killed meanwhile."""
        await asyncio.sleep(max(0.0, not_before - time.time()))
        if self.store.requeue(task):
            self.waiting.append(task)
            self._told[task.task_id] = (time.monotonic(), "")
            self._schedule_wakeup.set()

    async def _flush_until_sent(self, output: OutputStream) -> None:
        while True:
            try:
                await output.flush(self._publish_chunk, self._recorder(output.task_id))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("task %s: output not sent yet (%s); retrying", output.task_id, exc)
                await asyncio.sleep(0.5)

    def _recorder(self, task_id: int):
        return lambda stream, offset: self.store.set_sent(task_id, stream, offset)

    async def _publish_chunk(self, key: str, body: bytes, headers: dict) -> None:
        await self._publish_raw(self.topo.events, key, body, headers)

    async def _output_loop(self) -> None:
        while True:
            if not self.running:  # idle: no OUTPUT_POLL_S wake-ups (20 a second) for nothing
                self._output_wakeup.clear()
                await self._output_wakeup.wait()
            await asyncio.sleep(OUTPUT_POLL_S)
            for running in list(self.running.values()):
                if running.output.has_news():
                    try:
                        await running.output.flush(self._publish_chunk, self._recorder(running.task.task_id))
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # broker away: the offsets say where to go on
                        log.debug("output flush failed: %s", exc)

    # ---- restart ----------------------------------------------------------------------

    async def _recover(self) -> None:
        """Pick up what the store holds: waiting tasks wait again, running ones are
        adopted where the executor can follow them, or end ``lost``."""
        for stored in self.store.unfinished():
            task = stored.task
            if stored.state == TaskState.RETRYING:  # its next attempt was decided: it comes, once
                self._spawn(self._retry_later(task, stored.not_before))
                continue
            if stored.state == TaskState.QUEUED:
                if stored.kill_requested:
                    self.store.transition(task.task_id, TaskState.KILLED, message="killed before it started")
                else:
                    self.waiting.append(task)
                    self._told[task.task_id] = (time.monotonic(), "")
                continue
            self.admission.take(task, gpus=(stored.handle or {}).get("gpus"))
            spec = self._spec(task)
            output = self._output_stream(task.task_id, spec, {"stdout": stored.stdout_sent,
                                                              "stderr": stored.stderr_sent}, task.attempt)
            executor = self.executors.get(stored.handle["executor"]) if stored.handle else None
            running = Running(task, executor or next(iter(self.executors.values())), output,
                              kill_requested=stored.kill_requested)
            self.running[task.task_id] = running
            self._output_wakeup.set()
            if stored.outcome is not None:
                outcome = stored.outcome
                self._spawn(self._finish(running, TaskState(outcome["state"]), outcome["exit_code"],
                                         outcome["message"]))
                continue
            handle = None
            if executor is not None:
                try:
                    handle = await executor.recover(Handle.from_dict(stored.handle), spec)
                except Exception:
                    log.exception("task %s: recover failed", task.task_id)
            if handle is None:
                self._spawn(self._finish(running, TaskState.LOST, None,
                                         "the runner restarted and could not follow the task"))
                continue
            running.handle = handle
            # A container paused before the restart is adopted paused: the state follows what is
            # true now, and is told again (the host may have taken the task for lost meanwhile).
            was_paused = stored.state == TaskState.PAUSED
            running.paused = bool(handle.data.get("paused", was_paused))
            if running.paused or was_paused:
                self.store.transition(task.task_id, TaskState.PAUSED if running.paused else TaskState.RUNNING,
                                      message="paused (adopted after a runner restart)" if running.paused
                                      else "resumed outside HakuRiver while the runner was away")
            log.info("task %s: adopted after restart%s", task.task_id, " (paused)" if running.paused else "")
            self._spawn(self._watch(running))
        self._schedule_wakeup.set()
        self.store.prune(FINISHED_KEEP_S)

    # ---- heartbeats -------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        psutil.cpu_percent(None)
        while True:
            try:
                await self._publish_heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("heartbeat not sent: %s", exc)
            await asyncio.sleep(self.config.timing.heartbeat_interval)

    def heartbeat(self, stopping: bool = False) -> Heartbeat:
        memory = psutil.virtual_memory()
        unenforced = sorted({limit for ex in self.executors.values() for limit in ex.unenforceable()})
        return Heartbeat(
            node=self.node, cores_total=self.admission.capacity.cores, cores_free=self.admission.cores_free,
            memory_total=self.admission.capacity.memory, memory_free=self.admission.memory_free,
            numa=self.numa, numa_cores_free=self.admission.numa_cores_free(),
            cpu_percent=psutil.cpu_percent(None), memory_percent=memory.percent,
            # A task whose end is known is no longer reported as running: after a restart
            # a task that could not be followed must not look alive (and undo the host's
            # "lost") for the moment before its own "lost" event arrives. One still being
            # started (a container whose image loads) is queued, as its state says.
            running=sorted(i for i, r in self.running.items() if r.handle is not None and not r.ending),
            queued=[t.task_id for t in self.waiting]
            + sorted(i for i, r in self.running.items() if r.handle is None and not r.ending),
            version=hakuriver.__version__, executors=usable(self.executors), unenforced=unenforced,
            stopping=stopping, gpus=self.gpus.read(), gpus_free=self.admission.free_gpus())

    async def _publish_heartbeat(self, stopping: bool = False) -> None:
        expiration = max(1.0, self.config.timing.offline_after)
        message = aio_pika.Message(self.heartbeat(stopping).to_bytes(), content_type="application/json",
                                   expiration=expiration, user_id=self.user)
        await self.exchanges.events.publish(message, routing_key=self.topo.heartbeat_key(self.node),
                                            mandatory=False)


def _log_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("runner background task failed", exc_info=task.exception())
