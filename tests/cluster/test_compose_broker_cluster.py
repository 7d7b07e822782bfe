"""The compose cluster on a 3-node RabbitMQ cluster: the broker node the runners are on dies.

docker-compose.broker-cluster.yml on top of docker-compose.yml: nodes ``rabbitmq``,
``rabbitmq2`` and ``rabbitmq3`` in one cluster, quorum queues, and every container given the
three addresses. tests/test_failover.py shows the same with private nodes on one machine and
500 tasks; this shows it with containers, each node its own hostname and address, as a
reader of docs/operations.md would try it, and ``docker kill`` as the crash.

Marked ``broker_cluster``, so neither the unit run nor the ``cluster`` run starts it (six
containers, 2 to 5 minutes on 2 shared cores): ``.ci/test -m broker_cluster tests/cluster/test_compose_broker_cluster.py``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Callable, TypeVar

import pytest

from compose_harness import ClusterError, ComposeCluster, wait_for

pytestmark = pytest.mark.broker_cluster

TASKS = 50
T = TypeVar("T")
BROKER_SERVICES = ("rabbitmq", "rabbitmq2", "rabbitmq3")
BROKER_NODES = {f"rabbit@{service}" for service in BROKER_SERVICES}  # a node is named after its hostname


def unless_unreachable(query: Callable[[], T]) -> T | None:
    """The answer of a rabbitmqctl query, or None while the CLI cannot get one: from a node that
    has just started, or from a survivor still trying to reach the killed node (seen: the CLI's
    distribution handshake failed)."""
    try:
        return query()
    except ClusterError:
        return None


def ledger_states(cluster: ComposeCluster, ids: list[str]) -> dict[str, int]:
    """How many of ``ids`` the ledger has in each state (one query for all)."""
    done = cluster.client(*(arg for task_id in ids for arg in ("--status", task_id)), "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    states: dict[str, int] = {}
    for task in answer["tasks"]:
        states[task["state"]] = states.get(task["state"], 0) + 1
    return states


def test_runners_broker_node_killed_with_tasks_in_flight(compose_broker_cluster):
    cluster = compose_broker_cluster
    wait_for("3 running broker nodes", lambda: cluster.running_broker_nodes("rabbitmq3") == BROKER_NODES,
             timeout=60, interval=1)
    queue_types = {q["name"]: q["type"] for q in cluster.rabbitmqctl("rabbitmq3", "list_queues", "name", "type")}
    assert queue_types["hakuriver.node.runner1"] == queue_types["hakuriver.ledger"] == "quorum", queue_types

    runner_nodes = cluster.broker_nodes_of("hakuriver.runner")
    assert len(runner_nodes) == 1, f"the runners are on several broker nodes: {runner_nodes}"
    (victim,) = runner_nodes  # the hostname in the node's name is its service's name
    survivor = next(service for service in BROKER_SERVICES if service != victim)

    ran = cluster.shared / "ran.txt"
    # Process tasks (--container NULL) in the runners' containers, which see the shared
    # folder at the host's path. 50 tasks of 1 s on 2 runners of 2 cores: ~13 s of work,
    # so the kill falls in the middle.
    client = cluster.client_process(
        "--wait", "--timeout", "240", "--sweep", "--target", "runner1", "--target", "runner2", "--cores", "1",
        "--container", "NULL", "--", "sh", "-c", f'echo "$HAKURIVER_TASK_ID" >> {ran}; sleep 1',
        "sh", f"span:{{1..{TASKS}}}")
    try:
        ids = [client.stdout.readline().strip() for _ in range(TASKS)]
        assert all(ids), f"the client printed {sum(map(bool, ids))} ids: {client.stderr.read()[-2000:]}"
        wait_for("10 tasks to have run", lambda: ran.exists() and len(ran.read_text().split()) >= 10,
                 timeout=120, interval=0.2)
        ran_before = len(ran.read_text().split())
        killed_at = time.time()
        cluster.kill(victim)
        _, err = client.communicate(timeout=240)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, err[-2000:]
    print(f"\nkilled {victim} after {ran_before} of {TASKS} tasks had run; the last task started "
          f"{ran.stat().st_mtime - killed_at:.0f} s and the --wait client returned {time.time() - killed_at:.0f} s "
          f"after the kill")

    runs = Counter(ran.read_text().split())
    duplicates = sorted(task_id for task_id, n in runs.items() if n > 1)
    missing = sorted(set(ids) - set(runs))
    assert not duplicates and not missing and set(runs) == set(ids), \
        f"ran twice: {duplicates}; never ran: {missing}; unknown: {sorted(set(runs) - set(ids))}"
    assert ledger_states(cluster, ids) == {"completed": TASKS}

    # The killed node restarts and rejoins; the runners went on with another node and stay there.
    cluster.start(victim)
    wait_for(f"{victim} to be healthy", lambda: cluster.health(victim) == "healthy", timeout=120, interval=1)
    wait_for(f"{victim} to rejoin: 3 running nodes",
             lambda: unless_unreachable(lambda: cluster.running_broker_nodes(victim)) == BROKER_NODES,
             timeout=60, interval=1)
    runner_nodes = cluster.broker_nodes_of("hakuriver.runner", ask=survivor)
    assert runner_nodes and victim not in runner_nodes, runner_nodes
