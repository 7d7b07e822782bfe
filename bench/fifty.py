"""Fifty runners on one machine: time to online, ``--list-nodes``, a pool sweep's spread, idle cost.

Why it exists: no test runs more than three runners, and what does not scale with the
number of machines (heartbeat traffic, the host's node table, ``--list-nodes``, the
pool's fairness) only shows with many. Each runner is its own process with its own
state directory and node name, offering 2 cores; the timing is the default one
(heartbeat every 5 s), as a department would run it.

Figures and their same-run baselines:
- 50 runners online: from starting the 50 processes (the host already serving) until
  ``list_nodes`` shows all 50 online; baseline: 50 ``hakuriver.runner --help`` started
  at once (process start-up and imports alone).
- ``--list-nodes`` with 50 nodes: the whole command, 20 runs; baseline ``--help``.
- 2,000-task pool sweep of ``true`` (``--cores 1``): submit to the last ``completed``,
  and how many tasks each runner took; baseline: asyncio spawning 2,000 ``true``, 2 at a
  time (all runners share the machine's 2 cores).
- idle: the host's CPU over 20 s and the ledger messages it ingests per second
  (every heartbeat is one), with 50 runners and no task; the 50 runners' CPU together, and
  how many runners listen to the others' heartbeats (queues bound to their key, from
  ``rabbitmqctl list_bindings``: each is delivered 49 heartbeats per 5 s) and the heartbeat
  deliveries per second this makes (the host's 10/s plus the listeners'). Until issue 19
  every runner listened: 500 deliveries/s more. The broker's own delivery counter is
  broker-wide (neighbours share it), too noisy for this.

The broker's memory per runner, on a cluster with quorum queues: bench/broker_memory.py.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.harness import BIN, Cluster, Row, latency, median, p95, say

RUNNERS = 50
SWEEP = 2_000
IDLE_S = 20
TIMING = {"heartbeat_interval": 5.0, "heartbeat_timeout_factor": 3, "kill_grace": 2.0}


def _help_burst(count: int) -> float:
    start = time.perf_counter()
    procs = [subprocess.Popen([str(BIN / "hakuriver.runner"), "--help"], stdout=subprocess.DEVNULL)
             for _ in range(count)]
    for proc in procs:
        proc.wait()
    return time.perf_counter() - start


async def _query(cluster: Cluster, method: str, params: dict | None = None, timeout: float = 30):
    from client.api import Client

    async with Client(cluster.load_config()) as client:
        return await client.query(method, params or {}, timeout=timeout)


def _online(cluster: Cluster) -> int:
    try:
        nodes = asyncio.run(_query(cluster, "list_nodes", timeout=10))["nodes"]
    except Exception:
        return 0
    return sum(1 for n in nodes if n["online"])


@dataclass
class Idle:
    host_cpu: float      # % of one core
    ledger_rate: float   # messages the host ingested per second
    runners_cpu: float   # % of one core, all runners together
    listeners: int       # runners bound to the others' heartbeats


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def _idle(cluster: Cluster) -> Idle:
    """What the cluster costs over IDLE_S seconds with no task."""
    host = psutil.Process(cluster.processes["host"].pid)
    runners = [psutil.Process(p.pid) for name, p in cluster.processes.items() if name != "host"]
    before = asyncio.run(_query(cluster, "health"))["host"]["messages_ingested"]
    cpu_before, runners_before = _cpu_seconds([host]), _cpu_seconds(runners)
    start = time.monotonic()
    time.sleep(IDLE_S)  # the idle period itself, not a synchronisation
    elapsed = time.monotonic() - start
    cpu, runners_cpu = _cpu_seconds([host]) - cpu_before, _cpu_seconds(runners) - runners_before
    after = asyncio.run(_query(cluster, "health"))["host"]["messages_ingested"]
    return Idle(cpu / elapsed * 100, (after - before) / elapsed, runners_cpu / elapsed * 100,
                cluster.heartbeat_listeners())


def _sweep(cluster: Cluster) -> tuple[float, collections.Counter]:
    start = time.perf_counter()
    result = cluster.cli("--wait", "--sweep", "--cores", "1", "--container", "NULL", "--", "true",
                         f"span:{{1..{SWEEP}}}", timeout=900)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"sweep exited {result.returncode}: {result.stderr.decode()[-300:]}")
    ids = [int(i) for i in result.stdout.split()]
    # The client learns each end from the events; the host may still be ingesting them.
    deadline = time.monotonic() + 180
    while True:
        tasks = asyncio.run(_query(cluster, "status", {"task_ids": ids}, timeout=60))["tasks"]
        completed = [t for t in tasks if t["state"] == "completed"]
        if len(completed) == len(ids) or time.monotonic() > deadline:
            return elapsed, collections.Counter(t["node"] for t in completed)
        time.sleep(1)


async def _api_list_nodes(cluster: Cluster, runs: int = 20) -> list[float]:
    """``list_nodes`` over one warm connection: the host's and the broker's part of ``--list-nodes``."""
    from client.api import Client

    samples = []
    async with Client(cluster.load_config()) as client:
        await client.query("list_nodes", {})
        for _ in range(runs):
            start = time.perf_counter()
            await client.query("list_nodes", {}, timeout=30)
            samples.append(time.perf_counter() - start)
    return samples


def run(root: Path) -> list[Row]:
    from bench.throughput import _spawn_true

    nodes = [f"r{i:02d}" for i in range(1, RUNNERS + 1)]
    help_burst = _help_burst(RUNNERS)
    rows: list[Row] = []
    with Cluster(root / "fifty", nodes, timing=dict(TIMING), node={"cores": 2},
                 docker={"default_container": "NULL"}) as cluster:
        cluster.start_host()
        while cluster.cli("--list-nodes").returncode != 0:
            time.sleep(0.1)
        say("idle cost with no runner (baseline)")
        alone = _idle(cluster)
        say(f"starting {RUNNERS} runners")
        start = time.perf_counter()
        for node in nodes:
            cluster.start_runner(node)
        while (online := _online(cluster)) < RUNNERS:
            if time.perf_counter() - start > 120:
                raise RuntimeError(f"only {online} of {RUNNERS} runners online after 120 s")
            time.sleep(0.2)
        to_online = time.perf_counter() - start
        rows.append(Row(f"{RUNNERS} runners online", f"{help_burst:.1f} s ({RUNNERS} × `runner --help` at once)",
                        f"{to_online:.1f} s", f"{to_online / help_burst:.1f}×", "≤ 30 s", to_online <= 30,
                        note="from starting 50 runner processes (host serving) until list_nodes shows all online"))

        say("idle cost")
        time.sleep(5)  # let the start-up burst (node info, first heartbeats) pass
        idle = _idle(cluster)
        beats = RUNNERS / TIMING["heartbeat_interval"]
        delivered = beats + idle.listeners * beats * (RUNNERS - 1) / RUNNERS
        rows.append(Row(f"idle with {RUNNERS} nodes: host CPU; ledger messages/s; runners' CPU; heartbeat deliveries",
                        f"{alone.host_cpu:.1f} % (no runner)",
                        f"{idle.host_cpu:.1f} % of a core; {idle.ledger_rate:.1f} msg/s; runners "
                        f"{idle.runners_cpu:.1f} % together; {delivered:.0f}/s ({idle.listeners} runners listening)",
                        f"+{idle.host_cpu - alone.host_cpu:.1f} %", "—", None,
                        note=f"over {IDLE_S} s, heartbeat every {TIMING['heartbeat_interval']:g} s: "
                             f"{RUNNERS / TIMING['heartbeat_interval']:.0f}/s expected; the broker carries each "
                             "message once in (runner) and once out (host)"))

        say("--list-nodes")
        helps = [_timed(cluster, "--help") for _ in range(20)]
        lists = [_timed(cluster, "--list-nodes") for _ in range(20)]
        api = asyncio.run(_api_list_nodes(cluster))
        rows.append(Row(f"`--list-nodes` with {RUNNERS} nodes (p95)", latency(helps), latency(lists),
                        f"+{(median(lists) - median(helps)) * 1000:.0f} ms", "p95 ≤ 300 ms", p95(lists) <= 0.3,
                        note=f"the whole command, 20 runs; baseline `hakuriver.client --help`; the same query over a "
                             f"warm API connection (host + broker alone): {latency(api)}"))

        say(f"pool sweep of {SWEEP}")
        baseline = asyncio.run(_spawn_true(SWEEP, 2))
        elapsed, per_node = _sweep(cluster)
        counts = [per_node.get(n, 0) for n in nodes]
        took = sum(1 for n in counts if n)
        rows.append(Row(f"{SWEEP:,}-task pool sweep over {RUNNERS} runners", f"{SWEEP / baseline:.0f} tasks/s",
                        f"{SWEEP / elapsed:.0f} tasks/s; {took}/{RUNNERS} runners took a share "
                        f"(min {min(counts)}, median {median(counts):.0f}, max {max(counts)})",
                        f"{baseline / elapsed:.2f}", f"every runner takes a share", took == RUNNERS,
                        note=f"`--wait --sweep --cores 1 -- true`, no target (the pool); {sum(counts)} completed; "
                             "baseline asyncio spawning the same number of `true`, 2 at a time"))
    for row in rows:
        say(f"{row.figure}: {row.measured} (baseline {row.baseline})")
    return rows


def _timed(cluster: Cluster, *args: str) -> float:
    start = time.perf_counter()
    result = cluster.cli(*args, timeout=60)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.decode()[-300:]}")
    return elapsed
