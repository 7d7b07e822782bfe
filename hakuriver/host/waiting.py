"""Why a task that has not started yet waits, as ``--status`` shows it.

Why it exists: a ``queued`` task's runner says why it waits (its ``queued`` event comes
again with the reason as message, see ``runner/admission.py``), but a ``pending`` task
has no runner yet, and a runner that is offline says nothing. The host knows every node's
last heartbeat, so it adds what only it can see, when the task is read: the target node
is offline or was never seen, or (for the pool) which nodes have room now. Worked out on
read, never stored: it is always as fresh as the heartbeats, and costs nothing while nobody asks.
"""

from __future__ import annotations

from typing import Any

from hakuriver.sizes import format_size
from hakuriver.states import TaskState
from hakuriver.topology import POOL_KEY


def waiting_reason(task: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> str:
    """The message ``--status`` shows for ``task`` (a ledger task dict); ``nodes`` are the
    ledger's node dicts by name. Tasks that are neither pending nor queued keep their message."""
    state, message = task["state"], task.get("message") or ""
    if state not in (TaskState.PENDING.value, TaskState.QUEUED.value):
        return message
    node = task.get("node") or (task.get("target") if task.get("target") != POOL_KEY else None)
    if node is None:
        return message or _pool_reason(task, [n for n in nodes.values() if n["online"]])
    known = nodes.get(node)
    if known is None:
        where = f"node {node} has never been seen online"
    elif not known["online"]:
        where = f"node {node} is offline"
    else:
        return message
    return f"{where}; {message}" if message else where


def _pool_reason(task: dict[str, Any], online: list[dict[str, Any]]) -> str:
    if not online:
        return "waiting for a node: none is online"
    if task.get("container") and not any("docker" in (n.get("executors") or []) for n in online):
        return f"waiting for a node with Docker (container {task['container']}): no online node has it"
    needs = [f"{max(task.get('cores') or 0, 1):g} cores"]  # runners take from the pool only with a core free
    if task.get("memory"):
        needs.append(f"{format_size(task['memory'])} memory")
    if task.get("gpu_count"):
        needs.append(f"{task['gpu_count']} GPUs")
    free = ", ".join(f"{n['name']} {n.get('cores_free', 0):g} cores/{format_size(n.get('memory_free'))}"
                     + (f"/{len(n.get('gpus_free') or [])} GPUs" if task.get("gpu_count") else "")
                     for n in online[:8])
    return f"waiting for a node with room for {' and '.join(needs)} (free now: {free})"
