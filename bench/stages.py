"""``python -m bench.stages``: where the time of one warm API round trip goes, stage by stage.

Why it exists: the round-trip figure alone says "too slow", not where. This submits
``true`` tasks one at a time through a connected client and prints, for each stage, the
median time since the start of the round trip at which the client saw it: waiter
subscribed, submit confirmed, then each state event (``queued``, ``running``,
``completed``) as it arrived. A diagnostic, not part of ``bench/run``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Cluster

STAGES = ("waiter subscribed", "submit confirmed", "queued", "running", "completed", "wait returned")


async def _trace(cluster: Cluster, runs: int) -> list[dict[str, float]]:
    from client.api import Client, TaskSpec

    traces = []
    async with Client(cluster.load_config()) as client:
        spec = TaskSpec(command="true", args=[])
        for attempt in range(runs + 5):
            marks: dict[str, float] = {}
            start = time.perf_counter()
            tasks = client.make_tasks(spec, ["node1"])
            waiter = await client.waiter([t.task_id for t in tasks])
            marks["waiter subscribed"] = time.perf_counter()
            waiter.on_state = lambda event: marks.setdefault(event.state.value, time.perf_counter())
            await client.submit(tasks)
            marks["submit confirmed"] = time.perf_counter()
            await waiter.wait(30)
            marks["wait returned"] = time.perf_counter()
            if attempt >= 5:
                traces.append({stage: (at - start) * 1000 for stage, at in marks.items()})
    return traces


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    with tempfile.TemporaryDirectory(prefix="hakuriver-stages-") as root, \
            Cluster(Path(root), ["node1"]) as cluster:
        cluster.start()
        traces = asyncio.run(_trace(cluster, runs))
    previous = 0.0
    print(f"{'stage':20s} {'at (median)':>12s} {'step':>9s}")
    for stage in STAGES:
        values = [t[stage] for t in traces if stage in t]
        if not values:
            continue
        at = statistics.median(values)
        print(f"{stage:20s} {at:9.1f} ms {at - previous:+7.1f} ms")
        previous = at
    return 0


if __name__ == "__main__":
    sys.exit(main())
