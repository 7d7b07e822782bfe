"""Will a task ever run there? The client's refusals before publishing, as pure functions.

Why it exists: a task for a node that lacks the NUMA id, the cores, the memory or the GPUs it
asks for would wait forever, so the client refuses it first (exit 2, nothing published).
Both ways the client talks to the broker (:mod:`client.api`, :mod:`client.quick`) ask these
same functions with what they learnt (a node's retained info, the host's node list), so the
rules and their wording live once. Each returns the refusal in one line, or None.
"""

from __future__ import annotations

from typing import Any, Iterable

from hakuriver.sizes import format_size


def node_refusal(node: str, info_numa: list[int], info_cores: float, info_memory: int, info_gpus: list[int],
                 numas: Iterable[int], cores: float, memory: int, gpu_ids: list[int], gpu_count: int) -> str | None:
    """Why node ``node`` (its retained info: NUMA ids, cores, memory, GPU ids; 0 or empty: it did not say)
    can never run tasks asking for ``numas``, ``cores``, ``memory``, ``gpu_ids`` or ``gpu_count`` GPUs."""
    missing = sorted(n for n in numas if info_numa and n not in info_numa)
    if missing:
        return f"node {node!r} has no NUMA node {missing[0]} (it has {', '.join(map(str, info_numa))})"
    if info_cores and cores > info_cores:  # 0: an old runner that did not say
        return f"--cores {cores:g} is more than node {node!r} has ({info_cores:g})"
    if info_memory and memory > info_memory:
        return f"--memory {format_size(memory)} is more than node {node!r} has ({format_size(info_memory)})"
    has = ", ".join(map(str, info_gpus)) or "none"
    absent = [g for g in gpu_ids if g not in info_gpus]
    if absent:
        return f"node {node!r} has no GPU {absent[0]} (it has {has})"
    if gpu_count > len(info_gpus):
        return f"--gpus {gpu_count} is more than node {node!r} has ({len(info_gpus)}: {has})"
    return None


def pool_refusal(nodes: list[dict[str, Any]], cores: float, memory: int, gpus: int = 0) -> str | None:
    """Why no node the host knows (``list_nodes`` rows) could ever hold a pool task of this size."""
    if gpus and nodes:
        most_gpus = max(len(n.get("gpus") or []) for n in nodes)
        if gpus > most_gpus:
            return f"no node can ever hold --gpus {gpus} (the most any node has is {most_gpus})"
    sizes = [(n.get("cores_total") or 0, n.get("memory_total") or 0) for n in nodes]
    if not sizes or any(c >= cores and (not memory or m >= memory) for c, m in sizes):
        return None
    most_cores, most_memory = max(c for c, _ in sizes), max(m for _, m in sizes)
    if cores > most_cores:
        return f"no node can ever hold --cores {cores:g} (the most any node has is {most_cores:g})"
    if memory > most_memory:
        return (f"no node can ever hold --memory {format_size(memory)} "
                f"(the most any node has is {format_size(most_memory)})")
    return f"no node can ever hold --cores {cores:g} together with --memory {format_size(memory)}"


def offline_note(node: str) -> str:
    return f"node {node!r} is offline (its runner is not connected); the task waits in its queue until it comes back"
