"""Admission: which waiting tasks fit the node's free cores and memory now.

Cores are accounted per NUMA node for ``node:N`` targets and node-wide for the
rest; ``--cores 0`` takes no core; a task without ``--memory`` reserves none.
Tasks start in arrival order; a smaller task may pass one that does not fit yet,
but once the oldest waiting task has been passed ``max_bypass`` times nothing
passes it any more, so no task waits forever behind a stream of small ones.
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


class Admission:
    def __init__(self, capacity: Capacity, max_bypass: int = 16):
        self.capacity = capacity
        self.max_bypass = max_bypass
        self.cores_used = 0.0
        self.memory_used = 0
        self.numa_used: dict[int, float] = {n: 0.0 for n in capacity.numa}
        self._bypassed: dict[int, int] = {}

    def never_fits(self, task: Task) -> str | None:
        """Why this node can never run ``task``, or None."""
        cap = self.capacity
        if task.numa is not None:
            if task.numa not in cap.numa:
                return f"node has no NUMA node {task.numa} (it has {sorted(cap.numa) or 'none'})"
            if task.cores > cap.numa_cores(task.numa):
                return f"{task.cores:g} cores requested; NUMA node {task.numa} offers {cap.numa_cores(task.numa):g}"
        if task.cores > cap.cores:
            return f"{task.cores:g} cores requested; the node offers {cap.cores:g}"
        if task.memory is not None and task.memory > cap.memory:
            return f"{format_size(task.memory)} memory requested; the node offers {format_size(cap.memory)}"
        return None

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
        for task in waiting:
            if self.fits(task):
                self.take(task)
                started.append(task)
                for b in blocked:
                    self._bypassed[b.task_id] = self._bypassed.get(b.task_id, 0) + 1
            else:
                blocked.append(task)
                if self._bypassed.get(task.task_id, 0) >= self.max_bypass:
                    break  # passed often enough: hold everything behind it until it fits
        for task in started:
            self._bypassed.pop(task.task_id, None)
        return started

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
