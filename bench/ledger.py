"""Ledger figures: ``--list-tasks`` on a 100,000-task SQLite ledger, and sustained event ingestion.

Why it exists: the ledger is the one place every event of every task goes through, and the
one a person queries most. The 100,000 tasks are written straight through
:meth:`hakuriver.host.ledger.Ledger.ingest` (fast, and the same code the host runs); then the real
host serves the real CLI. Ingestion is measured through the real host: state events of a
realistic life cycle (pending with the task, queued, running, completed) are put in the
durable ledger queue while the host is down, then the host is started and its own
``messages_ingested`` counter is read over RPC until it has taken them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from bench.harness import BIN, BROKER_URL, Cluster, Row, latency, median, p95, say, time_command
from harness.local_cluster import wait_until_async

LEDGER_TASKS = 100_000
FILL_BATCH = 5_000
INGEST_TASKS = 5_000           # four events each
LIST_RUNS = 20
PUBLISH_WINDOW = 1_000


def _template_task(cluster: Cluster):
    from client.api import Client, TaskSpec

    return Client(cluster.load_config()).make_tasks(TaskSpec(command="python", args=["train.py", "--lr", "0.1"]),
                                             ["node1"])[0]


async def _fill(cluster: Cluster, count: int) -> float:
    from hakuriver import ids
    from hakuriver.host.ledger import Ledger
    from hakuriver.messages import StateEvent
    from hakuriver.states import TaskState

    config = cluster.load_config()
    ledger = Ledger(config.database_url, Path(config.paths.state_dir) / "logs")
    await ledger.open()
    template = _template_task(cluster)
    start = time.perf_counter()
    try:
        for first in range(0, count, FILL_BATCH):
            events = []
            for _ in range(min(FILL_BATCH, count - first)):
                task = template.model_copy(update={"task_id": ids.new_id()})
                events.append(StateEvent(task_id=task.task_id, node="node1", state=TaskState.COMPLETED, seq=3,
                                         exit_code=0, task=task))
            await ledger.ingest(events)
    finally:
        await ledger.close()
    return time.perf_counter() - start


async def _publish_life_cycles(cluster: Cluster, tasks: int) -> int:
    import aio_pika

    from hakuriver import broker, identity, ids
    from hakuriver.messages import StateEvent
    from hakuriver.states import TaskState
    from hakuriver.topology import Topology

    topo = Topology(cluster.prefix)
    template = _template_task(cluster)
    bodies: list[tuple[str, bytes]] = []
    for _ in range(tasks):
        task = template.model_copy(update={"task_id": ids.new_id()})
        key = topo.state_key(task.task_id)
        bodies += [
            (key, StateEvent(task_id=task.task_id, state=TaskState.PENDING, seq=0, task=task).to_bytes()),
            (key, StateEvent(task_id=task.task_id, node="node1", state=TaskState.QUEUED, seq=1,
                             task=task).to_bytes()),
            (key, StateEvent(task_id=task.task_id, node="node1", state=TaskState.RUNNING, seq=2).to_bytes()),
            (key, StateEvent(task_id=task.task_id, node="node1", state=TaskState.COMPLETED, seq=3,
                             exit_code=0).to_bytes()),
        ]
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchanges = await broker.declare_exchanges(channel, topo)
        await broker.declare_ledger_queue(channel, topo, exchanges)
        for first in range(0, len(bodies), PUBLISH_WINDOW):
            await asyncio.gather(*(exchanges.events.publish(broker.persistent(body, user_id=identity.broker_user(BROKER_URL)),
                                                           routing_key=key)
                                   for key, body in bodies[first:first + PUBLISH_WINDOW]))
    return len(bodies)


@contextlib.asynccontextmanager
async def _host_health(cluster: Cluster):
    """A coroutine function asking the cluster's host for its health: the answer, or None while it does not answer."""
    import aio_pika

    from hakuriver import rpc
    from hakuriver.rpc import HostUnavailable
    from hakuriver.topology import Topology

    topo = Topology(cluster.prefix)
    async with await aio_pika.connect(BROKER_URL) as connection:
        channel = await connection.channel()

        async def health(timeout: float) -> dict | None:
            try:
                return await rpc.call(channel, topo, "health", {"node": None}, timeout=timeout)
            except HostUnavailable:
                return None
        yield health


async def _ingestion_rate(cluster: Cluster, total: int, timeout: float = 120) -> tuple[float, int, float]:
    """(events/s, events counted in the rate, seconds) from the host's first visible progress to the end."""
    async with _host_health(cluster) as health:
        first: tuple[float, int] | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = await health(5)
            if answer is None:
                await asyncio.sleep(0.05)
                continue
            done, now = answer["host"]["messages_ingested"], time.perf_counter()
            if first is None and done > 0:
                first = (now, done)
            if done >= total:
                if first is None or now - first[0] < 0.5:
                    raise RuntimeError("the host ingested everything before progress could be seen")
                return (done - first[1]) / (now - first[0]), done - first[1], now - first[0]
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the host did not ingest {total} events within {timeout} s")


def run(root: Path) -> list[Row]:
    rows: list[Row] = []
    with Cluster(root / "ledger", []) as cluster:
        say(f"filling a SQLite ledger with {LEDGER_TASKS:,} tasks")
        fill_s = asyncio.run(_fill(cluster, LEDGER_TASKS))
        cluster.start_host()
        asyncio.run(_ingestion_wait_ready(cluster))
        say("timing --list-tasks")
        client = str(BIN / "hakuriver.client")
        listed = time_command([client, "--list-tasks"], cluster.env, LIST_RUNS)
        listed_json = time_command([client, "--list-tasks", "--json", "--limit", "1000"], cluster.env, 5)
        rows.append(Row(f"`--list-tasks` with {LEDGER_LABEL} tasks in the SQLite ledger (median / p95)", "—",
                        latency(listed), "—", "p95 ≤ 150 ms; `--json --limit 1000` ≤ 300 ms",
                        p95(listed) <= 0.150 and median(listed_json) <= 0.300,
                        note=f"whole CLI command, default limit 50; `--json --limit 1000`: {latency(listed_json)}; "
                             f"filling the ledger directly took {fill_s:.1f} s "
                             f"({LEDGER_TASKS / fill_s:,.0f} tasks/s through Ledger.ingest)"))
        cluster.stop_process("host")
        say(f"publishing {INGEST_TASKS * 4:,} state events with the host down")
        total = asyncio.run(_publish_life_cycles(cluster, INGEST_TASKS))
        cluster.start_host()
        rate, counted, seconds = asyncio.run(_ingestion_rate(cluster, total))
        rows.append(Row("ledger ingestion through the host, SQLite (events/s)", "—",
                        f"{rate:,.0f} events/s ({counted:,} events in {seconds:.1f} s)", "—",
                        "≥ 2,000 events/s sustained", rate >= 2000,
                        note=f"{INGEST_TASKS:,} tasks × (pending, queued, running, completed) waiting in the "
                             f"durable ledger queue, then the host started on the {LEDGER_TASKS:,}-task ledger; "
                             "rate from the host's first visible progress to the last event (RPC health counter)"))
    return rows


LEDGER_LABEL = f"{LEDGER_TASKS:,}"


async def _ingestion_wait_ready(cluster: Cluster, timeout: float = 30) -> None:
    async with _host_health(cluster) as health:
        await wait_until_async(lambda: health(2), timeout, "the host answering", interval=0.1)
