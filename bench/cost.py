"""``python -m bench.cost [TASKS]``: the CPU each process spends per trivial task, runner, host, RabbitMQ, client.

Why it exists: the 1,000-task rate of ``bench/run`` says how fast, not who pays. On a 2-core
machine every process competes for the same cores, so the rate follows the sum of their CPU
per task; this prints that sum and its parts (issue 18), from the processes' CPU times before
and after one submission of ``TASKS`` (default 1,000) ``true`` tasks, ``--cores 1``, 2 at a
time. The runner's figure includes its children (the joining shell and ``true``), shown apart.
RabbitMQ is the broker node's ``beam.smp`` (on a shared broker, others' traffic counts too).
A diagnostic, not part of ``bench/run``; compare trees by running it in each, interleaved.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import psutil

from bench.harness import Cluster
from bench.throughput import run_tasks


def _cpu(process: psutil.Process) -> tuple[float, float]:
    """Seconds of CPU of ``process`` itself, and of its waited-for children."""
    times = process.cpu_times()
    return times.user + times.system, times.children_user + times.children_system


def _broker() -> psutil.Process:
    found = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
    if not found:
        raise SystemExit("bench.cost: no beam.smp process here (RabbitMQ must run on this machine)")
    return found[0]


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory(prefix="hakuriver-cost-") as root, \
            Cluster(Path(root), ["node1"], node={"cores": 2}) as cluster:
        cluster.start()
        processes = {"runner": psutil.Process(cluster.processes["node1"].pid),
                     "host": psutil.Process(cluster.processes["host"].pid),
                     "rabbitmq": _broker(), "client": psutil.Process()}
        asyncio.run(run_tasks(cluster, 50))   # warm: imports, first connections, caches
        before = {name: _cpu(p) for name, p in processes.items()}
        elapsed = asyncio.run(run_tasks(cluster, count))
        after = {name: _cpu(p) for name, p in processes.items()}
    per_task = {name: (sum(after[name]) - sum(before[name])) / count * 1000 for name in processes}
    children = (after["runner"][1] - before["runner"][1]) / count * 1000
    print(f"{count} tasks in {elapsed:.2f} s: {count / elapsed:,.0f} tasks/s")
    for name, ms in per_task.items():
        extra = f"  (its children, the shell and the task: {children:.2f})" if name == "runner" else ""
        print(f"  {name:9s} {ms:5.2f} ms of CPU a task{extra}")
    print(f"  {'all':9s} {sum(per_task.values()):5.2f} ms of CPU a task")
    return 0


if __name__ == "__main__":
    sys.exit(main())
