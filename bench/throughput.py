"""Throughput figures: 1,000 trivial host tasks end to end, and the submit rate of a 10,000-task sweep.

Why it exists: a sweep is how people use the fabric for many small jobs, so the rate
must stay a healthy fraction of what the machine can do at all. Baselines from the same
run: an asyncio loop spawning ``true`` two at a time (what a 2-core runner admits with
``--cores 1``), and aio-pika publishing persistent messages of a task's size with
pipelined (batched) publisher confirms.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from bench.harness import BIN, BROKER_URL, Cluster, Row, say, submit_and_wait

TASKS = 1000
SWEEP = 10_000
CONFIRM_WINDOW = 512   # the client's own publish window, for a like-for-like baseline


async def _spawn_true(count: int, at_once: int) -> float:
    limit = asyncio.Semaphore(at_once)

    async def one() -> None:
        async with limit:
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()
    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return time.perf_counter() - start


async def run_tasks(cluster: Cluster, count: int) -> float:
    """Seconds from one API submission of ``count`` ``true`` tasks (``--cores 1``) on node1 to the last result."""
    from client.api import Client, TaskSpec

    async with Client(cluster.load_config()) as client:
        tasks = client.make_tasks(TaskSpec(command="true", args=[], cores=1), ["node1"],
                                  [[str(i)] for i in range(count)])
        tasks = [t.model_copy(update={"args": []}) for t in tasks]
        await client.check_targets(tasks)
        elapsed, results = await submit_and_wait(client, tasks)
    bad = [r for r in results.values() if r.state.value != "completed"]
    if bad:
        raise RuntimeError(f"{len(bad)} tasks did not complete, e.g. {bad[0]}")
    return elapsed


def many_tasks_row(root: Path) -> Row:
    baseline = asyncio.run(_spawn_true(TASKS, 2))
    with Cluster(root / "many", ["node1"], node={"cores": 2}) as cluster:
        cluster.start()
        measured = asyncio.run(run_tasks(cluster, TASKS))
    base_rate, rate = TASKS / baseline, TASKS / measured
    return Row(f"{TASKS:,} trivial host tasks (`true`, `--cores 1` on 2 cores), submit → all done",
               f"{base_rate:,.0f} tasks/s (asyncio spawn of `true`, 2 at a time)", f"{rate:,.0f} tasks/s "
               f"({measured:.2f} s)", f"{rate / base_rate:.2f}", "≥ 0.55", rate / base_rate >= 0.55,
               note="Python API, one submission; the host ingests every event meanwhile (same 2 cores)")


async def _raw_publish_rate(prefix: str, count: int, body: bytes) -> float:
    import aio_pika

    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"{prefix}.bench-raw", durable=True)
        try:
            start = time.perf_counter()
            for first in range(0, count, CONFIRM_WINDOW):
                await asyncio.gather(*(
                    channel.default_exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue.name)
                    for _ in range(min(CONFIRM_WINDOW, count - first))))
            elapsed = time.perf_counter() - start
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    return count / elapsed


def _task_body(cluster: Cluster) -> bytes:
    from client.api import Client, TaskSpec

    client = Client(cluster.load_config())
    task = client.make_tasks(TaskSpec(command="true", args=["9999"]), ["node1"])[0]
    return task.to_bytes()


def _timed_sweep(cluster: Cluster, count: int) -> tuple[float, int]:
    """Seconds from spawning the CLI until it prints the last task id; and how many it printed."""
    argv = [str(BIN / "hakuriver.client"), "--sweep", "--target", "node1", "--", "true", f"span:{{1..{count}}}"]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    printed = 0
    elapsed = 0.0
    for _line in proc.stdout:
        printed += 1
        elapsed = time.perf_counter() - start
    stderr = proc.stderr.read()
    if proc.wait() != 0 or printed != count:
        raise RuntimeError(f"sweep exited {proc.returncode} after {printed} ids: {stderr.decode()[-300:]}")
    return elapsed, printed


def sweep_row(root: Path) -> Row:
    with Cluster(root / "sweep", ["node1"]) as cluster:
        cluster.start()
        # Only submission is measured: the runner and host stop (node1's queue and node info
        # stay on the broker), so nothing else competes for the 2 cores meanwhile.
        cluster.stop_process("node1")
        cluster.stop_process("host")
        body = _task_body(cluster)
        raw_rate = asyncio.run(_raw_publish_rate(cluster.prefix, SWEEP, body))
        say(f"raw publish {raw_rate:,.0f} msg/s; now the sweep")
        elapsed, printed = _timed_sweep(cluster, SWEEP)
    rate = printed / elapsed
    ok = rate / raw_rate >= 0.5 and rate >= 2000
    return Row(f"submit rate of a {SWEEP:,}-task `--sweep` (CLI start → last id printed)",
               f"{raw_rate:,.0f} msg/s (aio-pika, persistent, confirms pipelined {CONFIRM_WINDOW} at a time, "
               f"{len(body)} B bodies)", f"{rate:,.0f} tasks/s ({elapsed:.2f} s)", f"{rate / raw_rate:.2f}",
               "≥ 0.5 and ≥ 2,000 tasks/s", ok,
               note="runner and host stopped during the sweep so only submission is measured; "
                    "CLI start-up included; the baseline publishes one message per task")


def run(root: Path) -> list[Row]:
    rows = []
    say(f"{TASKS} trivial tasks")
    rows.append(many_tasks_row(root))
    say(f"{SWEEP} task sweep")
    rows.append(sweep_row(root))
    return rows
