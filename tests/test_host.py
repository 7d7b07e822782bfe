"""The host service in-process against the real broker, with a real SQLite ledger.

Each test uses its own prefix ``hk-test-<uuid8>`` and deletes what it declared.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import uuid

import aio_pika
import pytest

from hakuriver import broker, rpc
from hakuriver.config import BrokerConfig, Config, PathsConfig, SecurityConfig, TimingConfig, WebConfig
from hakuriver.host.service import Host, may_judge_silence
from hakuriver.messages import BCC_HEADER, Heartbeat, OutputChunk, StateEvent, Task, combine_state_events
from hakuriver.states import TaskState
from hakuriver.topology import Topology
from harness.local_cluster import wait_until_async

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
ME = "guest"   # the host's own broker user, so a service account: the host believes its events


class Cluster:
    """A host plus a plain client connection that plays runner and client."""

    def __init__(self, config: Config, connection, channel, exchanges):
        self.config = config
        self.topo = Topology(config.broker.prefix)
        self.connection, self.channel, self.exchanges = connection, channel, exchanges
        self.host: Host | None = None

    async def start_host(self) -> Host:
        self.host = Host(self.config)
        await self.host.start()
        return self.host

    async def stop_host(self) -> None:
        if self.host is not None:
            await self.host.stop()
            self.host = None

    async def publish_state(self, ev: StateEvent) -> None:
        await self.exchanges.events.publish(broker.persistent(ev.to_bytes(), user_id=ME), routing_key=Topology.state_key(ev.task_id))

    async def publish_chunk(self, task_id: int, stream: str, offset: int, data: bytes) -> None:
        chunk = OutputChunk(task_id=task_id, stream=stream, offset=offset)
        await self.exchanges.events.publish(broker.persistent(data, headers=chunk.headers(), user_id=ME),
                                            routing_key=Topology.output_key(task_id, stream))

    async def publish_heartbeat(self, beat: Heartbeat) -> None:
        await self.exchanges.events.publish(broker.persistent(beat.to_bytes(), user_id=ME),
                                            routing_key=Topology.heartbeat_key(beat.node))

    async def call(self, method: str, **params):
        return await rpc.call(self.channel, self.topo, method, params, timeout=10)

    async def status(self, task_id: int) -> dict | None:
        tasks = (await self.call("status", task_ids=[task_id]))["tasks"]
        return tasks[0] if tasks else None


@pytest.fixture
async def cluster(tmp_path):
    prefix = f"hk-test-{uuid.uuid4().hex[:8]}"
    config = Config(broker=BrokerConfig(url=BROKER_URL, prefix=prefix),
                    paths=PathsConfig(state_dir=str(tmp_path / "state"), shared_dir=str(tmp_path / "shared")),
                    timing=TimingConfig(heartbeat_interval=0.2, heartbeat_timeout_factor=3),
                    web=WebConfig(listen=""),  # no dashboard: in-process hosts would all want port 8000
                    security=SecurityConfig(admins=[ME]))  # queries read bob's tasks' output as an admin
    connection = await aio_pika.connect(BROKER_URL)
    channel = await connection.channel()
    exchanges = await broker.declare_exchanges(channel, Topology(prefix))
    cluster = Cluster(config, connection, channel, exchanges)
    await cluster.start_host()
    yield cluster
    await cluster.stop_host()
    topo = cluster.topo
    cleanup = await connection.channel()
    for queue in (topo.ledger, topo.rpc, topo.pipelines, topo.dead):
        await cleanup.queue_delete(queue)
    for exchange in (topo.tasks, topo.control, topo.events, topo.dead):
        await cleanup.exchange_delete(exchange)
    await connection.close()


def make_task(task_id: int, target: str = "node1") -> Task:
    return Task(task_id=task_id, batch_id=task_id, command="echo", args=["hi"], target=target, user="bob")


async def test_events_chunks_and_queries(cluster):
    task_id = 4242
    await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.PENDING, seq=0, task=make_task(task_id)))
    await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.QUEUED, seq=1, node="node1",
                                           task=make_task(task_id)))
    await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.RUNNING, seq=2, node="node1"))
    payload = bytes(range(256)) * 1000
    pieces = [(offset, payload[offset:offset + 60000]) for offset in range(0, len(payload), 60000)]
    for offset, data in reversed(pieces + pieces[:1]):  # out of order, one duplicate
        await cluster.publish_chunk(task_id, "stdout", offset, data)

    async def all_output_stored():
        task = await cluster.status(task_id)
        return task if task and task["stdout_bytes"] == len(payload) else None

    task = await wait_until_async(all_output_stored, 10, "every output byte stored")
    assert task["state"] == "running" and task["node"] == "node1" and task["command"] == "echo"
    out = await cluster.call("output", task_id=task_id, stream="stdout")
    assert base64.b64decode(out["data"]) == payload and out["size"] == len(payload) and out["terminal"] is False

    # A follower waiting at the end of the output wakes up when more arrives.
    follower = asyncio.create_task(cluster.call("output", task_id=task_id, offset=len(payload), wait=10))
    await asyncio.sleep(0.1)  # give the follower time to start waiting; its result is checked below
    assert not follower.done()
    await cluster.publish_chunk(task_id, "stdout", len(payload), b"tail\n")
    more = await asyncio.wait_for(follower, 10)
    assert base64.b64decode(more["data"]) == b"tail\n" and more["offset"] == len(payload)

    # And a follower of a task that ends learns the end without waiting out its time.
    follower = asyncio.create_task(cluster.call("output", task_id=task_id, offset=len(payload) + 5, wait=10))
    await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.COMPLETED, seq=3, node="node1",
                                           exit_code=0))
    started = time.monotonic()
    end = await asyncio.wait_for(follower, 10)
    assert end["terminal"] is True and end["state"] == "completed" and end["data"] == ""
    assert time.monotonic() - started < 5

    listed = (await cluster.call("list_tasks", state="completed"))["tasks"]
    assert [t["task_id"] for t in listed] == [task_id] and listed[0]["exit_code"] == 0
    assert (await cluster.call("list_tasks", node="node2"))["tasks"] == []
    assert (await cluster.call("status", task_ids=[task_id, 1]))["tasks"][0]["task_id"] == task_id


async def test_heartbeats_nodes_and_health(cluster):
    beat = Heartbeat(node="node1", cores_total=8, cores_free=5, memory_total=1 << 33, memory_free=1 << 32,
                     running=[], version="0.1.0", executors=["process"])
    await cluster.publish_heartbeat(beat)

    async def node_listed():
        return (await cluster.call("list_nodes"))["nodes"]

    (node,) = await wait_until_async(node_listed, 10, "node1 listed")
    assert node["name"] == "node1" and node["online"] is True and node["cores_free"] == 5
    assert node["executors"] == ["process"] and node["memory_total"] == 1 << 33
    health = await cluster.call("health", node="node1")
    assert health["nodes"][0]["name"] == "node1"
    assert health["host"]["database"] == "sqlite" and health["host"]["version"]
    with pytest.raises(rpc.RpcError, match="unknown node 'node9'"):
        await cluster.call("health", node="node9")


async def test_offline_node_tasks_become_lost_and_come_back(cluster):
    task_id = 777
    watcher = await cluster.channel.declare_queue(exclusive=True, auto_delete=True)
    await watcher.bind(cluster.exchanges.events, f"task.{task_id}.state")
    beat = dict(cores_total=4, cores_free=4, memory_total=1 << 30, memory_free=1 << 30)
    await cluster.publish_heartbeat(Heartbeat(node="node1", **beat))
    await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.PENDING, seq=0, task=make_task(task_id)))
    await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.RUNNING, seq=2, node="node1"))

    # No more heartbeats: within interval x factor (0.6 s) plus the start-up grace the task is lost.
    lost = None
    async with watcher.iterator(timeout=15) as messages:
        async for message in messages:
            await message.ack()
            received = [e for e in StateEvent.all_from_bytes(message.body) if e.task_id == task_id]
            if received and received[-1].state is TaskState.LOST:
                lost = received[-1]
                break
    assert lost is not None and lost.seq == 2 and lost.node == "node1"
    assert lost.message == "node node1 went offline"
    task = await cluster.status(task_id)
    assert task["state"] == "lost" and task["message"] == "node node1 went offline"
    assert (await cluster.call("list_nodes"))["nodes"][0]["online"] is False

    # The runner comes back and says it still runs the task: its word wins.
    await cluster.publish_heartbeat(Heartbeat(node="node1", running=[task_id], **beat))

    async def running_again():
        task = await cluster.status(task_id)
        return task if task["state"] == "running" else None

    task = await wait_until_async(running_again, 10, "the task running again")
    assert task["finished_at"] is None


async def test_a_combined_message_is_stored_event_by_event_and_once_when_it_comes_again(cluster):
    """As a runner's outbox sends several events at once (docs/protocol.md), and sends again after a crash."""
    events = [StateEvent(task_id=t, state=TaskState.PENDING, seq=0, task=make_task(t)) for t in (31, 32)]
    events += [StateEvent(task_id=31, state=TaskState.QUEUED, seq=1, node="node1", task=make_task(31)),
               StateEvent(task_id=32, state=TaskState.QUEUED, seq=1, node="node1", task=make_task(32)),
               StateEvent(task_id=31, state=TaskState.RUNNING, seq=2, node="node1"),
               StateEvent(task_id=31, state=TaskState.COMPLETED, seq=3, node="node1", exit_code=0)]
    rows = [("ev", Topology.state_key(e.task_id), e.to_bytes(), None) for e in events]
    ((_, key, body, headers),) = combine_state_events(rows, events_exchange="ev")
    assert headers == {BCC_HEADER: [Topology.state_key(32)]}
    for _ in range(2):  # the second time as an outbox resends it: the ledger has every event already
        await cluster.exchanges.events.publish(broker.persistent(body, headers=headers, user_id=ME), routing_key=key)

    async def both_stored():
        return cluster.host.messages_ingested >= 2 * len(events)

    await wait_until_async(both_stored, 10, "both copies ingested")
    assert cluster.host.messages_ingested == 2 * len(events)  # the ledger queue got each copy once
    assert cluster.host.events_applied == len(events)         # and took each event once
    first, second = (await cluster.call("status", task_ids=[31, 32]))["tasks"]
    assert (first["state"], first["exit_code"], second["state"]) == ("completed", 0, "queued")


async def test_lost_events_of_several_tasks_go_out_together_and_reach_each_tasks_waiter(cluster):
    beat = dict(cores_total=4, cores_free=4, memory_total=1 << 30, memory_free=1 << 30)
    await cluster.publish_heartbeat(Heartbeat(node="node1", **beat))
    watchers = {}
    for task_id in (41, 42):
        watchers[task_id] = await cluster.channel.declare_queue(exclusive=True, auto_delete=True)
        await watchers[task_id].bind(cluster.exchanges.events, Topology.state_key(task_id))
        await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.PENDING, seq=0,
                                               task=make_task(task_id)))
        await cluster.publish_state(StateEvent(task_id=task_id, state=TaskState.RUNNING, seq=2, node="node1"))
    # The node falls silent: the host marks both tasks lost in one go, and its outbox sends them as one message.
    for watcher in watchers.values():  # each bound to its own task's key only
        async with watcher.iterator(timeout=15) as messages:
            async for message in messages:
                await message.ack()
                received = StateEvent.all_from_bytes(message.body)
                if any(e.state is TaskState.LOST for e in received):
                    break
        assert sorted((e.task_id, e.state) for e in received) == [(41, TaskState.LOST), (42, TaskState.LOST)]


async def test_garbage_is_dead_lettered_and_the_host_keeps_serving(cluster):
    events = cluster.exchanges.events
    garbage = [
        ("task.1.state", b"{not json", None),
        ("task.1.state", json.dumps({"v": 2, "task_id": 1, "state": "running", "seq": 1}).encode(), None),
        ("task.2.state", StateEvent(task_id=1, state=TaskState.RUNNING, seq=1).to_bytes(), None),
        ("task.abc.state", b"{}", None),
        ("task.1.weird", b"{}", None),
        ("node.x", b"{}", None),
        ("task.1.stdout", b"x" * (65 * 1024), OutputChunk(task_id=1, stream="stdout", offset=0).headers()),
        ("task.1.stdout", b"x", None),
        ("node.a.heartbeat", Heartbeat(node="b", cores_total=1, cores_free=1, memory_total=1,
                                       memory_free=1).to_bytes(), None),
        ("task.1.state", json.dumps({"v": 1, "task_id": 1, "state": "running", "seq": 1 << 70}).encode(), None),
    ]
    for key, body, headers in garbage:
        await events.publish(aio_pika.Message(body, headers=headers, user_id=ME), routing_key=key)
    await cluster.publish_state(StateEvent(task_id=5, state=TaskState.PENDING, seq=0, task=make_task(5)))

    async def good_event_stored():
        return await cluster.status(5)

    assert (await wait_until_async(good_event_stored, 10, "the good event stored"))["state"] == "pending"
    dead = await cluster.channel.declare_queue(cluster.topo.dead, durable=True)
    reasons = []
    async def all_dead_lettered():
        while (message := await dead.get(fail=False)) is not None:
            await message.ack()
            reasons.append((message.headers["x-hakuriver-routing-key"], message.headers["x-hakuriver-reason"]))
        return len(reasons) == len(garbage)

    await wait_until_async(all_dead_lettered, 10, "every bad message dead-lettered")
    assert (await cluster.call("status", task_ids=[1]))["tasks"] == []
    by_key = dict(reasons)
    assert "unknown routing key" in by_key["task.1.weird"] and "unknown routing key" in by_key["node.x"]
    assert "routing key of task 2" in by_key["task.2.state"]

    # Bad requests get a clear error and the host answers the next one.
    with pytest.raises(rpc.RpcError, match="unknown task 99"):
        await cluster.call("output", task_id=99)
    with pytest.raises(rpc.RpcError, match="limit"):
        await cluster.call("list_tasks", limit=0)
    with pytest.raises(rpc.RpcError, match="task_ids"):
        await cluster.call("status", task_ids="five")
    with pytest.raises(rpc.RpcError, match="state"):
        await cluster.call("list_tasks", state="sleeping")
    with pytest.raises(rpc.RpcError, match="task_ids"):
        await cluster.call("status", task_ids=[1 << 70])
    with pytest.raises(rpc.RpcError, match="length"):
        await cluster.call("output", task_id=5, length=5 << 20)
    reply_queue = await cluster.channel.declare_queue(exclusive=True, auto_delete=True)
    await cluster.channel.default_exchange.publish(
        aio_pika.Message(b"[1,2", reply_to=reply_queue.name, correlation_id="c1"), routing_key=cluster.topo.rpc)
    async with reply_queue.iterator(timeout=10) as replies:
        async for reply in replies:
            await reply.ack()
            answer = json.loads(reply.body)
            break
    assert answer["ok"] is False and answer["error"].startswith("bad request")
    assert (await cluster.status(5))["state"] == "pending"


async def test_rpc_without_a_host_is_host_unavailable(cluster):
    other = Topology(f"hk-test-{uuid.uuid4().hex[:8]}")
    with pytest.raises(rpc.HostUnavailable, match="no host"):
        await rpc.call(cluster.channel, other, "list_nodes", {}, timeout=5)


async def test_throughput_of_a_backlog(cluster):
    """5,000 events wait in the durable ledger queue while the host is down, then drain."""
    await cluster.stop_host()
    count_tasks = 1000
    publisher = await cluster.connection.channel(publisher_confirms=False)
    events = await publisher.get_exchange(cluster.topo.events)
    for task_id in range(1, count_tasks + 1):
        for seq, state in enumerate(["pending", "queued", "running"]):
            ev = StateEvent(task_id=task_id, state=TaskState(state), seq=seq, node="node1",
                            task=make_task(task_id) if seq < 2 else None)
            await events.publish(broker.persistent(ev.to_bytes(), user_id=ME), routing_key=Topology.state_key(task_id))
        chunk = OutputChunk(task_id=task_id, stream="stdout", offset=0)
        await events.publish(broker.persistent(b"line\n", headers=chunk.headers(), user_id=ME),
                             routing_key=Topology.output_key(task_id, "stdout"))
        ev = StateEvent(task_id=task_id, state=TaskState.COMPLETED, seq=3, node="node1", exit_code=0)
        await events.publish(broker.persistent(ev.to_bytes(), user_id=ME), routing_key=Topology.state_key(task_id))
    await cluster.publish_state(StateEvent(task_id=count_tasks + 1, state=TaskState.PENDING, seq=0,
                                           task=make_task(count_tasks + 1)))

    async def backlog_queued():
        queue = await publisher.declare_queue(cluster.topo.ledger, passive=True)
        return queue.declaration_result.message_count == 5001

    await wait_until_async(backlog_queued, 10, "the backlog queued")

    started = time.perf_counter()
    host = await cluster.start_host()

    async def drained():
        return host.messages_ingested >= 5001

    await wait_until_async(drained, 60, "the backlog ingested", interval=0.005)
    elapsed = time.perf_counter() - started
    print(f"\nhost ingested 5,001 events in {elapsed:.2f} s: {5001 / elapsed:,.0f} events/s")
    done = await cluster.call("list_tasks", state="completed", limit=10_000)
    assert len(done["tasks"]) == count_tasks
    assert all(t["stdout_bytes"] == 5 for t in done["tasks"])
    health = await cluster.call("health")
    assert health["host"]["events_applied"] == 4 * count_tasks + 1


def test_config_error_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[host]\ndatabase = 1\n")
    result = subprocess.run([sys.executable, "-m", "hakuriver.host", "--config", str(bad)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "host.database" in result.stderr


def test_silence_counts_only_when_connected_caught_up_and_a_window_after_start():
    assert may_judge_silence(True, since_start=10.0, offline_after=5.0, behind=False)
    assert not may_judge_silence(False, since_start=10.0, offline_after=5.0, behind=False)   # disconnected
    assert not may_judge_silence(True, since_start=4.9, offline_after=5.0, behind=False)     # just (re)started
    assert not may_judge_silence(True, since_start=-2.0, offline_after=5.0, behind=False)    # reconnect grace
    # deliveries wait in the host's inbox: the runners' heartbeats may be among them
    assert not may_judge_silence(True, since_start=10.0, offline_after=5.0, behind=True)
