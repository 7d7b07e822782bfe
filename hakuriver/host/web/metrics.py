"""``GET /metrics``: the cluster in the Prometheus text format.

Why it reads the ledger at scrape time instead of counting in memory: the ledger is the
truth and outlives the host process, so "tasks finished" never drops to zero after a
restart and never disagrees with ``--list-tasks``; a scrape costs a few indexed aggregate
queries. Queue depths come from the broker (a passive declare per durable queue).
No task id is ever a label (one series per task would swamp Prometheus).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from aio_pika.abc import AbstractRobustConnection
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from hakuriver.host.ledger import Ledger, tasks_table
from hakuriver.host.web import data
from hakuriver.topology import Topology

log = logging.getLogger("hakuriver.host.web")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Snapshot:
    """A registry collector that yields metric families computed before the scrape."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


def _histogram(name: str, doc: str, bounds: tuple[float, ...], counts: list[int], total: int,
               total_sum: float) -> HistogramMetricFamily:
    buckets = [(str(float(bound)), count) for bound, count in zip(bounds, counts)] + [("+Inf", total)]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total_sum)


async def queue_figures(connection: AbstractRobustConnection | None, names: list[str]) -> dict[str, tuple[int, int]]:
    """(messages ready, consumers) of each queue in ``names`` that exists."""
    figures: dict[str, tuple[int, int]] = {}
    if connection is None:
        return figures
    channel = None
    try:
        for name in names:
            if channel is None or channel.is_closed:
                channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except Exception:  # not declared (yet): the broker closed the channel; a new one for the next
                channel = None
                continue
            result = queue.declaration_result
            figures[name] = (result.message_count, result.consumer_count)
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return figures


def durable_queues(topo: Topology, node_names: list[str]) -> list[str]:
    queues = [topo.ledger, topo.rpc, topo.pool, topo.dead]
    for node in node_names:
        queues += [topo.node_queue(node), topo.control_queue(node)]
    return queues


async def exposition(ledger: Ledger, topo: Topology, connection: Any) -> bytes:
    """The whole /metrics body."""
    nodes = await data.nodes(ledger)
    by_state = await data.counts_by_state(ledger)
    finished = await data.finished_by_node(ledger)
    t = tasks_table.c
    duration = await data.histogram(ledger, t.started_at, t.finished_at, data.DURATION_BUCKETS)
    waiting = await data.histogram(ledger, t.submitted_at, t.started_at, data.WAIT_BUCKETS)
    queues = await queue_figures(connection, durable_queues(topo, [node["name"] for node in nodes]))

    families: list[Metric] = []
    up = GaugeMetricFamily("hakuriver_node_up", "1 if the node is online (heard from recently)", labels=["node"])
    seen = GaugeMetricFamily("hakuriver_node_last_heartbeat_timestamp_seconds",
                             "When the host last heard from the node (Unix time)", labels=["node"])
    resources = {
        name: GaugeMetricFamily(f"hakuriver_node_{name}", doc, labels=["node"]) for name, doc in (
            ("cores_total", "Cores the node offers to tasks"),
            ("cores_allocated", "Cores held by the node's running tasks"),
            ("memory_total_bytes", "Memory the node offers to tasks"),
            ("memory_allocated_bytes", "Memory held by the node's running tasks"),
            ("gpus_total", "GPUs the node offers to tasks (0 on a node without GPUs)"),
            ("gpus_allocated", "GPUs held by the node's running tasks"))}
    for node in nodes:
        name = node["name"]
        up.add_metric([name], 1.0 if node["online"] else 0.0)
        if node["last_seen"] is not None:
            seen.add_metric([name], node["last_seen"])
        held = data.allocation(node)
        for key, family in resources.items():
            value = held[key.replace("_bytes", "")]
            family.add_metric([name], float(value or 0))
    families += [up, seen, *resources.values()]

    states = GaugeMetricFamily("hakuriver_tasks", "Tasks in the ledger by state", labels=["state"])
    for state, count in by_state.items():
        states.add_metric([state], count)
    submitted = CounterMetricFamily("hakuriver_tasks_submitted", "Tasks the ledger has seen submitted")
    submitted.add_metric([], sum(by_state.values()))
    ended = CounterMetricFamily("hakuriver_tasks_finished", "Tasks that ended, by node and outcome",
                                labels=["node", "outcome"])
    for node, outcome, count in finished:
        ended.add_metric([node, outcome], count)
    families += [states, submitted, ended,
                 _histogram("hakuriver_task_duration_seconds", "Run time of ended tasks (start to end)",
                            data.DURATION_BUCKETS, *duration),
                 _histogram("hakuriver_task_wait_seconds", "Time from submission to start",
                            data.WAIT_BUCKETS, *waiting)]

    depth = GaugeMetricFamily("hakuriver_queue_messages", "Messages ready in each durable queue", labels=["queue"])
    consumers = GaugeMetricFamily("hakuriver_queue_consumers", "Consumers of each durable queue", labels=["queue"])
    for name, (messages, count) in queues.items():
        depth.add_metric([name], messages)
        consumers.add_metric([name], count)
    families += [depth, consumers]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)
