"""Retries through the real CLI, a real host and real runners (issue 16).

What must hold: a task that fails and then succeeds ends ``completed`` with 2 attempts, both
outputs readable; one that always fails ends ``failed`` after N+1 attempts; ``killed`` is never
retried; a retry after its runner was SIGKILLed runs on the restarted runner. Every test counts
the runs the task itself made (a line per run in a shared file), so a run made twice, or one
forgotten, shows. The retry rule's pure parts are tested directly at the end.
"""

from __future__ import annotations

import signal
import uuid

import pytest

from harness.local_cluster import Cluster, wait_until
from hakuriver.host.ledger import _empty_row, apply_state_event
from hakuriver.messages import StateEvent, Task
from hakuriver.states import TaskState
from runner.retries import next_attempt, retry_message, seq_base

OFFLINE_AFTER = 2.0  # the harness: heartbeats every 0.5 s, offline after 4 missed


@pytest.fixture(scope="module")
def cluster(module_cluster):
    return module_cluster


def _runs(cluster: Cluster, name: str) -> list[str]:
    path = cluster.root / "shared" / name
    return path.read_text().splitlines() if path.exists() else []


def _script(body: str) -> list[str]:
    """A host task running ``body`` in sh; ``$S`` is the shared directory."""
    return ["--container", "NULL", "--", "sh", "-c", 'S="$HAKURIVER_SHARED_DIR"; ' + body]


def test_fail_then_succeed_completes_with_two_attempts_both_outputs_readable(cluster):
    name = f"runs-{uuid.uuid4().hex[:8]}"
    result = cluster.cli("--wait", "--target", "node1", "--retries", "3", "--retry-delay", "0.2", *_script(
        f'echo "attempt" >> "$S/{name}"; n=$(wc -l < "$S/{name}"); '
        'if [ "$n" -eq 1 ]; then echo "first run"; echo "oops" >&2; exit 3; fi; echo "second run"'))
    assert result.returncode == 0, result.stderr.decode()
    task_id = int(result.stdout)
    task = cluster.task(task_id)
    assert task["state"] == "completed" and task["attempt"] == 2 and task["retries"] == 3
    assert [(a["attempt"], a["state"], a["exit_code"]) for a in task["attempts"]] == [
        (1, "failed", 3), (2, "completed", 0)]
    assert _runs(cluster, name) == ["attempt", "attempt"]
    assert cluster.cli("--stdout", str(task_id)).stdout == b"second run\n"
    assert cluster.cli("--stdout", str(task_id), "--attempt", "1").stdout == b"first run\n"
    assert cluster.cli("--stderr", str(task_id), "--attempt", "1").stdout == b"oops\n"
    assert cluster.cli("--stdout", str(task_id), "--attempt", "2").stdout == b"second run\n"
    status = cluster.cli_ok("--status", str(task_id))
    assert "attempt 1:" in status and "failed (exit 3)" in status and "attempt 2:" in status
    missing = cluster.cli("--stdout", str(task_id), "--attempt", "3")
    assert missing.returncode == 2 and b"no attempt 3" in missing.stderr


def test_wait_follow_shows_every_attempts_output_as_it_comes(cluster):
    """Each attempt's output starts at offset 0 again: --follow shows the second after the first."""
    name = f"runs-{uuid.uuid4().hex[:8]}"
    result = cluster.cli("--wait", "--follow", "--target", "node1", "--retries", "1", "--retry-delay", "0", *_script(
        f'echo run >> "$S/{name}"; n=$(wc -l < "$S/{name}"); echo "attempt $n says hello"; [ "$n" -eq 2 ]'))
    assert result.returncode == 0, result.stderr.decode()
    task_id, *lines = result.stdout.decode().splitlines()
    assert lines == ["attempt 1 says hello", "attempt 2 says hello"]
    followed = cluster.cli("--stdout", task_id, "--follow")
    assert followed.stdout == b"attempt 2 says hello\n"


def test_always_failing_ends_failed_after_n_plus_one_attempts(cluster):
    name = f"runs-{uuid.uuid4().hex[:8]}"
    result = cluster.cli("--wait", "--target", "node1", "--retries", "2", "--retry-delay", "0",
                         *_script(f'echo run >> "$S/{name}"; echo "out $(wc -l < "$S/{name}")"; exit 5'))
    assert result.returncode == 5, result.stderr.decode()   # --wait exits with the final attempt's code
    task = cluster.task(int(result.stdout))
    assert task["state"] == "failed" and task["exit_code"] == 5 and task["attempt"] == 3
    assert [(a["attempt"], a["state"]) for a in task["attempts"]] == [(1, "failed"), (2, "failed"), (3, "failed")]
    assert _runs(cluster, name) == ["run"] * 3
    for attempt in (1, 2, 3):
        out = cluster.cli("--stdout", str(task["task_id"]), "--attempt", str(attempt)).stdout
        assert out == f"out {attempt}\n".encode()


def test_a_pool_task_is_retried_through_the_pool(cluster):
    """No --target: the next attempt goes back to the pool, and a node with room (here the only one,
    the same runner, which must take it as a new attempt, not as a duplicate) runs it."""
    name = f"runs-{uuid.uuid4().hex[:8]}"
    result = cluster.cli("--wait", "--retries", "1", "--retry-delay", "0", *_script(
        f'echo run >> "$S/{name}"; [ "$(wc -l < "$S/{name}")" -eq 2 ] && echo ok'))
    assert result.returncode == 0, result.stderr.decode()
    task = cluster.task(int(result.stdout))
    assert task["state"] == "completed" and task["target"] == "any" and task["attempt"] == 2
    assert _runs(cluster, name) == ["run", "run"]
    assert cluster.cli("--stdout", str(task["task_id"])).stdout == b"ok\n"


def test_killed_is_never_retried_nor_a_task_killed_between_attempts(cluster):
    name = f"runs-{uuid.uuid4().hex[:8]}"
    task_id = cluster.cli_ok("--target", "node1", "--retries", "3", *_script(
        f'echo run >> "$S/{name}"; sleep 60')).strip()
    cluster.wait_state(task_id, "running")
    cluster.cli_ok("--kill", task_id)
    task = cluster.wait_state(task_id, "killed")
    assert task["attempt"] == 1 and _runs(cluster, name) == ["run"]

    # between two attempts (a long retry delay): the kill ends it, the next attempt never runs
    other = f"runs-{uuid.uuid4().hex[:8]}"
    task_id = cluster.cli_ok("--target", "node1", "--retries", "3", "--retry-delay", "600",
                             *_script(f'echo run >> "$S/{other}"; exit 1')).strip()
    cluster.wait_state(task_id, "retrying")
    cluster.cli_ok("--kill", task_id)
    task = cluster.wait_state(task_id, "killed")
    assert task["attempts"][0]["state"] == "failed" and _runs(cluster, other) == ["run"]


def test_bad_retry_options_are_usage_errors(cluster):
    for args in (["--retries", "11"], ["--retries", "-1"], ["--retries", "x"], ["--retry-delay", "nan"],
                 ["--retry-delay", "-1"]):
        result = cluster.cli("--target", "node1", *args, "--", "true")
        assert result.returncode == 2 and result.stderr.decode().count("\n") == 1, (args, result.stderr)
        assert args[1] in result.stderr.decode()
    result = cluster.cli("--status", "1", "--attempt", "1")
    assert result.returncode == 2 and b"--attempt" in result.stderr


def test_retry_after_its_runner_was_sigkilled_runs_on_the_restarted_runner(tmp_path):
    """The runner dies while attempt 1 runs; the host calls it lost; the restarted runner (which
    cannot follow the process: it kills what is left) ends attempt 1 ``lost`` itself, decides the
    retry once, and runs attempt 2. The task's runs: exactly two, the first cut short."""
    with Cluster(tmp_path, ["node1"]) as c:
        c.start()
        name = f"runs-{uuid.uuid4().hex[:8]}"
        task_id = c.cli_ok("--target", "node1", "--retries", "2", "--retry-delay", "0", *_script(
            f'echo "start $PPID" >> "$S/{name}"; n=$(wc -l < "$S/{name}"); '
            'if [ "$n" -eq 1 ]; then sleep 120; fi; echo "done on $HAKURIVER_NODE"')).strip()
        c.wait_state(task_id, "running")
        wait_until(lambda: _runs(c, name), 30, "attempt 1 to start")
        c.kill("node1", signal.SIGKILL)
        c.wait_state(task_id, "lost", timeout=OFFLINE_AFTER + 10)   # the host's verdict, from silence
        c.start_runner("node1")
        task = c.wait_state(task_id, "completed", timeout=60)
        assert task["attempt"] == 2 and [a["state"] for a in task["attempts"]] == ["lost", "completed"]
        assert len(_runs(c, name)) == 2
        assert c.cli("--stdout", task_id).stdout == b"done on node1\n"

        # The runner dies between two attempts (its decision is in its store): the restarted
        # runner runs the next attempt once, after what is left of the delay; none forgotten.
        other = f"runs-{uuid.uuid4().hex[:8]}"
        task_id = c.cli_ok("--target", "node1", "--retries", "1", "--retry-delay", "3", *_script(
            f'echo run >> "$S/{other}"; [ "$(wc -l < "$S/{other}")" -eq 2 ]')).strip()
        c.wait_state(task_id, "retrying")
        c.kill("node1", signal.SIGKILL)
        c.start_runner("node1")
        task = c.wait_state(task_id, "completed", timeout=60)
        assert [a["state"] for a in task["attempts"]] == ["failed", "completed"]
        assert _runs(c, other) == ["run", "run"]


# ---- the rule, directly --------------------------------------------------------------

def _task(**fields) -> Task:
    return Task(task_id=7, batch_id=7, command="true", target="node1", **fields)


def test_only_failed_and_lost_are_retried_and_only_while_attempts_are_left():
    task = _task(retries=2)
    for state in (TaskState.KILLED, TaskState.KILLED_OOM, TaskState.REJECTED, TaskState.COMPLETED):
        assert next_attempt(task, state) is None
    assert next_attempt(task, TaskState.FAILED).attempt == 2
    assert next_attempt(task.model_copy(update={"attempt": 2}), TaskState.LOST).attempt == 3
    assert next_attempt(task.model_copy(update={"attempt": 3}), TaskState.FAILED) is None
    assert next_attempt(_task(), TaskState.FAILED) is None
    assert "attempt 1 of 3 failed (exit 4)" in retry_message(task, TaskState.FAILED, 4, "")


def test_every_event_of_a_later_attempt_wins_over_every_one_of_an_earlier_attempt():
    """Sequence numbers: the ledger applies attempt 2's events after attempt 1's late duplicates
    arrive, and never the reverse; the host's ``lost`` gives way to the runner's ``retrying``."""
    task = _task(retries=1)
    row = _empty_row(7)
    base2 = seq_base(2)
    events = [StateEvent(task_id=7, state=TaskState.QUEUED, seq=1, task=task, node="node1"),
              StateEvent(task_id=7, state=TaskState.RUNNING, seq=2, node="node1"),
              StateEvent(task_id=7, state=TaskState.RETRYING, seq=3, exit_code=1, ended=TaskState.FAILED,
                         node="node1"),
              StateEvent(task_id=7, state=TaskState.QUEUED, seq=base2 + 1, attempt=2, node="node1"),
              StateEvent(task_id=7, state=TaskState.RUNNING, seq=3, node="node1"),   # a late duplicate
              StateEvent(task_id=7, state=TaskState.RUNNING, seq=base2 + 2, attempt=2, node="node1"),
              StateEvent(task_id=7, state=TaskState.COMPLETED, seq=base2 + 3, attempt=2, exit_code=0, node="node1")]
    applied = [apply_state_event(row, ev) for ev in events]
    assert applied == [True, True, True, True, False, True, True]
    assert row["state"] == "completed" and row["attempt"] == 2
    assert [(r["attempt"], r["state"]) for r in row["attempts"]] == [(1, "failed"), (2, "completed")]


def test_attempt_and_retries_bounds_are_the_messages_own():
    with pytest.raises(ValueError):
        _task(retries=11)
    with pytest.raises(ValueError):
        _task(retries=1, attempt=3)
    assert _task(retries=10, attempt=11).attempt == 11


def test_a_passed_on_task_keeps_its_owner_only_from_a_service_account():
    """A retry handed back to the pool is published by the runner's (service) user with the owner
    in a header; the same header from anyone else is ignored: the owner is then the sender."""
    from hakuriver.identity import OWNER_HEADER, task_owner

    services = frozenset({"runner"})
    assert task_owner("runner", {OWNER_HEADER: "ana"}, services) == "ana"
    assert task_owner("bob", {OWNER_HEADER: "ana"}, services) == "bob"
    assert task_owner("runner", None, services) == "runner"
    assert task_owner(None, {OWNER_HEADER: "ana"}, services) == ""
