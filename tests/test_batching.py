"""The host's batch policy: what silence closes a ledger batch (hakuriver.host.service.batch_gap),
and which messages end a task (hakuriver.host.ingest.ends_a_task).

A busy fabric's events come a few milliseconds apart; a batch closed by a 2 ms silence then
held one event and paid a whole transaction for it. While the last batch closed within the
window the gap is the window itself; after a quiet spell a lone event is stored after one gap,
and so is a batch holding the end of a task (its waiter may read the ledger at once).
"""

from __future__ import annotations

import pytest

from hakuriver.host.ingest import ends_a_task
from hakuriver.host.service import BATCH_GAP, BATCH_WINDOW, batch_gap
from hakuriver.messages import StateEvent, combine_state_events
from hakuriver.states import TaskState
from hakuriver.topology import Topology


def test_after_a_quiet_spell_a_short_gap_closes_the_batch():
    assert batch_gap(float("inf"), ends_a_task=False) == BATCH_GAP  # the first batch
    assert batch_gap(BATCH_WINDOW, ends_a_task=False) == BATCH_GAP
    assert batch_gap(60.0, ends_a_task=False) == BATCH_GAP


def test_while_busy_the_batch_collects_for_the_whole_window():
    assert batch_gap(0.0, ends_a_task=False) == BATCH_WINDOW
    assert batch_gap(BATCH_WINDOW / 2, ends_a_task=False) == BATCH_WINDOW
    assert BATCH_GAP < BATCH_WINDOW  # no event waits longer than the window either way


def test_a_busy_batch_holding_the_end_of_a_task_closes_after_a_short_gap():
    assert batch_gap(0.0, ends_a_task=True) == BATCH_GAP


@pytest.mark.parametrize("state", list(TaskState))
def test_state_events_end_a_task_when_their_state_is_terminal(state):
    event = StateEvent(task_id=7, node="node1", state=state, seq=3)
    assert ends_a_task(Topology.state_key(7), event.to_bytes()) == state.terminal


def test_a_combined_message_ends_a_task_when_any_of_its_events_does():
    def body(*states: TaskState) -> bytes:
        rows = [("ev", Topology.state_key(n), StateEvent(task_id=n, state=state, seq=2).to_bytes(), None)
                for n, state in enumerate(states)]
        (message,) = combine_state_events(rows, events_exchange="ev")
        return message[2]
    assert ends_a_task(Topology.state_key(0), body(TaskState.RUNNING, TaskState.COMPLETED, TaskState.QUEUED))
    assert not ends_a_task(Topology.state_key(0), body(TaskState.RUNNING, TaskState.PAUSED, TaskState.RETRYING))


@pytest.mark.parametrize("key, body", [
    (Topology.output_key(7, "stdout"), b'{"state": "completed"}'),   # output bytes, whatever they say
    (Topology.heartbeat_key("node1"), b'{"state": "completed"}'),
    (Topology.state_key(7), b"not json"),
    (Topology.state_key(7), b'["completed"]'),
    (Topology.state_key(7), b'[]'),
    (Topology.state_key(7), b'[{"state": "finished"}, 7, null, [{"state": "completed"}]]'),
    (Topology.state_key(7), b'{"state": "finished"}'),
    (Topology.state_key(7), b'{"state": ["completed"]}'),
    (Topology.state_key(7), b"\xff\xfe"),
])
def test_nothing_else_ends_a_task(key, body):
    assert ends_a_task(key, body) is False

