"""Pipelines (``--after``) through the real CLI, a real host and a real runner (issue 16).

What must hold: stages submitted at once run in order; a stage whose dependency did not
complete never runs and ends ``rejected`` naming it (and so do the stages after it); a held
task can be killed; the host keeps holding across its own SIGKILL and restart; an unknown id
is a usage error. The first stage of each test waits for a file the test creates, so "held
while the first stage runs" is a fact the test arranges, not a race it hopes to win.
"""

from __future__ import annotations

import signal
import uuid

import pytest

from harness.local_cluster import Cluster, wait_until
from hakuriver.host.pipelines import verdict


@pytest.fixture(scope="module")
def cluster(module_cluster):
    return module_cluster


class Stages:
    """Files in the shared directory: ``go`` lets the gated first stage end, ``log`` gets a line per stage run."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.name = uuid.uuid4().hex[:8]
        self.dir = cluster.root / "shared"

    def gated(self, line: str, exit_code: int = 0) -> list[str]:
        return self.stage(f'while [ ! -e "$S/go-{self.name}" ]; do sleep 0.05; done; '
                          f'echo {line} >> "$S/log-{self.name}"; exit {exit_code}')

    def step(self, line: str) -> list[str]:
        return self.stage(f'echo {line} >> "$S/log-{self.name}"; echo {line}')

    @staticmethod
    def stage(body: str) -> list[str]:
        return ["--container", "NULL", "--", "sh", "-c", 'S="$HAKURIVER_SHARED_DIR"; ' + body]

    def go(self) -> None:
        (self.dir / f"go-{self.name}").touch()

    def log(self) -> list[str]:
        path = self.dir / f"log-{self.name}"
        return path.read_text().split() if path.exists() else []


def _held(cluster: Cluster) -> set[int]:
    return {t["task_id"] for t in cluster.query("--list-tasks", "--state", "held")["tasks"]}


def test_three_stages_submitted_at_once_run_in_order(cluster):
    s = Stages(cluster)
    a = cluster.cli_ok("--target", "node1", *s.gated("a")).strip()
    b = cluster.cli_ok("--target", "node1", "--after", a, *s.step("b")).strip()
    c = cluster.cli_ok("--after", b, "--target", "node1", *s.step("c")).strip()
    assert {int(b), int(c)} <= _held(cluster)
    assert cluster.task(b)["state"] == "held" and cluster.task(c)["after"] == [int(b)]
    s.go()
    cluster.wait_state(c, "completed")
    assert s.log() == ["a", "b", "c"]
    assert cluster.cli("--stdout", c).stdout == b"c\n"


def test_the_seed_pipeline_waits_with_no_shell_kept_open(cluster):
    """``A=$(hakuriver.client ... -- cmd1)`` then ``hakuriver.client --wait --after $A ... -- cmd2``."""
    s = Stages(cluster)
    first = cluster.cli_ok("--target", "node1", *s.step("prepare")).strip()
    result = cluster.cli("--wait", "--after", first, "--target", "node1", *s.step("train"))
    assert result.returncode == 0, result.stderr.decode()
    assert s.log() == ["prepare", "train"]


def test_a_failed_first_stage_runs_nothing_after_it(cluster):
    s = Stages(cluster)
    a = cluster.cli_ok("--target", "node1", *s.gated("a", exit_code=4)).strip()
    b = cluster.cli_ok("--target", "node1", "--after", a, *s.step("b")).strip()
    c = cluster.cli_ok("--target", "node1", "--after", f"{a},{b}", *s.step("c")).strip()
    d = cluster.cli_ok("--target", "node1", "--after", b, *s.step("d")).strip()   # held behind a held task
    s.go()
    for held in (b, c, d):
        task = cluster.wait_state(held, "rejected")
        assert task["started_at"] is None
    assert "dependency" in cluster.task(b)["message"] and a in cluster.task(b)["message"]
    assert "failed" in cluster.task(b)["message"]
    assert b in cluster.task(d)["message"]
    assert s.log() == ["a"]


def test_a_held_task_is_killed_and_never_runs(cluster):
    s = Stages(cluster)
    a = cluster.cli_ok("--target", "node1", *s.gated("a")).strip()
    b = cluster.cli_ok("--target", "node1", "--after", a, *s.step("b")).strip()
    cluster.wait_state(b, "held")
    cluster.cli_ok("--kill", b)
    assert cluster.wait_state(b, "killed")["message"] == "killed while held"
    s.go()
    cluster.wait_state(a, "completed")
    assert cluster.task(b)["state"] == "killed" and s.log() == ["a"]


def test_unknown_after_id_is_a_usage_error(cluster):
    for after in ("123", "x", "1,,2"):
        result = cluster.cli("--target", "node1", "--after", after, "--", "true")
        assert result.returncode == 2 and result.stderr.decode().count("\n") == 1, result.stderr
        assert result.stdout == b""


def test_held_tasks_survive_a_host_restart(tmp_path):
    with Cluster(tmp_path, ["node1"]) as c:
        c.start()
        s = Stages(c)
        a = c.cli_ok("--target", "node1", *s.gated("a")).strip()
        b = c.cli_ok("--target", "node1", "--after", a, *s.step("b")).strip()
        c.wait_state(b, "held")
        c.kill("host", signal.SIGKILL)
        s.go()
        wait_until(lambda: s.log() == ["a"], 30, "stage a to run while the host is down")
        c.start_host()
        assert c.wait_state(b, "completed", timeout=60)["state"] == "completed"
        assert s.log() == ["a", "b"]


def test_verdict():
    assert verdict([1, 2], {1: "completed", 2: "completed"})[0] == "release"
    assert verdict([1, 2], {1: "completed", 2: "running"}) is None
    assert verdict([1, 2], {1: "completed"}) is None
    kind, why = verdict([1, 2], {1: "running", 2: "killed"})
    assert kind == "reject" and why == "dependency 2 ended killed: never run"
    assert verdict([1], {1: "held"}) is None and verdict([1], {1: "retrying"}) is None


def test_the_dashboard_task_page_shows_dependencies_and_attempts():
    from hakuriver.host.web import pages

    task = {"task_id": 9, "batch_id": 9, "state": "completed", "command": "true", "args": [], "user": "ana",
            "after": [7, 8], "exit_code": 0,
            "attempts": [{"attempt": 1, "state": "failed", "exit_code": 3, "node": "node1", "started_at": 1.0},
                         {"attempt": 2, "state": "completed", "exit_code": 0, "node": "node2", "started_at": 2.0}]}
    page = pages.task(task, {}, "ana", [], None)
    assert '<a href="/tasks/7">7</a>' in page and '<a href="/tasks/8">8</a>' in page
    assert "failed (exit 3) on node1" in page and "completed (exit 0) on node2" in page
