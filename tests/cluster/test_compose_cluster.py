"""The compose cluster end to end: the seed guide's multi-node examples, node loss, a partition.

RabbitMQ, the host and two runners run as separate containers (docker-compose.yml) with
their own hostnames and addresses; every command is ``hakuriver.client`` run in the host
container, as a user of the cluster would. The guide's environments (``data-proc``,
``ml-env``) are the cluster's default environment here, the project image, which has Python.

Faults are real: ``docker compose kill runner2`` ends the runner and the tasks it runs as
processes; ``docker network disconnect`` cuts runner1 off the broker while its task runs on.

Run alone (a few minutes, builds images on a fresh machine): ``python3 -m pytest tests/cluster -m cluster``.
"""

from __future__ import annotations

import time

import pytest

from compose_harness import ComposeCluster, wait_for

pytestmark = pytest.mark.cluster

# Scripts in shared storage, which task containers see at /shared (the guide's paths).
PROCESS_PY = """\
import argparse, os
parser = argparse.ArgumentParser()
parser.add_argument("--dataset", required=True)
args = parser.parse_args()
node = os.environ["HAKURIVER_NODE"]
with open(f"/shared/results-{args.dataset}.txt", "w") as out:
    out.write(f"dataset {args.dataset} processed on {node}\\n")
print(f"processed {args.dataset} on {node}")
"""
PREPARE_PY = """\
import os
with open("/shared/prepared.csv", "w") as out:
    out.write(f"prepared on {os.environ['HAKURIVER_NODE']}\\n")
"""
TRAIN_PY = """\
import os, sys
data = open("/shared/prepared.csv").read().strip()
print(f"trained on {os.environ['HAKURIVER_NODE']} with [{data}] args={' '.join(sys.argv[1:])}")
"""


@pytest.fixture(scope="module")
def scripts(cluster: ComposeCluster) -> None:
    for name, text in (("process.py", PROCESS_PY), ("prepare_data.py", PREPARE_PY), ("train_model.py", TRAIN_PY)):
        (cluster.shared / name).write_text(text)


def test_basic_submission_runs_in_the_default_container(cluster):
    done = cluster.client("--wait", "--target", "runner1", "--", "echo", "Hello, HakuRiver!")
    assert done.returncode == 0, done.stderr
    (task_id,) = done.stdout.split()
    assert cluster.stdout(task_id) == "Hello, HakuRiver!\n"
    assert cluster.task(task_id)["node"] == "runner1"


def test_same_task_on_both_nodes_reports_each_hostname(cluster):
    # On the host (no container): the task runs inside each runner's container, whose
    # hostname is its node name.
    done = cluster.client("--wait", "--target", "runner1", "--target", "runner2", "--container", "NULL",
                          "--", "hostname")
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 2
    assert [cluster.stdout(i).strip() for i in ids] == ["runner1", "runner2"]
    assert len({cluster.task(i)["batch_id"] for i in ids}) == 1


def test_different_datasets_on_different_nodes_share_storage(cluster, scripts):
    ids = {dataset: cluster.submit("--target", node, "--", "python", "/shared/process.py", "--dataset", dataset)[0]
           for dataset, node in (("A", "runner1"), ("B", "runner2"))}
    for task_id in ids.values():
        assert cluster.wait_state(task_id, {"completed", "failed"}, timeout=60) == "completed"
    assert (cluster.shared / "results-A.txt").read_text() == "dataset A processed on runner1\n"
    assert (cluster.shared / "results-B.txt").read_text() == "dataset B processed on runner2\n"
    assert cluster.stdout(ids["B"]) == "processed B on runner2\n"


def test_multi_stage_pipeline_across_nodes(cluster, scripts):
    # The guide's pipeline, as written there, in the host container's shell.
    pipeline = """
TASK1=$(hakuriver.client --wait --target runner1 -- python /shared/prepare_data.py)
echo "Data preparation completed with task ID: $TASK1" >&2
if [ "$?" -eq 0 ]; then
  TASK2=$(hakuriver.client --wait --target runner2 -- python /shared/train_model.py)
  echo "Training completed with task ID: $TASK2" >&2
  echo "$TASK2"
fi
"""
    done = cluster.exec("sh", "-c", pipeline)
    assert done.returncode == 0, done.stderr
    assert "Data preparation completed with task ID: " in done.stderr
    task2 = done.stdout.strip()
    assert cluster.stdout(task2) == "trained on runner2 with [prepared on runner1] args=\n"


def test_hakurun_sweep_inside_one_task(cluster, scripts):
    (cluster.shared / "prepared.csv").write_text("swept\n")
    done = cluster.client("--wait", "--target", "runner2", "--cores", "1", "--", "hakurun", "--parallel",
                          "python", "/shared/train_model.py", "span:[0.001,0.01,0.1]", "span:[64,128,256]")
    assert done.returncode == 0, done.stderr
    lines = sorted(cluster.stdout(done.stdout.strip()).splitlines())
    assert len(lines) == 9
    assert "trained on runner2 with [swept] args=0.01 128" in lines


def test_hakurun_generates_one_task_per_combination(cluster):
    done = cluster.exec("sh", "-c", "hakurun echo hakuriver.client --target runner1 -- "
                                    "echo combo span:{1..3} span:[A,B] | sh")
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 6
    outputs = set()
    for task_id in ids:
        assert cluster.wait_state(task_id, {"completed", "failed"}, timeout=60) == "completed"
        outputs.add(cluster.stdout(task_id).strip())
    assert outputs == {f"combo {i} {p}" for i in (1, 2, 3) for p in "AB"}


def test_killed_runner_loses_its_running_task_and_new_tasks_wait(cluster):
    (running,) = cluster.submit("--target", "runner2", "--container", "NULL", "--", "sleep", "300")
    cluster.wait_state(running, {"running"}, timeout=30)

    cluster.kill("runner2")
    (waiting,) = cluster.submit("--target", "runner2", "--container", "NULL", "--", "echo", "after the loss")
    cluster.wait_state(waiting, {"pending"}, timeout=10)  # in the ledger: the host has seen it

    def lost_while_new_task_waits() -> bool:
        # The new task must stay pending for as long as runner2 is gone.
        assert cluster.state(waiting) == "pending"
        return cluster.state(running) == "lost"

    wait_for("runner2's task to be lost", lost_while_new_task_waits, timeout=60, interval=1)
    assert not cluster.node_online("runner2")
    assert cluster.state(waiting) == "pending"

    cluster.start("runner2")
    assert cluster.wait_state(waiting, {"completed", "failed"}, timeout=60) == "completed"
    assert cluster.stdout(waiting) == "after the loss\n"
    # The restarted runner found its process task dead: lost it stays.
    assert cluster.state(running) == "lost"
    wait_for("runner2 to be healthy again", lambda: cluster.health("runner2") == "healthy", timeout=60)


def test_partitioned_runner_comes_back_without_losing_its_task(cluster):
    (task_id,) = cluster.submit("--target", "runner1", "--container", "NULL", "--",
                                "sh", "-c", "echo before; sleep 30; echo after")
    cluster.wait_state(task_id, {"running"}, timeout=30)

    cut_at = time.monotonic()
    cluster.disconnect("runner1")
    try:
        # Offline after 3 missed heartbeats (15 s, plus up to one check of the host's); the
        # host then takes its task for lost. The partition lasts 20 s, or until that is seen.
        wait_for("the host to see runner1 offline", lambda: not cluster.node_online("runner1"), timeout=40, interval=1)
        seen_during_partition = cluster.state(task_id)
        # The rest of the 20 s: the fault's length, not a wait for anything.
        time.sleep(max(0.0, 20 - (time.monotonic() - cut_at)))
    finally:
        cluster.connect("runner1")

    assert seen_during_partition == "lost"
    wait_for("runner1 to be online again", lambda: cluster.node_online("runner1"), timeout=60, interval=1)
    # What the runner reports wins over the host's guess: the task ran on and finished.
    assert cluster.wait_state(task_id, {"completed", "failed", "lost"}, timeout=60) == "completed"
    assert cluster.stdout(task_id) == "before\nafter\n"
    assert cluster.task(task_id)["exit_code"] == 0
