"""The states a task goes through (docs/protocol.md, "State event") and which of them are final."""

from enum import StrEnum


class TaskState(StrEnum):
    PENDING = "pending"        # published, not yet taken by a runner
    QUEUED = "queued"          # a runner accepted it; waiting for cores/memory
    RUNNING = "running"
    PAUSED = "paused"          # running, stopped by request (--pause); keeps its cores and memory
    HELD = "held"              # --after: the host holds it until every task it waits for completed
    RETRYING = "retrying"      # an attempt failed or was lost; the next one waits --retry-delay, then runs
    COMPLETED = "completed"    # exit 0
    FAILED = "failed"          # exit != 0, or could not start
    KILLED = "killed"          # by request
    KILLED_OOM = "killed_oom"  # memory limit hit
    LOST = "lost"              # its runner went away while it ran
    REJECTED = "rejected"      # the runner can never run it

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({
    TaskState.COMPLETED, TaskState.FAILED, TaskState.KILLED,
    TaskState.KILLED_OOM, TaskState.LOST, TaskState.REJECTED,
})
