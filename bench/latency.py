"""Latency figures of one task at a time: start-up, ``--wait`` round trip, warm API round trip.

Why it exists: these are what a person (or a script looping over the CLI) feels on every
command, so each is a median and p95 of many runs, next to a baseline from the same run:
``python -c pass`` for start-up, ``--help`` for the CLI round trip, and a bare asyncio
spawn of ``true`` plus one AMQP publish→consume round trip for the Python API.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from bench.harness import BIN, Cluster, Row, latency, median, ms, say, time_command

RUNS = 20
API_RUNS = 60


def startup_rows(cluster: Cluster) -> tuple[list[Row], list[float]]:
    """``--help`` and a whole no-wait submit, against ``python -c pass``. Returns the --help samples too."""
    env = cluster.env
    client = str(BIN / "hakuriver.client")
    python = time_command([sys.executable, "-c", "pass"], env, RUNS)
    help_ = time_command([client, "--help"], env, RUNS)
    imports = time_command([sys.executable, "-c", "import client.cli, client.quick"], env, RUNS)
    submit = time_command([client, "--target", "node1", "--", "true"], env, RUNS)
    base = median(python)
    rows = [
        Row("`--help` start-up (median / p95)", latency(python) + " (`python -c pass`)", latency(help_),
            f"{median(help_) / base:.2f}×", "≤ 100 ms", median(help_) <= 0.100),
        Row("submit start-up: whole `--target node1 -- true`, no wait (median / p95)",
            latency(python) + " (`python -c pass`)", latency(submit), f"{median(submit) / base:.2f}×",
            "≤ 120 ms", median(submit) <= 0.120,
            note=f"includes connect, target check and confirmed publish; the imports a submit needs "
                 f"(`import client.cli, client.quick`) take {latency(imports)} of it"),
    ]
    return rows, help_


def wait_round_trip_row(cluster: Cluster, help_samples: list[float]) -> Row:
    client = str(BIN / "hakuriver.client")
    waits = time_command([client, "--wait", "--target", "node1", "--", "true"], cluster.env, RUNS)
    overhead = median(waits) - median(help_samples)
    return Row("`--wait --target node1 -- true`, whole command (median / p95)",
               latency(help_samples) + " (`--help`)", f"{latency(waits)} ({ms(overhead)} over `--help`)",
               f"{median(waits) / median(help_samples):.2f}× `--help`", "≤ 150 ms", median(waits) <= 0.150,
               note="host execution (default_container NULL), runner node1 on this machine")


async def _baseline_api(prefix: str) -> list[float]:
    """asyncio spawn of ``true`` + one persistent publish (confirmed) → consume round trip."""
    import aio_pika

    from bench.harness import BROKER_URL

    connection = await aio_pika.connect(BROKER_URL)
    samples = []
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"{prefix}.bench-rtt", exclusive=True, auto_delete=True)
        arrived: asyncio.Queue = asyncio.Queue()
        await queue.consume(lambda message: arrived.put_nowait(message), no_ack=True)
        for attempt in range(API_RUNS + 5):
            start = time.perf_counter()
            proc = await asyncio.create_subprocess_exec("true")
            await proc.wait()
            await channel.default_exchange.publish(
                aio_pika.Message(b'{"v":1}', delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name)
            await arrived.get()
            if attempt >= 5:
                samples.append(time.perf_counter() - start)
    return samples


async def api_round_trips(cluster: Cluster, runs: int = API_RUNS) -> list[float]:
    """``runs`` warm Python API round trips of ``true`` on node1 (after 5 untimed ones), in seconds."""
    from client.api import Client, TaskSpec

    samples = []
    async with Client(cluster.load_config()) as client:
        spec = TaskSpec(command="true", args=[])
        for attempt in range(runs + 5):
            start = time.perf_counter()
            results = await client.run(spec, ["node1"], timeout=30)
            elapsed = time.perf_counter() - start
            if any(r.state.value != "completed" for r in results.values()):
                raise RuntimeError(f"a task did not complete: {list(results.values())}")
            if attempt >= 5:
                samples.append(elapsed)
    return samples


def api_round_trip_row(cluster: Cluster) -> Row:
    baseline = asyncio.run(_baseline_api(cluster.prefix))
    measured = asyncio.run(api_round_trips(cluster))
    return Row("warm Python API submit → completed, `true` (median / p95)",
               latency(baseline) + " (spawn `true` + AMQP round trip)", latency(measured),
               f"{median(measured) / median(baseline):.2f}×", "≤ 4 ms", median(measured) <= 0.004,
               note="one connected Client; per task: make_tasks, waiter (subscribe), submit (confirmed), "
                    "wait for `completed`; `python -m bench.stages` splits it by stage")


def run(root: Path) -> list[Row]:
    rows: list[Row] = []
    with Cluster(root / "latency", ["node1"]) as cluster:
        cluster.start()
        say("start-up figures")
        startup, help_samples = startup_rows(cluster)
        rows += startup
        say("--wait round trip")
        rows.insert(0, wait_round_trip_row(cluster, help_samples))
        say("Python API round trip")
        rows.insert(1, api_round_trip_row(cluster))
    return rows
