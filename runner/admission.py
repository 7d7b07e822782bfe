"""Admission: which waiting tasks fit the node's free cores, memory and GPUs now.

Cores are accounted per NUMA node for ``node:N`` targets and node-wide for the
rest; ``--cores 0`` takes no core; a task without ``--memory`` reserves none.
Tasks start in arrival order; a smaller task may pass one that does not fit yet,
but once the oldest waiting task has been passed ``max_bypass`` times nothing
passes it any more, so no task waits forever behind a stream of small ones.
A task that does not start is told why (:meth:`Admission.why_waiting`), in words
that name the resource it waits for and stay the same while it waits for it, so
the runner can report a reason without an event per freed core.

GPUs are exclusive: a task takes the GPU ids it names (``node::0,1``) or the lowest free
ones (``--gpus N``), and holds them until it ends (:attr:`Admission.allocated`; a restart
gives an adopted task its stored GPUs back). The oldest task held back for GPUs only holds
back the GPU tasks behind it: a CPU-only task that fits still starts, as long as the held
task's cores and memory stay free for it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from hakuriver.messages import NumaNode, Task
from hakuriver.sizes import format_size


@dataclass
class Capacity:
    cores: float
    memory: int
    numa: dict[int, NumaNode] = field(default_factory=dict)
    gpus: tuple[int, ...] = ()   # GPU indices

    def numa_cores(self, numa: int) -> float:
        """Cores of one NUMA node offered to tasks (its CPUs, scaled down if the node offers fewer)."""
        total_cpus = sum(len(n.cpus) for n in self.numa.values()) or 1
        return len(self.numa[numa].cpus) * min(1.0, self.cores / total_cpus)


def never_fits(task: Task, cap: Capacity, where: str = "the node") -> str | None:
    """Why a node of capacity ``cap`` can never run ``task``, or None (``where`` names it in the reason)."""
    if task.numa is not None:
        if task.numa not in cap.numa:
            return f"{where} has no NUMA node {task.numa} (it has {sorted(cap.numa) or 'none'})"
        if task.cores > cap.numa_cores(task.numa):
            return f"{task.cores:g} cores requested; NUMA node {task.numa} offers {cap.numa_cores(task.numa):g}"
    if task.cores > cap.cores:
        return f"{task.cores:g} cores requested; {where} offers {cap.cores:g}"
    if task.memory is not None and task.memory > cap.memory:
        return f"{format_size(task.memory)} memory requested; {where} offers {format_size(cap.memory)}"
    missing = [g for g in task.gpus or () if g not in cap.gpus]
    if missing:
        return f"{where} has no GPU {missing[0]} (it has {', '.join(map(str, cap.gpus)) or 'none'})"
    if task.gpu_count > len(cap.gpus):
        return f"{task.gpu_count} GPUs requested; {where} has {len(cap.gpus)}"
    return None


def ask(task: Task) -> tuple:
    """What ``task`` asks of the node, as admission sees it: two tasks with the same ask fit or not together."""
    return task.cores, task.memory, task.numa, task.gpu_count, tuple(task.gpus or ())


class WaitingTasks:
    """The tasks a runner holds that wait for room, in arrival order, with what they ask for.

    Why not a list: :meth:`Admission.choose` runs at every arrival and every end, and with a
    deep queue (1,000 tasks sent at once to a 2-core node) a pass over every waiting task each
    time cost the runner more than running them (issue 18). Knowing which asks are waiting lets
    a pass stop once every one of them is known not to fit. Removal by id is O(1) too.
    """

    def __init__(self) -> None:
        self._tasks: dict[int, Task] = {}   # insertion order is arrival order
        self.asks: Counter[tuple] = Counter()

    def append(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        self.asks[ask(task)] += 1

    def remove(self, task: Task) -> None:
        del self._tasks[task.task_id]
        key = ask(task)
        self.asks[key] -= 1
        if not self.asks[key]:
            del self.asks[key]

    def get(self, task_id: int) -> Task | None:
        return self._tasks.get(task_id)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())   # not to be changed while it is walked

    def __len__(self) -> int:
        return len(self._tasks)


class Admission:
    def __init__(self, capacity: Capacity, max_bypass: int = 16):
        self.capacity = capacity
        self.max_bypass = max_bypass
        self.cores_used = 0.0
        self.memory_used = 0
        self.numa_used: dict[int, float] = {n: 0.0 for n in capacity.numa}
        self._bypassed: dict[int, int] = {}
        self.holding: int | None = None  # the task the last choose() held everything behind
        self.allocated: dict[int, list[int]] = {}  # task id → the GPU ids it holds
        self._gpu_holder: dict[int, int] = {}      # GPU id → the task holding it

    def never_fits(self, task: Task) -> str | None:
        """Why this node can never run ``task``, or None."""
        return never_fits(task, self.capacity)

    def free_gpus(self) -> list[int]:
        return [g for g in self.capacity.gpus if g not in self._gpu_holder]

    def gpus_fit(self, task: Task) -> bool:
        if task.gpus is not None:
            return not any(g in self._gpu_holder for g in task.gpus)
        return task.gpu_count <= len(self.free_gpus())

    def fits(self, task: Task) -> bool:
        return self.gpus_fit(task) and self._fits_without_gpus(task)

    def _fits_without_gpus(self, task: Task) -> bool:
        if self.cores_used + task.cores > self.capacity.cores + 1e-9:
            return False
        if task.memory is not None and self.memory_used + task.memory > self.capacity.memory:
            return False
        if task.numa is not None and (self.numa_used[task.numa] + task.cores
                                      > self.capacity.numa_cores(task.numa) + 1e-9):
            return False
        return True

    def take(self, task: Task, gpus: list[int] | None = None) -> None:
        """Count ``task``'s cores and memory as used and give it GPUs: ``gpus`` (an adopted task's
        stored allocation), the ids it names, or the lowest free ones."""
        self.cores_used += task.cores
        self.memory_used += task.memory or 0
        if task.numa is not None:
            self.numa_used[task.numa] += task.cores
        if gpus is None:
            gpus = list(task.gpus) if task.gpus is not None else self.free_gpus()[:task.gpu_count]
        if gpus:
            self.allocated[task.task_id] = list(gpus)
            for gpu in gpus:
                self._gpu_holder[gpu] = task.task_id

    def release(self, task: Task) -> None:
        for gpu in self.allocated.pop(task.task_id, []):
            if self._gpu_holder.get(gpu) == task.task_id:
                del self._gpu_holder[gpu]
        self.cores_used -= task.cores
        self.memory_used -= task.memory or 0
        if task.numa is not None:
            self.numa_used[task.numa] -= task.cores

    def choose(self, waiting: WaitingTasks | list[Task]) -> list[Task]:
        """Take and return the tasks of ``waiting`` (in arrival order) that start now.

        Resources only shrink during a pass, so a task that asks what a blocked one asked is
        blocked too (until the next start). Given a :class:`WaitingTasks`, the pass stops once
        every ask still waiting is one of those: nothing behind could start, and (while no task
        has been passed ``max_bypass`` times) nothing behind could be held either, so the result
        is that of the whole pass, at the cost of a few tasks instead of all of them.
        """
        started: list[Task] = []
        blocked: list[Task] = []
        self.holding = None
        held_for_gpus: Task | None = None  # the held task lacks GPUs only: CPU-only tasks may pass
        blocked_asks: set[tuple] = set()
        asks_waiting = waiting.asks.keys() if isinstance(waiting, WaitingTasks) else None
        may_stop = asks_waiting is not None and all(n < self.max_bypass for n in self._bypassed.values())
        for task in waiting:
            if held_for_gpus is not None and (task.gpu_count or not self._leaves_room(task, held_for_gpus)):
                continue
            key = ask(task)
            if key not in blocked_asks and self.fits(task):
                self.take(task)
                started.append(task)
                blocked_asks.clear()
                for b in blocked:
                    self._bypassed[b.task_id] = self._bypassed.get(b.task_id, 0) + 1
            else:
                if key not in blocked_asks:
                    blocked_asks.add(key)
                    if may_stop and held_for_gpus is None and asks_waiting <= blocked_asks:
                        break  # every task behind asks what does not fit now
                blocked.append(task)
                if self._bypassed.get(task.task_id, 0) >= self.max_bypass and held_for_gpus is None:
                    self.holding = task.task_id
                    if task.gpu_count and self._fits_without_gpus(task):
                        held_for_gpus = task
                        continue
                    break  # passed often enough: hold everything behind it until it fits
        for task in started:
            self._bypassed.pop(task.task_id, None)
        return started

    def _leaves_room(self, task: Task, held: Task) -> bool:
        """Whether ``held`` still finds its cores and memory once ``task`` takes its own."""
        if not self._fits_without_gpus(task):
            return True  # it does not start anyway
        self.take(task, gpus=[])
        try:
            return self._fits_without_gpus(held)
        finally:
            self.release(task)

    def why_waiting(self, task: Task) -> str:
        """Why ``task`` (left waiting by the last :meth:`choose`) does not start now."""
        cap = self.capacity
        if not self.gpus_fit(task):
            if task.gpus is not None:
                busy = [g for g in task.gpus if g in self._gpu_holder]
                return (f"waiting for GPU {busy[0]}: another task holds it"
                        if len(busy) == 1 else f"waiting for GPUs {','.join(map(str, busy))}: other tasks hold them")
            return (f"waiting for GPUs: needs {task.gpu_count} of the node's {len(cap.gpus)}, "
                    f"other tasks hold them")
        if task.numa is not None and (self.numa_used[task.numa] + task.cores
                                      > cap.numa_cores(task.numa) + 1e-9):
            return (f"waiting for cores on NUMA node {task.numa}: needs {task.cores:g} of its "
                    f"{cap.numa_cores(task.numa):g}, other tasks hold them")
        if self.cores_used + task.cores > cap.cores + 1e-9:
            return f"waiting for cores: needs {task.cores:g} of the node's {cap.cores:g}, other tasks hold them"
        if task.memory is not None and self.memory_used + task.memory > cap.memory:
            return (f"waiting for memory: needs {format_size(task.memory)} of the node's "
                    f"{format_size(cap.memory)}, other tasks hold it")
        if self.holding is not None and self.holding != task.task_id:
            return f"waiting behind task {self.holding}, which has waited longest (arrival order)"
        return "waiting for its turn"

    def forget(self, task_id: int) -> None:
        self._bypassed.pop(task_id, None)

    @property
    def cores_free(self) -> float:
        return max(0.0, self.capacity.cores - self.cores_used)

    @property
    def memory_free(self) -> int:
        return max(0, self.capacity.memory - self.memory_used)

    def numa_cores_free(self) -> dict[int, float]:
        return {n: max(0.0, self.capacity.numa_cores(n) - used) for n, used in self.numa_used.items()}

    def has_room_for_more(self) -> bool:
        """Whether a one-core task would fit now (the pool consumer takes work only then)."""
        return self.cores_used + 1 <= self.capacity.cores + 1e-9
