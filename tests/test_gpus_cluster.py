"""GPUs through the real CLI, a real host and real runners, with GPUs declared by hand
(``[node] gpus = "0,1"``): what a task sees, that GPUs are exclusive, what is refused before
anything is sent, and pool placement by free GPUs. Tasks block on a file in the shared
directory, so the tests wait on events, never on time.
"""

from __future__ import annotations

import json
import sqlite3
import uuid

import pytest

from harness.local_cluster import Cluster, wait_until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("gpus"), ["node1"], node={"gpus": "0,1"})
    try:
        yield c.start()
    finally:
        c.stop()


def _hold(cluster, *target):
    """Submit a host task that runs until :func:`_release`; returns (task id, release file)."""
    gate = cluster.root / "shared" / f"release-{uuid.uuid4().hex[:8]}"
    task_id = cluster.cli_ok(*target, "--", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done").strip()
    return task_id, gate


def _output_of(cluster, *argv):
    result = cluster.cli("--wait", *argv)
    assert result.returncode == 0, result.stderr.decode()
    return cluster.cli_ok("--stdout", result.stdout.decode().strip())


def test_a_task_on_a_named_gpu_sees_only_that_gpu(cluster):
    out = _output_of(cluster, "--target", "node1::1", "--",
                     "sh", "-c", "echo $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER $HAKURIVER_GPUS")
    assert out == "1 PCI_BUS_ID 1\n"   # declared GPUs have no UUID: the index, in PCI bus order


def test_a_cpu_only_host_task_on_a_gpu_node_sees_no_gpu(cluster):
    out = _output_of(cluster, "--target", "node1", "--", "sh", "-c", 'echo "[${CUDA_VISIBLE_DEVICES-unset}]"')
    assert out == "[]\n"


def test_gpus_n_takes_that_many_and_the_user_cannot_widen_them(cluster):
    out = _output_of(cluster, "--target", "node1", "--gpus", "2", "--env", "CUDA_VISIBLE_DEVICES=0,1,2,3", "--",
                     "sh", "-c", "echo $CUDA_VISIBLE_DEVICES $HAKURIVER_GPUS")
    assert out == "0,1 0,1\n"


def test_tasks_on_one_gpu_run_one_after_the_other_while_the_other_gpu_is_used(cluster):
    first, gate = _hold(cluster, "--target", "node1::1")
    cluster.wait_state(first, "running")
    second = cluster.cli_ok("--target", "node1::1", "--", "true").strip()
    beside = cluster.cli_ok("--target", "node1::0", "--", "true").strip()
    cluster.wait_state(beside, "completed")
    waiting = wait_until(lambda: (t := cluster.task(second))["message"] and t, 30, "a reason for the wait")
    assert waiting["state"] == "queued" and waiting["message"] == "waiting for GPU 1: another task holds it"
    assert cluster.task(first)["gpus"] == [1]
    gate.touch()
    done = cluster.wait_state(second, "completed")
    assert done["started_at"] >= cluster.task(first)["finished_at"]


def test_a_gpu_the_node_lacks_is_refused_before_anything_is_sent(cluster):
    before = cluster.query("--list-tasks", "--limit", "1000")
    for argv, says in [(["--target", "node1::7"], "node 'node1' has no GPU 7 (it has 0, 1)"),
                       (["--target", "node1", "--gpus", "3"], "--gpus 3 is more than node 'node1' has (2: 0, 1)"),
                       (["--target", "node1::0", "--gpus", "2"], "--gpus 2 disagrees with --target 'node1::0'"),
                       (["--target", "node1::0,0"], "GPU 0 given twice"),
                       (["--target", "node1::"], "GPU ids"),
                       (["--gpus", "3"], "no node can ever hold --gpus 3 (the most any node has is 2)")]:
        result = cluster.cli(*argv, "--", "true")
        err = result.stderr.decode()
        assert result.returncode == 2 and says in err and err.count("\n") == 1, (argv, err)
        assert result.stdout == b""
    assert cluster.query("--list-tasks", "--limit", "1000") == before   # nothing was published


def test_list_nodes_shows_gpus_free_of_total(cluster):
    first, gate = _hold(cluster, "--target", "node1::0")
    cluster.wait_state(first, "running")
    try:
        def table():
            lines = cluster.cli_ok("--list-nodes").splitlines()
            return lines if "1/2" in lines[1].split() else None
        header, row = wait_until(table, 30, "GPUS 1/2 in --list-nodes")[:2]
        assert "GPUS" in header.split()
        node = cluster.query("--list-nodes")["nodes"][0]
        assert [g["index"] for g in node["gpus"]] == [0, 1] and node["gpus_free"] == [1]
    finally:
        gate.touch()
    cluster.wait_state(first, "completed")


def test_the_runner_stores_a_tasks_gpus_with_its_handle_for_a_restart(cluster):
    # A restarted runner gives an adopted task the GPUs stored here (Admission.take(task, gpus=...),
    # tests/test_gpu_admission.py). Only containers are adopted, and a GPU container cannot start
    # on this machine (no NVIDIA runtime), so the stored allocation is what is checked end to end.
    first, gate = _hold(cluster, "--target", "node1", "--gpus", "1")
    cluster.wait_state(first, "running")
    try:
        store = sqlite3.connect(cluster.root / "state" / "runner-node1" / "store.db")
        [(handle,)] = store.execute("SELECT handle FROM tasks WHERE task_id = ?", (int(first),)).fetchall()
        store.close()
        assert json.loads(handle)["gpus"] == [0]
    finally:
        gate.touch()
    cluster.wait_state(first, "completed")


def test_pool_tasks_asking_one_gpu_run_at_once_one_per_node(tmp_path):
    with Cluster(tmp_path, ["gpu-a", "gpu-b"], node={"gpus": "0"}) as pool:
        pool.start()
        held = [_hold(pool, "--gpus", "1") for _ in range(2)]
        try:
            running = [pool.wait_state(task_id, "running", timeout=60) for task_id, _ in held]
            assert sorted(t["node"] for t in running) == ["gpu-a", "gpu-b"]
            assert all(t["gpus"] == [0] for t in running)
            # every GPU is busy: a third GPU task waits on a node, not at the head of the pool,
            # so a CPU-only pool task behind it still runs
            third = pool.cli_ok("--gpus", "1", "--", "true").strip()
            cpu_only = pool.cli_ok("--", "true").strip()
            pool.wait_state(cpu_only, "completed", timeout=60)
            assert pool.task(third)["state"] in ("pending", "queued")
        finally:
            for _, gate in held:
                gate.touch()
        for task_id, _ in held:
            pool.wait_state(task_id, "completed")
        pool.wait_state(third, "completed", timeout=60)


def test_status_json_has_the_requested_gpus(cluster):
    out = cluster.cli("--wait", "--target", "node1::0,1", "--", "true")
    task = cluster.task(out.stdout.decode().strip())
    assert task["gpus"] == [0, 1] and task["gpu_count"] == 2
    assert json.dumps(task)  # plain JSON
