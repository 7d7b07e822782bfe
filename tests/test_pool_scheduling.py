"""The shared pool as the runners schedule it: a task no node can hold, kills, waiting reasons,
runners without Docker (issue 11: items 1, 9, 11, 15).

Tasks that the client would refuse at submit (it reads every node's info) are published here
straight to the tasks exchange, as an older client or another program could, so the runners'
own rules are what is tested.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess

import aio_pika
import pytest

from docker_fixtures import docker_engine  # noqa: F401  (fixture)
from harness.local_cluster import BIN, Cluster, wait_until, write_config
from hakuriver import broker, ids
from hakuriver.config import load_config
from hakuriver.host.ledger import _empty_row, apply_state_event
from hakuriver.host.waiting import waiting_reason
from hakuriver.messages import Heartbeat, StateEvent, Task
from hakuriver.sizes import parse_size
from hakuriver.states import TaskState
from hakuriver.topology import POOL_KEY, Topology
from runner.executors.base import Handle
from runner.peers import NodeView, Peers, pool_refusal
from runner.runner import Runner, Running
from runner.store import RunnerStore


GIB = 2**30


def beat(node: str, cores: float = 2, memory: int = GIB, executors=("process",), **fields) -> Heartbeat:
    return Heartbeat(node=node, cores_total=cores, cores_free=cores, memory_total=memory, memory_free=memory,
                     executors=list(executors), **fields)


def pool_task(task_id: int = 1, **fields) -> Task:
    return Task(task_id=task_id, batch_id=1, command="true", target=POOL_KEY, **fields)


def test_pool_refusal_only_when_no_node_can_run_it():
    nodes = [NodeView.of(beat("node1")), NodeView.of(beat("node2", cores=8, memory=4 * GIB))]
    assert pool_refusal(pool_task(cores=8), nodes) is None
    assert pool_refusal(pool_task(cores=64), nodes) == \
        "no online node can run it: 64 cores requested; the largest online node offers 8"
    assert pool_refusal(pool_task(memory=500 * GIB), nodes) == \
        "no online node can run it: 500.0G memory requested; the largest online node offers 4.0G"
    assert "node1: 4 cores requested; node node1 offers 2; node2: 2.0G memory requested" in \
        pool_refusal(pool_task(cores=4, memory=2 * GIB), [NodeView.of(beat("node1", memory=4 * GIB)),
                                                          NodeView.of(beat("node2", cores=8))])
    assert pool_refusal(pool_task(container="env"), nodes) == \
        "no online node can run it: container 'env' needs Docker; no online node has it"
    assert pool_refusal(pool_task(container="env"), [*nodes, NodeView.of(beat("n3", executors=["docker"]))]) is None
    assert pool_refusal(pool_task(container="env"), [NodeView.of(beat("old", executors=[]))]) is None


def test_peers_judge_only_after_listening_and_forget_the_silent():
    now = [100.0]
    peers = Peers("node1", offline_after=2.0, clock=lambda: now[0])
    peers.heard(beat("node1"))  # its own heartbeat: not a peer
    peers.heard(beat("node2"))
    assert not peers.settled()
    now[0] += 4.0
    assert peers.settled() and [p.name for p in peers.online()] == ["node2"]
    now[0] += 3.0  # silent past the offline window, not yet forgotten: a rejection cannot be undone
    assert [p.name for p in peers.online()] == ["node2"]
    now[0] += 2.0
    assert peers.online() == []
    peers.heard(beat("node3"))
    peers.heard(beat("node3", stopping=True))
    assert peers.online() == []


def test_peers_hear_nothing_while_stopped_and_are_wanted_for_listen_for_windows():
    now = [100.0]
    peers = Peers("node1", offline_after=2.0, clock=lambda: now[0])
    peers.stop()
    assert not peers.wanted()
    peers.heard(beat("node2"))  # a delivery that crossed the unbind
    assert peers.online() == []
    now[0] += 10.0
    assert not peers.settled()
    peers.want()
    peers.restart()  # bound
    peers.heard(beat("node2"))
    now[0] += 4.0
    assert peers.settled() and [p.name for p in peers.online()] == ["node2"]
    now[0] += 3.9  # 4 windows of 2 s after the last want
    assert peers.wanted()
    now[0] += 0.2
    assert not peers.wanted()
    peers.stop()
    assert not peers.settled() and peers.online() == []


def test_the_host_says_why_a_pending_task_waits():
    nodes = {"node1": {"name": "node1", "online": True, "cores_free": 0, "memory_free": GIB,
                       "executors": ["process"]},
             "node2": {"name": "node2", "online": False, "cores_free": 2, "memory_free": GIB}}
    pending = {"state": "pending", "message": "", "node": None, "target": "node2", "cores": 1, "container": None}
    assert waiting_reason(pending, nodes) == "node node2 is offline"
    assert waiting_reason({**pending, "target": "node9"}, nodes) == "node node9 has never been seen online"
    assert waiting_reason({**pending, "target": "node1"}, nodes) == ""
    queued = {**pending, "state": "queued", "node": "node2", "message": "waiting for cores: needs 1 of 2"}
    assert waiting_reason(queued, nodes) == "node node2 is offline; waiting for cores: needs 1 of 2"
    pool = {**pending, "target": POOL_KEY}
    assert waiting_reason(pool, nodes) == "waiting for a node with room for 1 cores (free now: node1 0 cores/1.0G)"
    assert waiting_reason({**pool, "container": "env"}, nodes) == \
        "waiting for a node with Docker (container env): no online node has it"
    assert waiting_reason(pool, {}) == "waiting for a node: none is online"
    assert waiting_reason({**pool, "state": "failed", "message": "boom"}, {}) == "boom"


def test_a_container_task_still_starting_counts_as_queued_not_running(tmp_path):
    config = load_config(str(write_config(tmp_path / "config.toml", "hkt-unused", tmp_path)))
    runner = Runner(config, executors={})
    try:
        starting, started = pool_task(container="env"), pool_task(task_id=2)
        spec = runner._spec(starting)
        runner.running[1] = Running(starting, None, runner._output_stream(1, spec))
        runner.running[2] = Running(started, None, runner._output_stream(2, spec), handle=Handle(2, "process"))
        heartbeat = runner.heartbeat()
        assert (heartbeat.running, heartbeat.queued) == ([2], [1])
    finally:
        runner.store.close()


def test_a_reason_is_told_only_while_the_task_is_queued(tmp_path):
    store = RunnerStore(tmp_path / "store.db", Topology("hkt-unused"), "node1")
    try:
        waiting, ended = pool_task(1), pool_task(2)
        store.accept(waiting)
        store.accept(ended)
        store.transition(2, TaskState.COMPLETED, exit_code=0)
        def outbox_rows() -> int:
            return store.db.execute("SELECT count(*) FROM outbox").fetchone()[0]

        def stored(task_id: int) -> tuple[str, int]:
            return tuple(store.db.execute("SELECT state, seq FROM tasks WHERE task_id = ?", (task_id,)).fetchone())

        before = outbox_rows()
        store.tell_waiting({1: "waiting for cores", 2: "starting"})
        assert outbox_rows() == before + 1  # one event, for the queued task only
        assert stored(1) == (TaskState.QUEUED, 2)
        assert stored(2)[0] == TaskState.COMPLETED
    finally:
        store.close()


def test_the_ledger_keeps_when_a_task_was_first_queued():
    row = _empty_row(1)
    for seq, (at, message) in enumerate([(10.0, ""), (12.0, "waiting for cores")], start=1):
        apply_state_event(row, StateEvent(task_id=1, node="node1", state=TaskState.QUEUED, seq=seq, time=at,
                                          message=message))
    assert (row["state"], row["queued_at"], row["message"]) == ("queued", 10.0, "waiting for cores")


def publish(c: Cluster, **fields) -> int:
    """Publish one task as it is on the wire (no client checks); returns its id."""
    task_id = ids.new_id()
    task = Task(task_id=task_id, batch_id=task_id, target=fields.pop("target", POOL_KEY), **fields)

    async def send():
        connection = await aio_pika.connect(broker_url(c))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchanges = await broker.declare_exchanges(channel, Topology(c.prefix))
            await exchanges.tasks.publish(broker.persistent(task.to_bytes(), user_id="guest"), routing_key=task.routing_key,
                                          mandatory=True)
    asyncio.run(send())
    return task_id


def broker_url(c: Cluster) -> str:
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


def test_idle_runners_hear_no_heartbeats_and_listen_only_while_a_pool_task_asks(small_cluster):
    """Issue 19: every runner hearing every other one is N² deliveries; idle, none is bound."""
    c = small_cluster
    assert c.heartbeat_listeners() == 0
    big = publish(c, command="true", cores=64)
    assert "no online node" in c.wait_state(big, "rejected")["message"]
    assert c.heartbeat_listeners() >= 1  # the runner that judged it still listens (LISTEN_FOR)
    wait_until(lambda: c.heartbeat_listeners() == 0, timeout=90, what="the runners to stop listening")


def test_a_kill_wins_over_a_pool_task_no_node_can_hold(small_cluster):
    c = small_cluster
    for node in list(c.nodes):
        c.kill(node, signal.SIGTERM)
    big = publish(c, command="true", cores=64)  # waits in the pool: no runner is there
    c.cli_ok("--kill", str(big))
    for node in c.nodes:  # back before they could judge it: the kill comes first
        c.start_runner(node)
    task = c.wait_state(big, {"killed", "rejected"}, timeout=20)
    assert (task["state"], task["message"]) == ("killed", "killed before it started")


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


def test_status_says_why_a_task_waits(small_cluster):
    c = small_cluster
    busy = {node: c.cli_ok("--target", node, "--cores", "2", "--", "sleep", "60").strip() for node in c.nodes}
    for task_id in busy.values():
        c.wait_state(task_id, "running")

    queued = c.cli_ok("--target", "node1", "--cores", "1", "--", "true").strip()
    task = wait_until(lambda: (t := c.task(queued))["message"] and t, timeout=15, what="a reason")
    assert task["state"] == "queued"
    assert task["message"] == "waiting for cores: needs 1 of the node's 2, other tasks hold them"

    pool = c.cli_ok("--cores", "1", "--", "true").strip()
    task = c.task(pool)
    assert task["state"] == "pending"
    assert task["message"].startswith("waiting for a node with room for 1 cores (free now: node1 0 cores/"), task

    c.cli_ok("--kill", busy["node2"])
    assert c.wait_state(pool, "completed")["node"] == "node2"  # room on node2: the pool task runs there
    c.kill("node2", signal.SIGTERM)  # a polite stop: the host marks it offline at once
    wait_until(lambda: c.node_states().get("node2") is False, what="node2 offline")
    later = c.cli_ok("--target", "node2", "--", "true").strip()
    task = c.task(later)
    assert (task["state"], task["message"]) == ("pending", "node node2 is offline")

    c.cli_ok("--kill", busy["node1"])
    assert c.wait_state(queued, "completed")["message"] == ""  # a reason is gone once it runs
