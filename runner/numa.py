"""The machine's NUMA topology, read from sysfs, and the kernel's CPU-list notation.

The runner advertises its NUMA nodes (CPUs and memory of each) in heartbeats and
node info, and pins ``node:N`` tasks to node N's CPUs and memory. Linux describes
both in ``/sys/devices/system/node/nodeN/{cpulist,meminfo}``; a machine or kernel
without that directory is treated as one node 0 holding every CPU the runner may
use and all of its memory, so the rest of the runner never needs a special case.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil

from hakuriver.messages import NumaNode

SYS_NODE_ROOT = "/sys/devices/system/node"

_NODE_DIR = re.compile(r"^node(\d+)$")
_MEM_TOTAL = re.compile(r"MemTotal:\s*(\d+)\s*kB")


def parse_cpulist(text: str) -> list[int]:
    """CPUs of a kernel CPU list such as ``"0-3,8-11"`` (also ``"0-7:2"`` strides), sorted."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        span, _, stride = part.partition(":")
        first, dash, last = span.partition("-")
        if dash and not last:
            raise ValueError(f"invalid CPU list {text!r}")
        try:
            start = int(first)
            end = int(last) if last else start
            step = int(stride) if stride else 1
        except ValueError:
            raise ValueError(f"invalid CPU list {text!r}") from None
        if end < start or step < 1:
            raise ValueError(f"invalid CPU list {text!r}")
        cpus.update(range(start, end + 1, step))
    return sorted(cpus)


def format_cpulist(cpus: list[int]) -> str:
    """The kernel's compact form of ``cpus``: ``[0, 1, 2, 3, 8]`` → ``"0-3,8"`` (cpuset, systemd)."""
    ranges: list[str] = []
    ordered = sorted(set(cpus))
    index = 0
    while index < len(ordered):
        start = end = ordered[index]
        while index + 1 < len(ordered) and ordered[index + 1] == end + 1:
            index += 1
            end = ordered[index]
        ranges.append(str(start) if start == end else f"{start}-{end}")
        index += 1
    return ",".join(ranges)


def parse_meminfo_total(text: str) -> int:
    """Bytes of a node's ``meminfo`` ``MemTotal`` line (``Node 0 MemTotal: 5073100 kB``)."""
    match = _MEM_TOTAL.search(text)
    if match is None:
        raise ValueError("no MemTotal line in node meminfo")
    return int(match.group(1)) * 1024


def detect_topology(sys_root: str = SYS_NODE_ROOT) -> dict[int, NumaNode]:
    """NUMA node id → its CPUs and memory; one node 0 with everything when sysfs has none.

    Memory-only nodes (no CPUs, e.g. CXL or HBM) are kept: a task may still bind to their memory.
    """
    nodes: dict[int, NumaNode] = {}
    root = Path(sys_root)
    try:
        entries = list(root.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        match = _NODE_DIR.match(entry.name)
        if match is None:
            continue
        try:
            cpus = parse_cpulist((entry / "cpulist").read_text())
            memory = parse_meminfo_total((entry / "meminfo").read_text())
        except (OSError, ValueError):
            continue
        nodes[int(match.group(1))] = NumaNode(cpus=cpus, memory=memory)
    if not nodes:
        nodes[0] = NumaNode(cpus=sorted(os.sched_getaffinity(0)), memory=psutil.virtual_memory().total)
    return dict(sorted(nodes.items()))
