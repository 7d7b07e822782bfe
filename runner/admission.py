"""Admission: which waiting tasks fit the node's free cores and memory now.

Cores are accounted per NUMA node for ``node:N`` targets and node-wide for the
rest; ``--cores 0`` takes no core; a task without ``--memory`` reserves none.
Tasks start in arrival order; a smaller task may pass one that does not fit yet,
but once the oldest waiting task has been passed ``max_bypass`` times nothing
passes it any more, so no task waits forever behind a stream of small ones.
A task that does not start is told why (:meth:`Admission.why_waiting`), in words
that name the resource it waits for and stay the same while it waits for it, so
the runner can report a reason without an event per freed core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hakuriver.messages import NumaNode, Task
from hakuriver.sizes import format_size


@dataclass
class Capacity:
    cores: float
    memory: int
    numa: dict[int, NumaNode] = field(default_factory=dict)

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
    return None


class Admission:
    def __init__(self, capacity: Capacity, max_bypass: int = 16):
        self.capacity = capacity
        self.max_bypass = max_bypass
        self.cores_used = 0.0
        self.memory_used = 0
        self.numa_used: dict[int, float] = {n: 0.0 for n in capacity.numa}
        self._bypassed: dict[int, int] = {}
        self.holding: int | None = None  # the task the last choose() held everything behind

    def never_fits(self, task: Task) -> str | None:
        """Why this node can never run ``task``, or None."""
        return never_fits(task, self.capacity)

    def fits(self, task: Task) -> bool:
        if self.cores_used + task.cores > self.capacity.cores + 1e-9:
            return False
        if task.memory is not None and self.memory_used + task.memory > self.capacity.memory:
            return False
        if task.numa is not None and (self.numa_used[task.numa] + task.cores
                                      > self.capacity.numa_cores(task.numa) + 1e-9):
            return False
        return True

    def take(self, task: Task) -> None:
        self.cores_used += task.cores
        self.memory_used += task.memory or 0
        if task.numa is not None:
            self.numa_used[task.numa] += task.cores

    def release(self, task: Task) -> None:
        self.cores_used -= task.cores
        self.memory_used -= task.memory or 0
        if task.numa is not None:
            self.numa_used[task.numa] -= task.cores

    def choose(self, waiting: list[Task]) -> list[Task]:
        """Take and return the tasks of ``waiting`` (in arrival order) that start now."""
        started: list[Task] = []
        blocked: list[Task] = []
        self.holding = None
        for task in waiting:
            if self.fits(task):
                self.take(task)
                started.append(task)
                for b in blocked:
                    self._bypassed[b.task_id] = self._bypassed.get(b.task_id, 0) + 1
            else:
                blocked.append(task)
                if self._bypassed.get(task.task_id, 0) >= self.max_bypass:
                    self.holding = task.task_id
                    break  # passed often enough: hold everything behind it until it fits
        for task in started:
            self._bypassed.pop(task.task_id, None)
        return started

    def why_waiting(self, task: Task) -> str:
        """Why ``task`` (left waiting by the last :meth:`choose`) does not start now."""
        cap = self.capacity
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
