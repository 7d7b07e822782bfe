"""What this runner refuses, whatever the client asked: the node's own config decides.

Privileged tasks run only where ``[node] allow_privileged`` is true; ``--mount`` host
paths must lie under one of ``[node] allowed_mount_roots`` (symlinks resolved). Host
tasks (``--container NULL``) cannot take mounts at all: there is no container to
mount into. A container task is also refused what Docker would refuse
(:func:`hakuriver.containers.container_refusal`, the rule the client shares) and a
mount whose host path does not exist on this node (Docker would create it, as root).
A refusal ends the task ``rejected`` with the reason.
"""

from __future__ import annotations

import os

from hakuriver.config import NodeConfig
from hakuriver.containers import container_refusal
from hakuriver.messages import Task


def refusal(task: Task, node: NodeConfig) -> str | None:
    """Why this node refuses ``task``, or None."""
    if task.privileged and not node.allow_privileged:
        kind = "containers" if task.container is not None else "tasks"
        return f"privileged {kind} are not allowed on node {node.node_name}"
    if task.mounts and task.container is None:
        return f"--mount {task.mounts[0]} needs a container environment (this task runs on the host)"
    roots = [os.path.realpath(root) for root in node.allowed_mount_roots]
    for mount in task.mounts:
        host_path = os.path.realpath(mount.host_path)
        if not any(host_path == root or host_path.startswith(root.rstrip("/") + "/") for root in roots):
            return (f"mount of {mount.host_path} is not allowed on node {node.node_name} "
                    f"(allowed roots: {', '.join(node.allowed_mount_roots) or 'none'})")
    return container_refusal(task) or _missing_mount_source(task, node)


def _missing_mount_source(task: Task, node: NodeConfig) -> str | None:
    for mount in task.mounts:
        if not os.path.exists(mount.host_path):
            return f"mount of {mount.host_path}: no such file or directory on node {node.node_name}"
    return None
