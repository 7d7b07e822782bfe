"""What a runner knows of the other runners, from their heartbeats; who could run a pool task.

Why it exists: the pool is one queue that every runner takes from in order. A pool task this
node can never run (more cores or memory than it has, a container where it has no Docker)
must neither be rejected while another node could run it, nor sit at the head of the pool
forever when no node can. So a runner leaves such a task to the others (as it does when it
has no room) while some online node could run it, and rejects it, saying why, when none can.

Heartbeats already carry each node's cores, memory, GPUs and executors, so listening to them is
enough: no new message, no round trip to the host. A rejection cannot be undone, so the
judgement is cautious: a node counts as online here until it has been silent for
``FORGET_AFTER`` offline windows (a node briefly late under load still counts) or said it
stops, and right after the runner starts (or reconnects) it judges nothing until it has
listened for ``SETTLE_AFTER`` windows, so every live runner has been heard.

A runner listens only while it needs to (issue 19): every runner hearing every other one's
heartbeats is N² deliveries, 500/s with 50 runners at one heartbeat per 5 s (each a parse in
each runner) and 50,000/s with 500, for a question most runners never ask. So a runner binds
its heartbeat queue when a pool task asks it (one it can never run, or one whose GPUs are busy
here: :meth:`Peers.want`), judges once settled as above, and unbinds after ``LISTEN_FOR``
windows without such a task. An idle cluster, or one whose pool tasks fit everywhere, carries
each heartbeat once (to the host); the price is one settling wait (2 windows, 30 s by default)
at the first such task after a quiet spell, while the task stays in the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from hakuriver.messages import Heartbeat, Task
from hakuriver.sizes import format_size
from runner.admission import Capacity, never_fits
from runner.executors.select import executor_name

SETTLE_AFTER = 2  # offline windows of listening before judging
FORGET_AFTER = 4  # offline windows of silence before a node no longer counts
LISTEN_FOR = 4    # offline windows a runner keeps listening after the last pool task that asked


@dataclass(frozen=True)
class NodeView:
    """What can be known of a node without asking it: its capacity and its executors."""

    name: str
    capacity: Capacity
    executors: frozenset[str]
    gpus_free: tuple[int, ...] = ()   # as of its last heartbeat: where a GPU task can start now

    @classmethod
    def of(cls, beat: Heartbeat) -> "NodeView":
        return cls(beat.node, Capacity(beat.cores_total, beat.memory_total, dict(beat.numa),
                                       tuple(gpu.index for gpu in beat.gpus)), frozenset(beat.executors),
                   tuple(beat.gpus_free))

    def cannot_run(self, task: Task) -> str | None:
        """Why this node can never run ``task`` (capacity, or no executor of its kind), or None."""
        reason = never_fits(task, self.capacity, where=f"node {self.name}")
        if reason is not None:
            return reason
        if not self.executors:
            return None  # a heartbeat that does not list them (an older runner): assume it can
        if executor_name(task, self.executors) is None:
            return "needs Docker" if task.container is not None else "needs a host executor"
        return None


def pool_refusal(task: Task, nodes: list[NodeView]) -> str | None:
    """Why none of ``nodes`` can ever run pool ``task``, in one line; None if one of them can."""
    if any(node.cannot_run(task) is None for node in nodes):
        return None
    if not nodes:
        return "no node is online"
    most_cores = max(node.capacity.cores for node in nodes)
    most_memory = max(node.capacity.memory for node in nodes)
    if task.cores > most_cores:
        why = f"{task.cores:g} cores requested; the largest online node offers {most_cores:g}"
    elif task.memory is not None and task.memory > most_memory:
        why = f"{format_size(task.memory)} memory requested; the largest online node offers {format_size(most_memory)}"
    elif task.gpu_count > max(len(node.capacity.gpus) for node in nodes):
        why = (f"{task.gpu_count} GPUs requested; the most any online node has is "
               f"{max(len(node.capacity.gpus) for node in nodes)}")
    elif task.container is not None and not any("docker" in node.executors for node in nodes):
        why = f"container {task.container!r} needs Docker; no online node has it"
    else:
        why = "; ".join(f"{node.name}: {node.cannot_run(task)}" for node in nodes[:4])
    return f"no online node can run it: {why}"


class Peers:
    """The latest heartbeat of every other runner, as this runner heard them."""

    def __init__(self, node: str, offline_after: float, clock: Callable[[], float] = time.monotonic):
        self.node = node
        self.settle_after = SETTLE_AFTER * offline_after
        self.forget_after = FORGET_AFTER * offline_after
        self.listen_for = LISTEN_FOR * offline_after
        self._clock = clock
        self._listening_since: float | None = clock()
        self._wanted_at = -float("inf")
        self._heard: dict[str, tuple[NodeView, float]] = {}

    def restart(self) -> None:
        """Listening starts again (after binding, or a reconnect): what was heard before may be stale."""
        self._listening_since = self._clock()

    def stop(self) -> None:
        """Listening stops (unbound): nothing heard counts any more, nothing is judged until it starts again."""
        self._listening_since = None
        self._heard.clear()

    def want(self) -> None:
        """A pool task asks who else could run it: listening should be on (the runner binds)."""
        self._wanted_at = self._clock()

    def wanted(self) -> bool:
        """Whether a pool task asked within the last ``LISTEN_FOR`` windows."""
        return self._clock() - self._wanted_at < self.listen_for

    def heard(self, beat: Heartbeat) -> None:
        if beat.node == self.node or self._listening_since is None:
            return  # a delivery that crossed the unbind: not listening any more
        if beat.stopping:
            self._heard.pop(beat.node, None)
        else:
            self._heard[beat.node] = (NodeView.of(beat), self._clock())

    def settled(self) -> bool:
        """Whether every online runner has had a chance to be heard."""
        return self._listening_since is not None and self._clock() - self._listening_since >= self.settle_after

    def online(self) -> list[NodeView]:
        now = self._clock()
        return [view for view, at in sorted(self._heard.values(), key=lambda item: item[0].name)
                if now - at < self.forget_after]
