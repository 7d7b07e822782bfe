"""The shared pool as the runners schedule it: a task no node can hold, kills, waiting reasons,
runners without Docker (issue 11: items 1, 9, 11, 15).

Tasks that the client would refuse at submit (it reads every node's info) are published here
straight to the tasks exchange, as an older client or another program could, so the runners'
own rules are what is tested.
"""

from __future__ import annotations

import asyncio
import subprocess

import aio_pika
import pytest

from docker_fixtures import docker_engine  # noqa: F401  (fixture)
from harness.local_cluster import BIN, Cluster
from hakuriver import broker, ids
from hakuriver.messages import Task
from hakuriver.sizes import parse_size
from hakuriver.topology import POOL_KEY, Topology


def publish(c: Cluster, **fields) -> int:
    """Publish one task as it is on the wire (no client checks); returns its id."""
    task_id = ids.new_id()
    task = Task(task_id=task_id, batch_id=task_id, target=fields.pop("target", POOL_KEY), **fields)

    async def send():
        connection = await aio_pika.connect(broker_url(c))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchanges = await broker.declare_exchanges(channel, Topology(c.prefix))
            await exchanges.tasks.publish(broker.persistent(task.to_bytes()), routing_key=task.routing_key,
                                          mandatory=True)
    asyncio.run(send())
    return task_id


def broker_url(c: Cluster) -> str:
    from hakuriver.config import load_config

    return load_config(str(c.config)).broker.url


@pytest.fixture
def small_cluster(tmp_path):
    """Two runners of 2 cores and 1 GiB each."""
    c = Cluster(tmp_path / "cluster", ["node1", "node2"], node={"cores": 2, "memory": "1G"})
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.mark.parametrize("need", [{"cores": 64}, {"memory": parse_size("500G")}], ids=["cores", "memory"])
def test_a_pool_task_no_node_can_hold_is_rejected_and_blocks_nothing(small_cluster, need):
    c = small_cluster
    big = publish(c, command="true", **need)
    ok = c.cli("--wait", "--timeout", "20", "--", "echo", "pool-ok", timeout=60)
    assert ok.returncode == 0 and b"completed" in ok.stderr, ok.stderr.decode()
    task = c.wait_state(big, "rejected")
    assert "no online node" in task["message"], task["message"]
    assert ("64 cores" if "cores" in need else "500.0G") in task["message"], task["message"]


def start_runner(c: Cluster, node: str, **env: str) -> None:
    """Start one more runner whose config differs by ``HAKURIVER_<SECTION>_<KEY>`` overrides."""
    with open(c.root / f"{node}.log", "ab") as log:
        c.processes[node] = subprocess.Popen([str(BIN / "hakuriver.runner"), "--node", node],
                                             env={**c.env, **env}, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
    c.nodes.append(node)


def test_a_kill_wins_over_a_pool_task_waiting_for_room(small_cluster, tmp_path):
    c = small_cluster
    busy = [c.cli_ok("--target", node, "--cores", "2", "--", "sleep", "60").strip() for node in c.nodes]
    for task_id in busy:
        c.wait_state(task_id, "running")
    marker = tmp_path / "ran"
    waiting = c.cli_ok("--cores", "2", "--", "touch", str(marker)).strip()
    assert c.task(waiting)["state"] == "pending"
    c.cli_ok("--kill", waiting)
    task = c.wait_state(waiting, {"killed", "completed", "failed"}, timeout=15)
    assert task["state"] == "killed", task
    for task_id in busy:
        c.cli_ok("--kill", task_id)
    for task_id in busy:
        c.wait_state(task_id, "killed")
    assert not marker.exists()


def test_a_pool_task_too_big_for_one_node_goes_to_one_that_can_hold_it(tmp_path):
    c = Cluster(tmp_path / "cluster", ["node1"], node={"cores": 2})
    try:
        c.start()
        start_runner(c, "node2", HAKURIVER_NODE_CORES="4")
        c.wait_online(["node2"])
        result = c.cli("--wait", "--sweep", "--cores", "3", "--", "echo", "span:{1..4}", timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        tasks = [c.task(i) for i in result.stdout.decode().split()]
        assert [(t["state"], t["node"]) for t in tasks] == [("completed", "node2")] * 4
    finally:
        c.stop()


def test_runners_without_docker_leave_pool_container_tasks_to_the_others(tmp_path, docker_engine):  # noqa: F811
    c = Cluster(tmp_path / "cluster", ["node1"], docker={"default_container": "hakuriver-base"})
    try:
        c.start()
        for node in ("node2", "node3"):
            start_runner(c, node, HAKURIVER_DOCKER_URL="unix:///nonexistent/docker.sock")
        c.wait_online(["node2", "node3"])
        executors = {n["name"]: n["executors"] for n in c.query("--list-nodes")["nodes"]}
        assert "docker" in executors["node1"] and "docker" not in executors["node2"] + executors["node3"]
        result = c.cli("--wait", "--sweep", "--", "echo", "span:{1..12}", timeout=120)
        assert result.returncode == 0, result.stderr.decode()
        tasks = [c.task(i) for i in result.stdout.decode().split()]
        assert [(t["state"], t["node"]) for t in tasks] == [("completed", "node1")] * 12
    finally:
        c.stop()
