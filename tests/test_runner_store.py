"""The runner's durable store (runner.store) on real SQLite, with no broker.

The rules under test: a task and its first event are one fact; a redelivered task is
recognised; every change of a task is one event with the next ``seq``; a restarted runner
finds what it had.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from hakuriver.messages import StateEvent, Task
from hakuriver.states import TaskState
from hakuriver.topology import Topology
from runner.store import RunnerStore

TOPO = Topology("hk-unit")


def make_task(task_id: int) -> Task:
    return Task(task_id=task_id, batch_id=1, command="echo", args=[str(task_id)], target="node1", submitted_at=1.0)


@pytest.fixture
def store(tmp_path):
    opened = RunnerStore(tmp_path / "state" / "store.db", TOPO, "node1")
    yield opened
    opened.close()


def queued_events(store: RunnerStore) -> list[tuple[str, str, StateEvent]]:
    """What the outbox holds to send: (exchange, routing key, event), in order."""
    rows = store.db.execute("SELECT exchange, routing_key, body FROM outbox ORDER BY id").fetchall()
    return [(exchange, key, StateEvent.from_bytes(body)) for exchange, key, body in rows]


def test_accept_records_the_task_with_its_queued_event(store):
    assert not store.has(7)
    row = store.accept(make_task(7))
    assert store.has(7)
    ((exchange, key, event),) = queued_events(store)
    assert row == 1 and exchange == TOPO.events and key == Topology.state_key(7)
    assert (event.task_id, event.node, event.state, event.seq, event.task) == (7, "node1", TaskState.QUEUED, 1,
                                                                               make_task(7))


def test_a_task_delivered_twice_is_recorded_once(store):
    store.accept(make_task(7))
    assert store.has(7)
    with pytest.raises(sqlite3.IntegrityError):
        store.accept(make_task(7))
    # Nothing half-done: still one task and one event.
    assert len(store.unfinished()) == 1 and len(queued_events(store)) == 1


def test_a_retry_handed_to_the_pool_comes_back_as_a_new_attempt_once(store):
    """A pool task's next attempt goes back to the pool through the outbox; if it comes back here,
    it replaces the old row (its events numbered from attempt 2's base), and only once."""
    task = make_task(9).model_copy(update={"target": "any", "retries": 1})
    store.accept(task)
    following = task.model_copy(update={"attempt": 2})
    store.retry(task, following, TaskState.FAILED, 1, "")
    assert store.waiting_retry(9) and [s.state for s in store.unfinished()] == [TaskState.RETRYING]
    assert store.requeue(following) is False   # the delay is over: to the pool, not queued here
    assert store.handed_on(9) and not store.holds(following) and store.unfinished() == []
    assert store.requeue(following) is False   # once
    store.accept(following)
    assert store.holds(following) and [s.task.attempt for s in store.unfinished()] == [2]
    with pytest.raises(sqlite3.IntegrityError):
        store.accept(following)
    rows = store.db.execute("SELECT exchange, routing_key, body FROM outbox ORDER BY id").fetchall()
    assert [(exchange, key) for exchange, key, _ in rows if exchange == TOPO.tasks] == [(TOPO.tasks, "any")]
    events = [StateEvent.from_bytes(body) for exchange, _, body in rows if exchange == TOPO.events]
    assert [(e.state, e.attempt) for e in events] == [(TaskState.QUEUED, 1), (TaskState.RETRYING, 1),
                                                      (TaskState.QUEUED, 2)]
    assert events[-1].seq == (1 << 32) + 1


def test_a_task_refused_on_arrival_is_recorded_finished(store):
    store.accept(make_task(8), TaskState.REJECTED, message="no such container")
    ((_, _, event),) = queued_events(store)
    assert (event.state, event.message, event.seq) == (TaskState.REJECTED, "no such container", 1)
    assert store.has(8) and store.unfinished() == []


def test_each_change_is_one_event_with_the_next_seq(store):
    store.accept(make_task(7))
    store.accept(make_task(9))
    store.transition(7, TaskState.RUNNING, handle={"pid": 42}, unenforced=["memory"])
    store.transition(7, TaskState.COMPLETED, exit_code=0)
    store.transition(9, TaskState.KILLED, message="killed before it started")
    events = [(key, event.state, event.seq) for _, key, event in queued_events(store)]
    assert events == [("task.7.state", TaskState.QUEUED, 1), ("task.9.state", TaskState.QUEUED, 1),
                      ("task.7.state", TaskState.RUNNING, 2), ("task.7.state", TaskState.COMPLETED, 3),
                      ("task.9.state", TaskState.KILLED, 2)]
    running = queued_events(store)[2][2]
    assert running.unenforced == ["memory"] and queued_events(store)[3][2].exit_code == 0
    assert store.unfinished() == []


def test_a_restarted_runner_finds_its_unfinished_tasks_in_arrival_order(tmp_path):
    path = tmp_path / "store.db"
    first = RunnerStore(path, TOPO, "node1")
    for task_id in (30, 10, 20, 40):  # arrival order is not id order
        first.accept(make_task(task_id))
    first.transition(10, TaskState.RUNNING, handle={"pid": 42})
    first.set_sent(10, "stdout", 65536)
    first.set_sent(10, "stderr", 3)
    first.set_outcome(10, {"state": "completed", "exit_code": 0, "message": ""})
    first.request_kill(20)
    first.transition(40, TaskState.FAILED, exit_code=1)
    first.close()

    again = RunnerStore(path, TOPO, "node1")
    try:
        found = again.unfinished()
        assert [stored.task.task_id for stored in found] == [30, 10, 20]
        running = found[1]
        assert (running.state, running.seq, running.handle) == (TaskState.RUNNING, 2, {"pid": 42})
        assert (running.stdout_sent, running.stderr_sent) == (65536, 3)
        assert running.outcome == {"state": "completed", "exit_code": 0, "message": ""}
        assert [stored.kill_requested for stored in found] == [False, False, True]
        assert found[0].task == make_task(30) and found[0].handle is None and found[0].outcome is None
        # New arrivals queue behind what was there.
        again.accept(make_task(5))
        assert [stored.task.task_id for stored in again.unfinished()] == [30, 10, 20, 5]
    finally:
        again.close()


def test_a_tombstone_is_taken_once(store):
    assert not store.take_tombstone(7)
    store.add_tombstone(7, "alice")
    store.add_tombstone(7, "alice")  # a second kill of the same unknown task
    store.add_tombstone(7, "bob")    # and one by someone else: the runner judges each when the task comes
    assert sorted(store.take_tombstone(7)) == ["alice", "bob"]
    assert not store.take_tombstone(7)


def test_prune_forgets_only_finished_tasks_and_old_tombstones(store):
    store.accept(make_task(1))
    store.accept(make_task(2))
    store.transition(2, TaskState.COMPLETED, exit_code=0)
    store.add_tombstone(3, "alice")
    store.db.execute("UPDATE tasks SET finished_at = finished_at - 100")
    store.db.execute("UPDATE early_kills SET at = at - 100")
    store.db.commit()
    store.prune(older_than=50)
    assert store.has(1) and not store.has(2) and not store.take_tombstone(3)


def test_the_handle_is_kept_as_given(store):
    handle = {"container": "abc", "nested": {"ports": [1, 2]}}
    store.accept(make_task(7))
    store.transition(7, TaskState.RUNNING, handle=handle)
    (stored,) = store.unfinished()
    assert stored.handle == handle
    assert json.loads(store.db.execute("SELECT handle FROM tasks").fetchone()[0]) == handle
