"""Host tasks through the real CLI and a real runner: what they start with, and that none of their processes outlive them.

The runner here is started with a secret in its own environment, as a runner started
from an operator's shell would be: no task may see it.
"""

from __future__ import annotations

import uuid

import psutil
import pytest

from harness.local_cluster import Cluster, wait_until

SECRET = "HK_RUNNER_SECRET"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("host-tasks"), ["node1"])
    c.env[SECRET] = "s3cret-of-the-runner"
    try:
        yield c.start()
    finally:
        c.stop()


def _submit_wait(cluster, *argv):
    result = cluster.cli("--wait", "--target", "node1", "--container", "NULL", *argv)
    return result.returncode, result.stdout.decode().strip(), result.stderr.decode()


def _marker():
    return f"300.{uuid.uuid4().int % 10**6:06d}"


def _processes_with(marker):
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if marker in (proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def test_a_host_task_starts_in_its_own_directory_with_the_documented_environment(cluster):
    code, task_id, err = _submit_wait(cluster, "--env", "MODEL=large", "--", "sh", "-c", "pwd; env")
    assert code == 0, err
    where, *lines = cluster.cli_ok("--stdout", task_id).splitlines()
    assert where == str(cluster.root / "tmp" / f"task-{task_id}")  # <local_temp_dir>/task-<id>
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert SECRET not in env and "HAKURIVER_CONFIG" not in env
    assert env["MODEL"] == "large" and env["HAKURIVER_TASK_ID"] == task_id and env["HAKURIVER_NODE"] == "node1"
    assert env["LANG"] == "C.UTF-8" and env["PWD"] == where
    assert not (cluster.root / "tmp" / f"task-{task_id}").exists(), "removed when the task ended"


def test_a_process_that_left_the_tasks_group_ends_with_the_task(cluster):
    marker = _marker()
    code, task_id, err = _submit_wait(cluster, "--", "sh", "-c", f"setsid sleep {marker} & echo started")
    assert code == 0, err
    assert cluster.task(task_id)["state"] == "completed"
    # the runner ends what is left before it reports the end: nothing to wait for
    assert _processes_with(marker) == []


def test_a_kill_reaches_a_process_that_left_the_tasks_group(cluster):
    marker = _marker()
    task_id = cluster.cli_ok("--target", "node1", "--container", "NULL", "--",
                             "sh", "-c", f"setsid sleep {marker} & sleep {marker}").strip()
    wait_until(lambda: len(_processes_with(marker)) == 2, 30, "both sleeps running")
    cluster.cli_ok("--kill", task_id)
    cluster.wait_state(task_id, "killed")
    assert _processes_with(marker) == []


@pytest.mark.parametrize("limits", [[], ["--cores", "1"]], ids=["no limits", "cores 1"])
def test_a_script_without_a_shebang_runs_with_sh_with_or_without_limits(cluster, limits):
    script = cluster.root / f"no-shebang-{len(limits)}"
    script.write_text('echo "ran by sh with $1"\n')
    script.chmod(0o755)
    code, task_id, err = _submit_wait(cluster, *limits, "--", str(script), "arg")
    assert code == 0, err
    assert cluster.cli_ok("--stdout", task_id) == "ran by sh with arg\n"
