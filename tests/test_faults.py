"""Nothing lost: broker restarts, runner and host crashes, a killed client, long tasks, garbage.

Every test runs real host and runner processes and the real CLI against a private
RabbitMQ node (tests/private_broker.py) that the tests may stop and start; the
shared broker is never touched. Processes are killed with SIGKILL, never politely.
Detection and reconnect times are measured and printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import aio_pika
import psutil
import pytest

from harness.local_cluster import BIN, Cluster, delete_prefix, wait_until
from private_broker import private_broker  # noqa: F401  (the session fixture)

TIMING = {"heartbeat_interval": 0.5, "heartbeat_timeout_factor": 4, "kill_grace": 2.0}
OFFLINE_AFTER = TIMING["heartbeat_interval"] * TIMING["heartbeat_timeout_factor"]


def fault_cluster(root: Path, broker, nodes: list[str], cores: int | None = None) -> Cluster:
    node = {"cores": cores} if cores is not None else {}
    return Cluster(root, nodes, broker={"url": broker.url}, timing=dict(TIMING), node=node)


@pytest.fixture
def make_cluster(tmp_path, private_broker):  # noqa: F811
    """Start a cluster on the private broker; stop it (SIGTERM what is left) afterwards."""
    started: list[Cluster] = []

    def make(nodes: list[str], cores: int | None = None) -> Cluster:
        c = fault_cluster(tmp_path / f"cluster{len(started)}", private_broker, nodes, cores)
        started.append(c)
        return c.start()
    yield make
    for c in started:
        c.stop()
        asyncio.run(delete_prefix(c.prefix, c.nodes, url=private_broker.url))


def ledger_view(c: Cluster, task_ids: list[int], outputs: bool = True) -> dict[int, dict]:
    """Every asked task as the ledger has it, with its stored stdout under ``"stdout"`` (one
    connection for all: hundreds of CLI calls would take most of a minute)."""
    from client.api import Client
    from hakuriver.config import load_config

    async def fetch() -> dict[int, dict]:
        async with Client(load_config(str(c.config))) as client:
            tasks = (await client.query("status", {"task_ids": task_ids}, timeout=30))["tasks"]
            found = {t["task_id"]: t for t in tasks}
            if outputs:
                for task in tasks:
                    data = bytearray()
                    await client.read_output(task["task_id"], "stdout", data.extend)
                    task["stdout"] = bytes(data)
            return found
    return asyncio.run(fetch())


def wait_all_completed(c: Cluster, ids: list[int], what: str) -> dict:
    """The ledger's view of ``ids`` (with outputs) once every one of them is completed."""
    def all_stored():
        view = ledger_view(c, ids)
        return view if all(view.get(i, {}).get("state") == "completed" for i in ids) else None
    return wait_until(all_stored, 30, what, interval=0.5)


def read_ids(proc: subprocess.Popen, count: int) -> list[int]:
    """Read ``count`` task ids from a submitting client's stdout as it prints them."""
    ids = []
    while len(ids) < count:
        line = proc.stdout.readline()
        if not line:
            break
        ids.append(int(line))
    return ids


def submit(c: Cluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "hakuriver.client"), *args], env=c.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


async def _consumer_counts(url: str, queues: list[str]) -> dict[str, int]:
    connection = await aio_pika.connect(url)
    async with connection:
        counts = {}
        for name in queues:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, passive=True)
            counts[name] = queue.declaration_result.consumer_count
        return counts


def consumers_of(c: Cluster, url: str) -> dict[str, int]:
    """How many consumers the broker itself counts on each runner and host queue."""
    from hakuriver.topology import Topology

    topo = Topology(c.prefix)
    queues = [topo.ledger, topo.rpc] + [q for node in c.nodes
                                         for q in (topo.node_queue(node), topo.control_queue(node))]
    try:
        return asyncio.run(_consumer_counts(url, queues))
    except (aio_pika.exceptions.AMQPError, OSError):
        return {}


def nodes_fresh(c: Cluster, since: float) -> bool:
    """Every node shows online in --list-nodes on a heartbeat received after ``since`` (wall clock)."""
    result = c.cli("--list-nodes", "--json")
    if result.returncode != 0:
        return False
    nodes = {n["name"]: n for n in json.loads(result.stdout)["nodes"]}
    return all(n in nodes and nodes[n]["online"] and nodes[n]["last_seen"] > since for n in c.nodes)


# ---- the broker restarts -------------------------------------------------------------


def test_broker_restart_while_200_tasks_run(make_cluster, private_broker, tmp_path):  # noqa: F811
    c = make_cluster(["node1", "node2"], cores=4)
    ran = tmp_path / "ran.txt"
    script = f'echo "$HAKURIVER_TASK_ID" >> {ran}; sleep 0.3; echo "task $1 $HAKURIVER_TASK_ID"'
    client = submit(c, "--wait", "--timeout", "120", "--sweep", "--target", "node1", "--target", "node2",
                    "--cores", "1", "--", "sh", "-c", script, "sh", "span:{1..200}")
    ids = read_ids(client, 200)
    assert len(ids) == 200, client.stderr.read().decode()
    wait_until(lambda: ran.exists() and len(ran.read_text().split()) >= 30, 60, "30 tasks started")

    private_broker.stop_app()
    down_at = time.monotonic()
    # Longer than the offline window, so the host's own silence is exercised too.
    time.sleep(OFFLINE_AFTER + 1.0)  # the outage itself, not a synchronisation
    wall_back = time.time()
    accepting = private_broker.start_app()
    print(f"\nbroker down {accepting - down_at:.1f} s, {len(ran.read_text().split())} tasks started before")

    def consuming() -> bool:
        counts = consumers_of(c, private_broker.url)
        return bool(counts) and all(n >= 1 for n in counts.values())
    wait_until(consuming, 10, "every runner and the host consuming again")
    consuming_after = time.monotonic() - accepting
    wait_until(lambda: nodes_fresh(c, wall_back), 10, "every node online again in --list-nodes")
    online_after = time.monotonic() - accepting
    print(f"reconnect: consumers back {consuming_after:.2f} s, nodes online {online_after:.2f} s "
          f"after the broker accepted connections")
    assert online_after <= 10

    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err.decode()[-2000:]
    lines = ran.read_text().split()
    assert len(lines) == 200 and len(set(lines)) == 200, f"{len(lines)} runs of {len(set(lines))} distinct tasks"
    assert set(map(int, lines)) == set(ids)

    view = wait_all_completed(c, ids, "200 completed tasks in the ledger")
    for n, task_id in enumerate(ids, start=1):
        assert view[task_id]["stdout"] == f"task {n} {task_id}\n".encode()


# ---- a runner dies -------------------------------------------------------------------


def test_runner_killed_mid_task_is_lost_then_serves_again(make_cluster):
    c = make_cluster(["node1"], cores=1)
    marker = f"{uuid.uuid4().int % 10**6:06d}"
    sleeper = ["sleep", f"60.{marker}"]
    lost_id = int(c.cli_ok("--target", "node1", "--cores", "1", "--", *sleeper))
    c.wait_state(lost_id, "running")
    # Accepted but waiting for the one core: it stays with the node across the crash.
    queued_id = int(c.cli_ok("--target", "node1", "--cores", "1", "--", "echo", "queued"))
    c.wait_state(queued_id, "queued")

    killed_at = time.time()
    c.kill("node1", signal.SIGKILL)
    task = c.wait_state(lost_id, "lost", timeout=OFFLINE_AFTER + 5)
    seen_after = time.time() - killed_at
    # The host stamps the moment it declared the task lost; polling only adds its own delay.
    detection = task["finished_at"] - killed_at
    print(f"\nlost detected {detection:.2f} s after SIGKILL, seen by polling after {seen_after:.2f} s "
          f"(window {OFFLINE_AFTER:g} s + 1 s)")
    assert detection <= OFFLINE_AFTER + 1.0
    assert "offline" in task["message"]

    # Sent while the runner is down: they wait with the node (pending), never lost.
    later = [int(c.cli_ok("--target", "node1", "--", "echo", f"later {n}")) for n in range(3)]
    assert {c.task(i)["state"] for i in later} == {"pending"}
    assert c.task(queued_id)["state"] == "queued"

    c.start_runner("node1")
    seen_states = set()

    def later_done():
        seen_states.add(c.task(lost_id)["state"])
        return all(c.task(i)["state"] == "completed" for i in [queued_id, *later])
    wait_until(later_done, 30, "the queued task and those sent while the runner was down to complete")
    assert c.cli("--stdout", str(queued_id)).stdout == b"queued\n"
    for n, task_id in enumerate(later):
        assert c.cli("--stdout", str(task_id)).stdout == f"later {n}\n".encode()
    final = c.task(lost_id)
    # The restarted runner agrees (it could not follow the process) and never revives it.
    assert seen_states == {"lost"} and final["state"] == "lost", (seen_states, final)
    assert [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == sleeper] == []


# ---- the host dies -------------------------------------------------------------------


def test_host_killed_during_a_burst_loses_nothing(make_cluster):
    c = make_cluster(["node1", "node2"], cores=4)
    client = submit(c, "--wait", "--timeout", "120", "--sweep", "--target", "node1", "--target", "node2",
                    "--cores", "1", "--", "sh", "-c", 'sleep 0.1; echo "out $1"', "sh", "span:{1..100}")
    ids = read_ids(client, 20)
    c.kill("host", signal.SIGKILL)
    ids += read_ids(client, 80)
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err.decode()[-2000:]
    assert len(ids) == 100

    c.start_host()

    view = wait_all_completed(c, ids, "100 completed tasks in the restarted host's ledger")
    for n, task_id in enumerate(ids, start=1):
        assert view[task_id]["stdout"] == f"out {n}\n".encode()


# ---- the client dies -----------------------------------------------------------------


def test_client_killed_mid_sweep_every_printed_id_runs(make_cluster):
    c = make_cluster(["node1", "node2"])
    client = submit(c, "--sweep", "--target", "node1", "--target", "node2", "--", "true", "span:{1..1000}")
    ids = read_ids(client, 1)
    client.send_signal(signal.SIGKILL)
    ids += [int(line) for line in client.stdout.read().split()]
    client.wait()
    print(f"\nclient killed after printing {len(ids)} of 1000 ids")
    assert ids

    def all_ran():
        view = ledger_view(c, ids, outputs=False)
        return view if all(view.get(i, {}).get("state") == "completed" for i in ids) else None
    view = wait_until(all_ran, 60, f"{len(ids)} printed tasks completed", interval=0.5)
    assert len(view) == len(ids)


# ---- long tasks ----------------------------------------------------------------------


async def _hold_a_delivery(url: str, queue_name: str, limit: float) -> float | None:
    """Consume one message and never ack it; seconds until the broker closes the channel."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(b"held"), routing_key=queue_name)
        got, closed = asyncio.Event(), asyncio.Event()
        channel.close_callbacks.add(lambda *_: closed.set())

        async def hold(message):
            got.set()
        await queue.consume(hold)
        await got.wait()
        started = time.monotonic()
        try:
            await asyncio.wait_for(closed.wait(), limit)
        except asyncio.TimeoutError:
            return None
        return time.monotonic() - started


def test_task_longer_than_the_consumer_timeout_completes(make_cluster, private_broker):  # noqa: F811
    c = make_cluster(["node1"])
    # The control: the same broker closes a channel that holds a delivery past its timeout.
    control: dict[str, float | None] = {}
    holder = threading.Thread(target=lambda: control.update(closed_after=asyncio.run(
        _hold_a_delivery(private_broker.url, f"{c.prefix}.held", 45))))
    holder.start()
    started = time.monotonic()
    result = c.cli("--wait", "--target", "node1", "--", "sleep", "60", timeout=150)
    took = time.monotonic() - started
    holder.join()
    assert control["closed_after"] is not None and control["closed_after"] < 30, \
        "the broker did not enforce its 20 s consumer timeout"
    print(f"\ncontrol channel closed after {control['closed_after']:.1f} s; 60 s task took {took:.1f} s")
    assert result.returncode == 0, result.stderr.decode()
    task = c.task(result.stdout.decode().strip())
    assert task["state"] == "completed" and task["finished_at"] - task["started_at"] >= 59
    for name in c.nodes:  # no channel of the runner was closed under it
        assert b"PRECONDITION_FAILED" not in (c.root / f"{name}.log").read_bytes()


# ---- garbage -------------------------------------------------------------------------


def garbage(node: str) -> dict[str, bytes]:
    """Four kinds of bad message: not JSON, the wrong shape, oversized, an unknown version."""
    task = {"v": 1, "task_id": 1, "batch_id": 1, "command": "true", "target": node}
    return {
        "not json": b"\x00\xffnot json {",
        "wrong shape": json.dumps({"v": 1, "hello": "world"}).encode(),
        "oversized": json.dumps({**task, "args": ["x" * (1 << 20)]}).encode(),
        "unknown version": json.dumps({**task, "v": 2}).encode(),
    }


async def _publish_garbage_and_collect(url: str, prefix: str, node: str, expect: int) -> list[aio_pika.IncomingMessage]:
    from hakuriver.topology import Topology

    topo = Topology(prefix)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        tasks = await channel.get_exchange(topo.tasks)
        control = await channel.get_exchange(topo.control)
        for exchange, key in ((tasks, node), (tasks, "any"), (control, node)):
            for body in garbage(node).values():
                await exchange.publish(aio_pika.Message(body, delivery_mode=2), routing_key=key, mandatory=True)
        dead = await channel.get_queue(topo.dead)
        letters = []
        deadline = time.monotonic() + 20
        while len(letters) < expect and time.monotonic() < deadline:
            message = await dead.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                letters.append(message)
        return letters


def test_garbage_is_dead_lettered_and_the_runner_serves_on(make_cluster, private_broker):  # noqa: F811
    c = make_cluster(["node1"])
    # 12 from the runner (node queue, pool, control), and 8 from the host: the ledger is bound to
    # the tasks exchange too (it learns every submitted task there), so it sees the task garbage
    every = asyncio.run(_publish_garbage_and_collect(private_broker.url, c.prefix, "node1", expect=20))
    by_host = [m for m in every if m.headers.get("x-hakuriver-source") == "host"]
    assert sorted(m.body for m in by_host) == sorted(list(garbage("node1").values()) * 2), \
        [(m.headers.get("x-hakuriver-source"), m.headers.get("x-hakuriver-reason"), m.body[:80]) for m in every]
    letters = [m for m in every if m.headers.get("x-hakuriver-source") == "runner node1"]
    reasons = [(m.headers.get("x-hakuriver-routing-key"), str(m.headers.get("x-hakuriver-reason"))) for m in letters]
    assert len(letters) == 12 and len(every) == 20, reasons
    assert {key for key, _ in reasons} == {"node1", "any"}
    assert all(reason and reason != "None" for _, reason in reasons)
    assert sum("byte bound" in reason for _, reason in reasons) == 3  # the oversized ones, said so
    assert sorted(m.body for m in letters) == sorted(list(garbage("node1").values()) * 3)
    assert c.processes["node1"].poll() is None
    result = c.cli("--wait", "--target", "node1", "--", "echo", "still serving")
    assert result.returncode == 0, result.stderr.decode()
    assert c.cli("--stdout", result.stdout.decode().strip()).stdout == b"still serving\n"
