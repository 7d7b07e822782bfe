"""The executor interface, modelled on Nomad's task drivers.

An executor starts a task with its output going to two files the runner gives it,
waits for it, stops it (SIGTERM, then SIGKILL after a grace period, to everything
the task started), destroys what is left (cgroup, container), inspects it, and
recovers a task it started before the runner restarted. It pauses and resumes a
running task's whole tree (:meth:`Executor.pause`), saying how it did. A :class:`Handle` is plain
JSON-able data, stored by the runner, so :meth:`Executor.recover` can rebuild it.
The runner calls :meth:`Executor.close` once when it stops (tasks keep running).

``RunSpec.env`` holds the task's own variables only; each executor puts them on its
own base (a host task's: :mod:`runner.executors.host`; a container's: its image's),
so nothing of the runner's environment reaches a task.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hakuriver.messages import Task


@dataclass
class RunSpec:
    """Everything an executor needs beyond the task message itself."""

    env: dict[str, str]                 # the task's own variables: HAKURIVER_* and the user's --env
    stdout_path: Path
    stderr_path: Path
    cpus: list[int] | None = None       # CPUs of the NUMA node for node:N targets, else None
    mems: list[int] | None = None       # NUMA memory nodes for node:N targets, else None
    shared_dir: str = ""
    local_temp_dir: str = ""
    cwd: str | None = None              # host tasks: None = their own directory under local temp
    gpus: list[str] = field(default_factory=list)  # containers: Docker device ids of the task's GPUs
    account: Any = None                 # runner.accounts.Account the task runs as; None: the runner's own
    container_user: str | None = None   # container tasks: Docker's "User" (uid:gid), None: the image's


@dataclass
class Handle:
    """A started task, as JSON-able data the runner stores for :meth:`Executor.recover`."""

    task_id: int
    executor: str
    data: dict[str, Any] = field(default_factory=dict)
    unenforced: list[str] = field(default_factory=list)  # limits that could not be applied

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "executor": self.executor, "data": self.data,
                "unenforced": self.unenforced}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Handle":
        return cls(task_id=data["task_id"], executor=data["executor"], data=data.get("data", {}),
                   unenforced=data.get("unenforced", []))


@dataclass
class Outcome:
    """How a task ended. ``oom`` is true only when the executor saw the memory limit hit."""

    exit_code: int | None
    oom: bool = False
    message: str = ""


class TaskRejected(Exception):
    """The task can never run here (unknown environment, refused by policy); the message says why."""


class StartFailed(Exception):
    """The task could not be started (command not found, bad image); it ends ``failed``."""


class PauseRefused(Exception):
    """A pause or resume that could not be done; the task runs on as it was, the message says why."""


class Executor(abc.ABC):
    name: str = ""

    @classmethod
    def available(cls) -> bool:
        """Whether this executor can run tasks on this machine."""
        return True

    def unenforceable(self) -> list[str]:
        """Limits this executor cannot enforce on this machine (for the heartbeat)."""
        return []

    @abc.abstractmethod
    async def start(self, task: Task, spec: RunSpec) -> Handle:
        """Start the task; raise :class:`StartFailed` or :class:`TaskRejected`."""

    @abc.abstractmethod
    async def wait(self, handle: Handle) -> Outcome:
        """Wait until the task ends and say how."""

    @abc.abstractmethod
    async def stop(self, handle: Handle, grace: float) -> None:
        """SIGTERM everything the task started; SIGKILL what is left after ``grace`` seconds."""

    async def pause(self, handle: Handle) -> str:
        """Stop the whole task where it is, keeping its resources; returns how, in a few words
        (the task's status shows it). :class:`PauseRefused` where this executor cannot.
        :meth:`stop` and :meth:`destroy` also end a paused task."""
        raise PauseRefused(f"the {self.name} executor cannot pause tasks")

    async def resume(self, handle: Handle) -> str:
        """Let a task stopped by :meth:`pause` run on; returns how."""
        raise PauseRefused(f"the {self.name} executor cannot resume tasks")

    @abc.abstractmethod
    async def destroy(self, handle: Handle) -> None:
        """Remove whatever the task left behind (cgroup, container). Idempotent."""

    async def inspect(self, handle: Handle) -> dict[str, Any]:
        """What the executor knows about the task now (for debugging and health)."""
        return dict(handle.data)

    async def close(self) -> None:
        """Release what the executor holds (connections, followers) when the runner stops.

        Tasks are left running, as they are when the runner dies: the next runner
        recovers them.
        """

    async def recover(self, handle: Handle, spec: RunSpec) -> Handle | None:
        """Re-attach to a task started before the runner restarted.

        Returns the live handle, or None if the task cannot be followed any more
        (the runner then reports it ``lost``), unless :meth:`wait` can still report
        how it ended.
        """
        return None
