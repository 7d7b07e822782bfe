"""Docker tasks through the whole fabric: the real CLI, runner, host and Docker engine."""

from __future__ import annotations

import signal
import subprocess

import pytest

from harness.local_cluster import Cluster
from docker_fixtures import docker_engine  # noqa: F401  (fixture)


@pytest.fixture
def docker_cluster(tmp_path, docker_engine):  # noqa: F811
    (tmp_path / "mounts").mkdir()
    c = Cluster(tmp_path / "cluster", ["node1"], docker={"default_container": "hakuriver-base"},
                node={"allowed_mount_roots": [str(tmp_path / "mounts")]})
    try:
        yield c.start()
    finally:
        c.stop()


def containers_of(task_id: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=hakuriver.task_id={task_id}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_container_task_runs_with_output_and_env(docker_cluster):
    c = docker_cluster
    assert "docker" in c.query("--list-nodes")["nodes"][0]["executors"]
    result = c.cli("--wait", "--target", "node1", "--env", "GREETING=hi", "--cores", "1", "--memory", "64M", "--",
                   "sh", "-c", "echo $GREETING $HAKURIVER_SHARED_DIR; cat /sys/fs/cgroup/memory/memory.limit_in_bytes")
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.decode().strip()
    assert c.cli("--stdout", task_id).stdout == f"hi /shared\n{64 * 2**20}\n".encode()
    assert containers_of(task_id) == []  # removed after it ended


def test_kill_leaves_no_container(docker_cluster):
    c = docker_cluster
    task_id = c.cli_ok("--target", "node1", "--", "sleep", "300").strip()
    c.wait_state(task_id, "running")
    c.cli_ok("--kill", task_id)
    assert c.wait_state(task_id, "killed")["state"] == "killed"
    assert containers_of(task_id) == []


def test_runner_killed_and_restarted_adopts_its_container(docker_cluster):
    c = docker_cluster
    script = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.5; done"
    task_id = c.cli_ok("--target", "node1", "--", "sh", "-c", script).strip()
    c.wait_state(task_id, "running")
    c.kill("node1", signal.SIGKILL)
    c.start_runner("node1")
    # the host may judge it lost while the runner is away; the runner's report of it wins
    task = c.wait_state(task_id, {"completed", "failed"}, timeout=60)
    assert task["state"] == "completed", task
    assert c.cli("--stdout", task_id).stdout == b"".join(f"line {i}\n".encode() for i in range(1, 7))
    assert containers_of(task_id) == []


def test_a_mount_of_a_host_path_missing_on_the_node_is_rejected_and_not_created(docker_cluster, tmp_path):
    c = docker_cluster
    missing = tmp_path / "mounts" / "missing"
    task_id = c.cli_ok("--target", "node1", "--mount", f"{missing}:/data", "--", "true").strip()
    task = c.wait_state(task_id, {"rejected", "completed", "failed"})
    assert task["state"] == "rejected"
    assert task["message"] == f"mount of {missing}: no such file or directory on node node1"
    assert not missing.exists()
