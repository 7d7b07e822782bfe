"""Several broker addresses: the connection supervisor, and failover on a 3-node cluster.

The first tests need only the shared broker (one address dead, the next one alive) and
run in the normal suite. The ``broker_cluster`` ones start a private 3-node RabbitMQ
cluster through deploy/rabbitmq-cluster, SIGKILL the node that processes are connected
to, and check that nothing is lost: they take minutes, so the default run leaves them
out; run them with ``pytest -m broker_cluster tests/test_failover.py`` (README, "Tests").
"""

from __future__ import annotations

import asyncio
import socket
import subprocess

import aio_pika
import pytest

from broker_cluster import broker_cluster  # noqa: F401  (the session fixture)
from harness.local_cluster import BIN, BROKER_URL, Cluster, delete_prefix, wait_until
from hakuriver import broker
from hakuriver.config import ConfigError, load_config
from hakuriver.broker_address import split_urls
from hakuriver.connection import attempt_order

TIMING = {"heartbeat_interval": 0.5, "heartbeat_timeout_factor": 6, "kill_grace": 2.0}


def dead_url() -> str:
    """An address where nothing listens (a port just freed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/"


# ---- the supervisor, against the shared broker ---------------------------------------------


def test_split_urls_takes_one_or_several_and_names_a_bad_one():
    assert split_urls("amqp://a/") == ["amqp://a/"]
    assert split_urls(" amqp://a/ , amqps://b:5671/v ") == ["amqp://a/", "amqps://b:5671/v"]
    with pytest.raises(ValueError, match="http://b"):
        split_urls("amqp://a/,http://b/")
    with pytest.raises(ValueError, match="empty"):
        split_urls("amqp://a/,")


def test_bad_address_in_the_list_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="HAKURIVER_BROKER_URL.*ftp://x"):
        load_config(environ={"HAKURIVER_BROKER_URL": "amqp://a/,ftp://x/"})
    with pytest.raises(ConfigError, match="queue_type"):
        load_config(environ={"HAKURIVER_BROKER_QUEUE_TYPE": "mirrored"})


def test_attempt_order_starts_at_the_given_address_and_wraps():
    assert attempt_order(0, 3) == [0, 1, 2]
    assert attempt_order(2, 3) == [2, 0, 1]
    assert attempt_order(0, 1) == [0]


async def test_a_dead_first_address_is_skipped():
    connection = await broker.connect(f"{dead_url()},{BROKER_URL}", "hakuriver.test")
    try:
        assert connection.url.port == aio_pika.connection.URL(BROKER_URL).port
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue.name)
        message = await queue.get(timeout=5, fail=False)
        while message is None:  # the publish is not confirmed into the queue synchronously
            message = await queue.get(timeout=5, fail=False)
        assert message.body == b"x"
    finally:
        await connection.close()


async def test_no_address_answering_names_every_one():
    first, second = dead_url(), dead_url()
    with pytest.raises(broker.BrokerUnreachable) as raised:
        await broker.connect(f"{first},{second}", "hakuriver.test", timeout=2)
    message = str(raised.value)
    assert first.replace("guest@", "***@") in message and second.replace("guest@", "***@") in message
    assert "guest:guest" not in message


async def test_queries_are_answered_after_a_reconnect(prefix):
    """The direct reply-to consumer is no declared queue, so aio-pika does not restore it:
    RpcClient makes it again on the reopened channel (else every later query times out)."""
    from hakuriver import rpc
    from hakuriver.messages import RpcReply
    from hakuriver.topology import Topology

    topo = Topology(prefix)
    server = await aio_pika.connect(BROKER_URL)
    connection = await broker.connect(BROKER_URL, "hakuriver.test")
    try:
        server_channel = await server.channel()
        requests = await server_channel.declare_queue(topo.rpc, auto_delete=True)

        async def answer(message) -> None:
            reply = RpcReply(ok=True, result={"answered": True}).to_bytes()
            await server_channel.default_exchange.publish(
                aio_pika.Message(reply, correlation_id=message.correlation_id), routing_key=message.reply_to)
            await message.ack()
        await requests.consume(answer)
        client = rpc.RpcClient(await connection.channel(), topo)
        assert await client.call("status", {}, timeout=5) == {"answered": True}

        reconnected = asyncio.Event()

        async def on_reconnect(*_) -> None:
            reconnected.set()
        connection.reconnect_callbacks.add(on_reconnect)
        await connection.transport.connection.close(ConnectionError("dropped by the test"))
        await asyncio.wait_for(reconnected.wait(), 30)
        assert await client.call("status", {}, timeout=5) == {"answered": True}
    finally:
        await connection.close()
        await server.close()


def test_client_with_a_dead_first_address_submits_and_waits(cluster):
    env = {**cluster.env, "HAKURIVER_BROKER_URL": f"{dead_url()},{BROKER_URL}"}
    result = subprocess.run([str(BIN / "hakuriver.client"), "--wait", "--target", "node1", "--container", "NULL",
                             "--", "echo", "hi"], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()


# ---- a 3-node cluster ----------------------------------------------------------------------


@pytest.mark.broker_cluster
async def test_connection_moves_to_the_next_node_and_redeclares(broker_cluster):  # noqa: F811
    """Kill the node a connection is on: it reconnects to the next one, re-declares its
    exclusive queue, binding and consumer, and messages published after arrive."""
    await asyncio.to_thread(broker_cluster.start)
    urls = broker_cluster.urls
    connection = await broker.connect(",".join(urls), "hakuriver.test")
    publisher = await broker.connect(",".join(urls[2:] + urls[:2]), "hakuriver.test-publisher")  # on node 3
    try:
        reconnected = asyncio.Event()

        async def on_reconnect(*_) -> None:
            reconnected.set()
        connection.reconnect_callbacks.add(on_reconnect)
        channel = await connection.channel()
        exchange = await channel.declare_exchange("hkt-failover-probe", aio_pika.ExchangeType.FANOUT,
                                                  auto_delete=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message) -> None:
            received.put_nowait(message.body)
        await queue.consume(on_message, no_ack=True)
        pub_channel = await publisher.channel()
        pub_exchange = await pub_channel.get_exchange("hkt-failover-probe")
        await pub_exchange.publish(aio_pika.Message(b"before"), routing_key="")
        assert await asyncio.wait_for(received.get(), 10) == b"before"

        await asyncio.to_thread(broker_cluster.kill, 1)
        await asyncio.wait_for(reconnected.wait(), 60)
        assert connection.url.port == broker_cluster.nodes()[1]["port"]  # node 2: the next in the list
        await pub_exchange.publish(aio_pika.Message(b"after"), routing_key="")
        assert await asyncio.wait_for(received.get(), 10) == b"after"
    finally:
        await connection.close()
        await publisher.close()
    await asyncio.to_thread(broker_cluster.start)
    assert broker_cluster.members() == (3, 3)


def _queue_types(broker_cluster, prefix: str) -> dict[str, str]:  # noqa: F811
    import json

    node = broker_cluster.nodes()[2]
    result = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", node["name"], "list_queues", "name", "type",
                             "--formatter", "json"], capture_output=True, text=True, timeout=60,
                            env={"HOME": str(broker_cluster.root / "home"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return {q["name"]: q["type"] for q in json.loads(result.stdout) if q["name"].startswith(prefix + ".")}


@pytest.mark.broker_cluster
@pytest.mark.parametrize("victim", ["runners", "host"])
def test_broker_node_killed_with_500_tasks_in_flight(broker_cluster, tmp_path, victim):  # noqa: F811
    """Runners on node 1, host and a --wait client on node 2. SIGKILL the runners' node (or
    the host's and the client's) while 500 tasks run: each runs exactly once, all end
    completed in the ledger, the client returns; the node restarts and rejoins."""
    broker_cluster.start()
    nodes = ["node1", "node2", "node3"]
    runners_env = {"HAKURIVER_BROKER_URL": broker_cluster.url_list(1, 2, 3)}
    host_env = {"HAKURIVER_BROKER_URL": broker_cluster.url_list(2, 3, 1)}
    c = Cluster(tmp_path / "c", nodes, broker={"url": broker_cluster.url_list(3, 1, 2), "queue_type": "quorum"},
                timing=dict(TIMING), node={"cores": 2})
    ran = tmp_path / "ran.txt"
    try:
        c.start_host(host_env)
        for node in nodes:
            c.start_runner(node, runners_env)
        c.wait_online(nodes, timeout=90)
        types = _queue_types(broker_cluster, c.prefix)
        assert types[f"{c.prefix}.node.node1"] == types[f"{c.prefix}.ledger"] == "quorum", types
        assert types[f"{c.prefix}.nodeinfo.node1"] == types[f"{c.prefix}.pool"] == "quorum", types

        client = subprocess.Popen(
            [str(BIN / "hakuriver.client"), "--wait", "--timeout", "500", "--sweep", "--target", "node1",
             "--target", "node2", "--target", "node3", "--cores", "1", "--container", "NULL", "--",
             "sh", "-c", f'echo "$HAKURIVER_TASK_ID" >> {ran}; sleep 0.1', "sh", "span:{1..500}"],
            env={**c.env, **host_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ids: list[int] = []
        while len(ids) < 500:
            line = client.stdout.readline()
            if not line:
                break
            ids.append(int(line))
        assert len(ids) == 500, client.stderr.read().decode()[-2000:]
        wait_until(lambda: ran.exists() and len(ran.read_text().split()) >= 30, 120, "30 tasks run")
        before = len(ran.read_text().split())
        broker_cluster.kill(1 if victim == "runners" else 2)

        out, err = client.communicate(timeout=560)
        assert client.returncode == 0, err.decode()[-2000:]
        lines = ran.read_text().split()
        counts = {}
        for line in lines:
            counts[int(line)] = counts.get(int(line), 0) + 1
        duplicates = sorted(i for i, n in counts.items() if n > 1)
        missing = sorted(set(ids) - set(counts))
        whose = "the runners'" if victim == "runners" else "the host's and the client's"
        print(f"\nkilled {whose} node after {before} runs: {len(counts)} distinct tasks ran, "
              f"{len(duplicates)} twice, {len(missing)} missing")
        assert not duplicates and not missing and set(counts) == set(ids)

        states = _ledger_states(c, ids)
        assert states == {"completed": 500}, states
    finally:
        c.stop()
        asyncio.run(delete_prefix(c.prefix, nodes, url=broker_cluster.urls[2]))
    broker_cluster.start()
    assert broker_cluster.members() == (3, 3)


def _ledger_states(c: Cluster, ids: list[int]) -> dict[str, int]:
    """How many of ``ids`` the ledger has in each state, once all are completed (or after 60 s)."""
    from client.api import Client

    async def fetch() -> dict[str, int]:
        async with Client(load_config(str(c.config))) as client:
            tasks = (await client.query("status", {"task_ids": ids}, timeout=30))["tasks"]
        states: dict[str, int] = {}
        for task in tasks:
            states[task["state"]] = states.get(task["state"], 0) + 1
        return states
    last: dict[str, int] = {}

    def settled() -> bool:
        last.clear()
        last.update(asyncio.run(fetch()))
        return last == {"completed": len(ids)}
    try:
        wait_until(settled, 60, "every task completed in the ledger", interval=1.0)
    except AssertionError:
        pass
    return last
