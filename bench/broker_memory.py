"""Broker memory per runner on a 3-node RabbitMQ cluster with quorum queues (opt-in section ``broker-memory``).

Why it exists: what 500 runners would cost the broker (docs/operations.md, "500 runners on
paper") needs the cost of one, measured where it is largest: quorum queues replicated on
every node. It needs ``HAKURIVER_BENCH_BROKER_CLUSTER=DIR``, a cluster from
``deploy/rabbitmq-cluster start DIR``: the shared broker cannot be measured so, since
other people's queues come and go on it. Each node's total memory (``rabbitmqctl
status``) is read at idle, then again after 20 runners and a host have joined and idled.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

from bench.fifty import IDLE_S, TIMING
from bench.harness import REPO, Cluster, Row, say
from harness.local_cluster import delete_prefix

# Fewer than the fifty section's 50: declaring quorum queues on three nodes that share two
# cores is slow, and the cost per runner is what is wanted.
RUNNERS = 20


def _broker_memory(cluster_dir: Path) -> list[int]:
    """Each running node's total memory in bytes, as ``rabbitmqctl status`` reports it."""
    nodes = json.loads((cluster_dir / "cluster.json").read_text())["nodes"]
    totals = []
    for node in nodes:
        result = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", node["name"], "status", "--formatter",
                                 "json"], capture_output=True, text=True, timeout=120,
                                env={"HOME": str(cluster_dir / "home"), "PATH": os.environ.get("PATH", "")})
        if result.returncode == 0:
            memory = json.loads(result.stdout)["memory"]["total"]
            totals.append(int(max(memory.values())))
    return totals


def broker_memory_row(root: Path, cluster_dir: Path) -> Row:
    urls = subprocess.run([str(REPO / "deploy" / "rabbitmq-cluster"), "urls",
                           str(cluster_dir)], capture_output=True, text=True, check=True).stdout.strip()
    nodes = [f"q{i:02d}" for i in range(1, RUNNERS + 1)]
    time.sleep(5)  # let the nodes settle after whatever ran before
    before = _broker_memory(cluster_dir)
    with Cluster(root / "quorum", nodes, timing=dict(TIMING), node={"cores": 2},
                 broker={"url": urls, "queue_type": "quorum"}) as cluster:
        cluster.start(timeout=400)
        time.sleep(IDLE_S)  # idle: heartbeats flowing, nothing else
        after = _broker_memory(cluster_dir)
    asyncio.run(delete_prefix(cluster.prefix, nodes, url=urls.split(",")[0]))
    grown = [(a - b) / 1e6 for a, b in zip(after, before)]
    per_runner = sum(grown) / len(grown) / RUNNERS * 1000
    return Row(f"broker memory per runner, 3-node cluster, quorum queues", "—",
               f"{', '.join(f'{g:+.0f}' for g in grown)} MB per node for {RUNNERS} runners "
               f"(~{per_runner:.0f} KB per runner per node)", "—", "—", None,
               note=f"rabbitmqctl status total memory of each node, idle, before and {IDLE_S} s after "
                    f"{RUNNERS} runners and a host joined (each runner: 1 connection, 3 quorum queues replicated on every node)")


def run(root: Path) -> list[Row]:
    cluster_dir = os.environ.get("HAKURIVER_BENCH_BROKER_CLUSTER")
    if not cluster_dir:
        raise RuntimeError("set HAKURIVER_BENCH_BROKER_CLUSTER=DIR (a cluster from deploy/rabbitmq-cluster start DIR)")
    row = broker_memory_row(root, Path(cluster_dir))
    say(f"{row.figure}: {row.measured}")
    return [row]
