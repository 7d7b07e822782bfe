"""What a container task may ask for: the values Docker refuses, decided from the task alone.

Why it exists: Docker refuses some limits and mounts only when the container is
created or started, with the engine's own text ("failed to create shim task: OCI
runtime create failed: ... cpu.cfs_quota_us: invalid argument"). Deciding them here,
from the task's fields and nothing of any machine, lets the runner refuse such a task
with one clear line (it ends ``rejected``), and lets the client refuse it before
anything is sent: both call :func:`container_refusal`.

The bounds are Docker's (20.10 and later): a memory limit of at least 6 MiB; a CPU
limit of at least 0.01 CPU (Docker turns ``NanoCpus`` into a CFS quota per 100 ms
period, and the kernel's smallest quota is 1 ms); no mount at ``/`` and no two mounts
at one path, counting the two every container gets (:data:`SHARED_MOUNT`,
:data:`LOCAL_TEMP_MOUNT`). What only the node can tell (whether a mount's host path
exists there, whether it lies under the node's allowed roots) is the runner's policy
(:mod:`runner.policy`).
"""

from __future__ import annotations

import posixpath
from typing import Protocol, Sequence

from hakuriver.sizes import format_size

SHARED_MOUNT = "/shared"          # the shared directory, in every container
LOCAL_TEMP_MOUNT = "/local_temp"  # the node's local scratch directory, in every container
BUILT_IN_MOUNTS = {SHARED_MOUNT: "the shared directory", LOCAL_TEMP_MOUNT: "the node's local temp directory"}
MIN_MEMORY = 6 * 1024 * 1024      # bytes
MIN_CORES = 0.01


class _Mount(Protocol):
    host_path: str
    container_path: str
    read_only: bool


class ContainerRequest(Protocol):
    """The fields this module reads: a :class:`hakuriver.messages.Task` or the client's task spec."""

    container: str | None
    cores: float
    memory: int | None
    mounts: Sequence[_Mount]


def container_refusal(task: ContainerRequest) -> str | None:
    """Why Docker would refuse this container task, in one line for people; None if it would not.

    A host task (``container`` None) is never refused here.
    """
    if task.container is None:
        return None
    if task.memory is not None and task.memory < MIN_MEMORY:
        return (f"--memory {format_size(task.memory)} is below Docker's minimum of "
                f"{format_size(MIN_MEMORY)} for a container")
    if 0 < task.cores < MIN_CORES:
        return f"--cores {task.cores:g} is below Docker's minimum of {MIN_CORES:g} for a container"
    taken = dict(BUILT_IN_MOUNTS)
    for mount in task.mounts:
        path = "/" + posixpath.normpath(mount.container_path).lstrip("/")   # "//x" is "/x" to Docker
        if path == "/":
            return f"--mount {_text(mount)}: a container path of / is not allowed (it would hide the image)"
        if path in taken:
            return f"--mount {_text(mount)}: {path} is already {taken[path]} in the container"
        taken[path] = f"mounted by --mount {_text(mount)}"
    return None


def _text(mount: _Mount) -> str:
    return f"{mount.host_path}:{mount.container_path}" + (":ro" if mount.read_only else "")
