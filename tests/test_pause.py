"""Pause and resume through the real CLI, a real runner and real cgroups or Docker.

What "paused" must mean: every process of the task stops, also a child that left its
process group, so none of them gains CPU time (read from ``/proc/<pid>/stat``); the task
keeps its resources and its state says ``paused``; resumed, it runs on to its end; a
paused task is killed cleanly; and a pause that does not fit the task's state changes
nothing and exits 1.

The 2 s window below is a measurement, not a wait for something to happen: a frozen
task must not run for any of it.
"""

from __future__ import annotations

import time
import uuid

import psutil
import pytest

from harness.local_cluster import Cluster, wait_until
from hakuriver.host.ledger import _empty_row, apply_state_event
from hakuriver.messages import Kill, StateEvent
from hakuriver.states import TaskState

FROZEN_WINDOW_S = 2.0


@pytest.fixture(scope="module")
def cluster(module_cluster):
    return module_cluster


def _marker() -> str:
    return f"hk-busy-{uuid.uuid4().hex[:10]}"


def _processes_with(marker: str, name: str | None = None) -> list[int]:
    """Live processes with ``marker`` in their command line (and called ``name``, if given)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "name"]):
        if (any(marker in part for part in proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE
                and name in (None, proc.info["name"])):
            found.append(proc.pid)
    return sorted(found)


def _two_busy(pids: list[int]) -> list[int] | None:
    """The two loops once both have run (a fork not yet exec'd is not one of them yet)."""
    try:
        return pids if len(pids) == 2 and all(_cpu_ticks(pid) > 0 for pid in pids) else None
    except FileNotFoundError:
        return None


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid``, in clock ticks (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _busy_script(stop: str) -> str:
    """A busy loop with a busy child that has left the task's process group (setsid where there is one)."""
    loop = f"while [ ! -e {stop} ]; do :; done"
    return (f"if command -v setsid >/dev/null; then setsid sh -c '{loop}' \"$0\" & else sh -c '{loop}' \"$0\" & fi; "
            f"{loop}; wait")


def _pause_resume_and_finish(c: Cluster, task_id: str, marker: str, stop_file, how: str) -> None:
    # the shells only: a container's init (docker-init) has the marker in its command line too
    pids = wait_until(lambda: _two_busy(_processes_with(marker, "sh")), 60, "the busy loop and its busy child")
    result = c.cli("--pause", task_id)
    assert result.returncode == 0, result.stderr.decode()
    task = c.task(task_id)
    assert task["state"] == "paused" and how in task["message"], task
    before = {pid: _cpu_ticks(pid) for pid in pids}
    time.sleep(FROZEN_WINDOW_S)
    after = {pid: _cpu_ticks(pid) for pid in pids}
    assert after == before, "a paused task's processes gained CPU time"
    assert c.query("--list-tasks", "--state", "paused")["tasks"][0]["task_id"] == int(task_id)

    result = c.cli("--resume", task_id)
    assert result.returncode == 0, result.stderr.decode()
    assert c.task(task_id)["state"] == "running"
    wait_until(lambda: all(_cpu_ticks(pid) > after[pid] for pid in pids), 60, "both loops running again")
    stop_file.touch()
    task = c.wait_state(task_id, {"completed", "failed", "killed", "lost"}, timeout=60)
    assert task["state"] == "completed", task


def test_a_paused_host_task_stops_its_whole_tree_and_completes_once_resumed(cluster):
    marker, stop = _marker(), cluster.root / "shared" / f"stop-{uuid.uuid4().hex[:6]}"
    task_id = cluster.cli_ok("--target", "node1", "--container", "NULL", "--",
                             "sh", "-c", _busy_script(str(stop)), marker).strip()
    try:
        _pause_resume_and_finish(cluster, task_id, marker, stop, "cgroup freezer")
    finally:  # never leave busy loops behind a failed test (both are no-ops once it ended)
        stop.touch()
        cluster.cli("--kill", task_id)
    assert _processes_with(marker) == []


def test_a_paused_container_stops_its_whole_tree_and_completes_once_resumed(cluster):
    marker, name = _marker(), f"stop-{uuid.uuid4().hex[:6]}"
    task_id = cluster.cli_ok("--target", "node1", "--container", "busybox", "--",
                             "sh", "-c", _busy_script(f"/shared/{name}"), marker).strip()
    try:
        _pause_resume_and_finish(cluster, task_id, marker, cluster.root / "shared" / name, "docker pause")
    finally:
        cluster.cli("--kill", task_id)  # never leave busy loops behind a failed test (a no-op once ended)


@pytest.mark.parametrize("container", ["NULL", "busybox"])
def test_a_paused_task_is_killed_cleanly(cluster, container):
    marker = f"300.{uuid.uuid4().int % 10**6:06d}"  # sleep's own argument: what names its processes
    task_id = cluster.cli_ok("--target", "node1", "--container", container, "--",
                             "sh", "-c", f"sleep {marker} & sleep {marker}; wait").strip()
    wait_until(lambda: len(_processes_with(marker)) >= 2, 60, "both sleeps running")
    cluster.cli_ok("--pause", task_id)
    result = cluster.cli("--kill", task_id, "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stderr.decode()
    assert cluster.task(task_id)["state"] == "killed"
    assert _processes_with(marker) == []


def test_pausing_a_task_that_does_not_run_exits_1_and_changes_nothing(cluster):
    task_id = cluster.cli_ok("--wait", "--target", "node1", "--container", "NULL", "--", "true").strip()
    before = cluster.task(task_id)
    result = cluster.cli("--pause", task_id)
    assert result.returncode == 1
    assert f"task {task_id} is completed: only a running task can be paused" in result.stderr.decode()
    result = cluster.cli("--resume", task_id)
    assert result.returncode == 1 and "only a paused task can be resumed" in result.stderr.decode()
    assert cluster.task(task_id) == before


def test_resuming_a_running_task_exits_1_and_an_unknown_task_exits_2(cluster):
    task_id = cluster.cli_ok("--target", "node1", "--container", "NULL", "--", "sleep", "300").strip()
    try:
        cluster.wait_state(task_id, "running")
        result = cluster.cli("--resume", task_id)
        assert result.returncode == 1 and f"task {task_id} is running" in result.stderr.decode()
        assert cluster.task(task_id)["state"] == "running"
    finally:
        cluster.cli_ok("--kill", task_id)
    result = cluster.cli("--pause", "999999999")
    assert result.returncode == 2 and "unknown task 999999999" in result.stderr.decode()


def test_the_runner_refuses_a_pause_of_a_task_that_is_not_running(cluster):
    """A pause sent straight to the runner (no client check) for a finished task changes nothing."""
    import asyncio

    from hakuriver import broker, identity
    from hakuriver.topology import Topology

    task_id = int(cluster.cli_ok("--wait", "--target", "node1", "--container", "NULL", "--", "true"))
    before = cluster.task(task_id)

    async def send() -> None:
        connection = await broker.connect(cluster.broker_url, "test")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchanges = await broker.declare_exchanges(channel, Topology(cluster.prefix))
            # as the cluster's broker user (an admin there): the runner believes only authenticated controls
            pause = Kill(task_id=task_id, action="pause").to_bytes()
            await exchanges.control.publish(broker.persistent(pause, user_id=identity.broker_user(cluster.broker_url)),
                                            routing_key="node1")
    asyncio.run(send())
    # a task submitted after the pause runs: the runner has handled the control message by then
    cluster.cli_ok("--wait", "--target", "node1", "--container", "NULL", "--", "true")
    wait_until(lambda: "pause refused" in (cluster.root / "node1.log").read_text(), 30, "the runner's refusal")
    assert cluster.task(task_id) == before


def test_a_runner_restarted_while_its_container_is_paused_adopts_it_paused(tmp_path):
    c = Cluster(tmp_path / "cluster", ["node1"])
    try:
        c.start()
        marker, name = _marker(), f"stop-{uuid.uuid4().hex[:6]}"
        task_id = c.cli_ok("--target", "node1", "--container", "busybox", "--",
                           "sh", "-c", f"while [ ! -e /shared/{name} ]; do sleep 0.05; done", marker).strip()
        c.wait_state(task_id, "running", timeout=60)
        c.cli_ok("--pause", task_id)
        c.kill("node1")
        c.start_runner("node1")
        wait_until(lambda: "adopted after restart (paused)" in (c.root / "node1.log").read_text(), 60,
                   "the new runner adopting the paused container")
        assert c.task(task_id)["state"] == "paused"
        c.cli_ok("--resume", task_id)
        (c.root / "shared" / name).touch()
        assert c.wait_state(task_id, {"completed", "failed", "lost"}, timeout=60)["state"] == "completed"
    finally:
        c.stop()


def test_a_kill_message_without_an_action_is_a_kill():
    assert Kill.model_validate_json('{"v": 1, "task_id": 5, "user": "u"}').action == "kill"


def test_a_resume_keeps_when_the_task_started():
    row = _empty_row(7)
    for seq, (state, at) in enumerate([(TaskState.PENDING, 1.0), (TaskState.QUEUED, 2.0), (TaskState.RUNNING, 3.0),
                                       (TaskState.PAUSED, 4.0), (TaskState.RUNNING, 5.0)]):
        assert apply_state_event(row, StateEvent(task_id=7, state=state, seq=seq, time=at))
    assert row["state"] == "running" and row["started_at"] == 3.0
    assert not TaskState.PAUSED.terminal

