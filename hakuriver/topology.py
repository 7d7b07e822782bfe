"""Broker names and declarations (docs/protocol.md), in one place, under a configurable prefix.

Exchanges:
  <p>.tasks    direct  task messages; a runner's queue <p>.node.<node> binds <node> and
                       <node>:<numa>; the pool queue <p>.pool binds "any"
  <p>.control  direct  kills; <p>.control.<node> binds <node> and "all" (kills whose node
                       is not known yet reach every runner)
  <p>.events   topic   task.<id>.state|stdout|stderr, node.<node>.heartbeat; the host's
                       <p>.ledger binds task.# and node.#
                       (runners also bind <p>.ledger to <p>.tasks with their own keys and
                       "any": each submitted task reaches the ledger as its ``pending`` event
                       without a second publish)
  <p>.dead     fanout  dead letters, kept in the queue <p>.dead
Queues:
  <p>.rpc             the host's RPC requests
  <p>.nodeinfo.<node> holds a runner's latest NodeInfo (max one message), read by clients
"""

from __future__ import annotations

import re
from dataclasses import dataclass

POOL_KEY = "any"
DELIVERY_LIMIT = 20  # deliveries of one message from a quorum queue with a limit, then dead-lettered
ALL_NODES_KEY = "all"
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


def parse_target(text: str) -> tuple[str, int | None]:
    """A task target, ``NODE`` or ``NODE:NUMA``, as (node, NUMA id or None); ValueError naming it."""
    node, sep, numa = text.partition(":")
    if not NODE_NAME.match(node) or (sep and not numa.isdigit()):
        raise ValueError(f"invalid target {text!r} (use NODE or NODE:NUMA with NUMA a number ≥ 0)")
    if node == POOL_KEY and sep:
        raise ValueError(f"invalid target {text!r}: the pool takes no NUMA id")
    return node, int(numa) if sep else None


@dataclass(frozen=True)
class Topology:
    prefix: str = "hakuriver"
    queue_type: str = "classic"   # [broker] queue_type: "quorum" replicates the durable queues

    @property
    def tasks(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def pool(self) -> str:
        return f"{self.prefix}.pool"

    @property
    def ledger(self) -> str:
        return f"{self.prefix}.ledger"

    @property
    def rpc(self) -> str:
        return f"{self.prefix}.rpc"

    def node_queue(self, node: str) -> str:
        return f"{self.prefix}.node.{node}"

    def control_queue(self, node: str) -> str:
        return f"{self.prefix}.control.{node}"

    def nodeinfo_queue(self, node: str) -> str:
        return f"{self.prefix}.nodeinfo.{node}"

    @staticmethod
    def state_key(task_id: int) -> str:
        return f"task.{task_id}.state"

    @staticmethod
    def output_key(task_id: int, stream: str) -> str:
        return f"task.{task_id}.{stream}"

    @staticmethod
    def heartbeat_key(node: str) -> str:
        return f"node.{node}.heartbeat"

    @property
    def dead_letter_args(self) -> dict:
        return self.durable_args()

    def durable_args(self, dead_letter: bool = True, delivery_limit: bool = False, **extra) -> dict:
        """Arguments of a durable queue, by ``queue_type`` (docs/operations.md, "Quorum queues").

        A quorum queue counts every delivery of a message, a requeue included; with
        ``delivery_limit`` a message delivered DELIVERY_LIMIT times is dead-lettered (a
        message that keeps crashing its consumer stops coming back). Queues whose
        consumers requeue on purpose (pool: no room; ledger: database down; node info:
        read by get and requeue) take no limit. Classic queues have no delivery count.
        """
        args = {"x-dead-letter-exchange": self.dead} if dead_letter else {}
        if self.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            if delivery_limit:
                args["x-delivery-limit"] = DELIVERY_LIMIT
        return {**args, **extra}
