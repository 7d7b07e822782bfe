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

Every routing key is built *and* parsed here: a key written by one process and read by
another has one definition, so the two can never drift apart. :meth:`Topology.parse_key`
turns an events-exchange key back into a small typed value (:class:`TaskKey` or
:class:`NodeKey`); :func:`parse_target` does the same for a task target (GPU ids after ``::``
are part of the task, not of its routing key).
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

POOL_KEY = "any"          # tasks exchange: the shared pool queue
HELD_KEY = "_held"        # tasks exchange: a task with --after, to the host, which holds it (no node has this name)
DELIVERY_LIMIT = 20  # deliveries of one message from a quorum queue with a limit, then dead-lettered
ALL_NODES_KEY = "all"     # control exchange: every runner
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")

TaskStream = Literal["state", "stdout", "stderr"]
TASK_STREAMS: tuple[TaskStream, ...] = ("state", "stdout", "stderr")
# Bindings on the events exchange (topic patterns).
TASK_EVENTS = "task.#"            # every task's state events and output
NODE_EVENTS = "node.#"            # every node's heartbeats
EVERY_TASK_STATE = "task.*.state"  # every task's state events only


# Named tuples, not dataclasses: the host parses a key per message, thousands a second.
class TaskKey(NamedTuple):
    """``task.<id>.<stream>``: a task's state event or a chunk of its output."""

    task_id: int
    stream: TaskStream


class NodeKey(NamedTuple):
    """``node.<node>.heartbeat``: a runner's heartbeat."""

    node: str


class Target(NamedTuple):
    """A parsed ``--target``: node, NUMA id or None, explicit GPU ids or None."""

    node: str
    numa: int | None = None
    gpus: tuple[int, ...] | None = None


def parse_target(text: str) -> Target:
    """A task target, ``NODE``, ``NODE:NUMA``, ``NODE::IDS`` or ``NODE:NUMA::IDS`` (IDS: GPU ids
    such as ``0,1``), as a :class:`Target`; ValueError naming it."""
    place, sep, ids = text.partition("::")
    gpus = None
    if sep:
        parts = ids.split(",")
        if not all(part.isdigit() and part.isascii() for part in parts):
            raise ValueError(f"invalid target {text!r}: after '::' come GPU ids, numbers ≥ 0 separated by commas")
        gpus = tuple(int(part) for part in parts)
        repeated = sorted({g for g in gpus if gpus.count(g) > 1})
        if repeated:
            raise ValueError(f"invalid target {text!r}: GPU {repeated[0]} given twice")
    node, sep, numa = place.partition(":")
    if not NODE_NAME.match(node) or (sep and not (numa.isdigit() and numa.isascii())):
        raise ValueError(f"invalid target {text!r} (use NODE, NODE:NUMA, NODE::GPUS or NODE:NUMA::GPUS, "
                         "numbers ≥ 0)")
    if node == POOL_KEY and (sep or gpus is not None):
        raise ValueError(f"invalid target {text!r}: the pool takes no NUMA id or GPU ids (use --gpus N)")
    return Target(node, int(numa) if sep else None, gpus)


def target_key(node: str, numa: int | None = None, gpus: tuple[int, ...] | list[int] | None = None) -> str:
    """A target as text, ``NODE[:NUMA][::IDS]`` (the inverse of :func:`parse_target`). Without GPU
    ids it is the tasks-exchange key of the target: a runner binds its node and NUMA keys only."""
    key = node if numa is None else f"{node}:{numa}"
    return key if gpus is None else key + "::" + ",".join(map(str, gpus))


class Topology(NamedTuple):
    """The names under one prefix. A NamedTuple, not a frozen dataclass: the command line
    imports this module on every invocation, and dataclasses (with inspect) cost it a few ms."""

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

    @property
    def pipelines(self) -> str:
        """The host's queue of tasks submitted with ``--after`` (key HELD_KEY) and of kills for everyone (``all``)."""
        return f"{self.prefix}.pipelines"

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

    @staticmethod
    def parse_key(key: str) -> TaskKey | NodeKey:
        """An events-exchange routing key as built above; ValueError naming any other key."""
        parts = key.split(".")
        if parts[0] == "task" and len(parts) == 3:
            task_id, stream = parts[1], parts[2]
            # isdigit() alone takes other scripts' digits ("²"), which int() refuses.
            if stream in TASK_STREAMS and task_id.isdigit() and task_id.isascii():
                return TaskKey(int(task_id), stream)
        elif parts[0] == "node" and parts[-1] == "heartbeat" and len(parts) > 2:
            node = key[len("node."):-len(".heartbeat")]  # a node name may hold dots
            if node:
                return NodeKey(node)
        raise ValueError(f"unknown routing key {key!r}")

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
