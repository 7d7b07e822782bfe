"""What arrives on the host's ledger queue, decoded and checked: a pure function tests call directly.

Why it exists: the ledger queue carries four kinds of message (a submitted task, a state
event, an output chunk, a heartbeat), told apart by exchange and routing key. Every check
that makes a message unusable (wrong key for its body, numbers past 64 bits, bad JSON)
lives here, so the service only stores what passed and dead-letters the rest with the reason.
"""

from __future__ import annotations

from typing import Any

from hakuriver.bounds import INT64
from hakuriver.messages import Heartbeat, OutputChunk, StateEvent, Task, one_line
from hakuriver.states import TaskState


class Malformed(ValueError):
    """A message the host cannot use; it goes to the dead-letter queue with this reason."""


# -- what arrives on the ledger queue ------------------------------------------------

def parse_event(routing_key: str, headers: dict[str, Any] | None, body: bytes, from_tasks: bool = False):
    """Decode one ledger-queue message into a StateEvent, (OutputChunk, bytes) or Heartbeat.

    ``from_tasks``: the message came from the tasks exchange (runners bind the ledger
    there too), so it is a task as submitted: its ``pending`` event.
    """
    try:
        if from_tasks:
            task = Task.from_bytes(body)
            event = StateEvent(task_id=task.task_id, state=TaskState.PENDING, seq=0, task=task,
                               time=task.submitted_at)
            _check_state_event(event, task.task_id)
            return event
        if routing_key.startswith("node.") and routing_key.endswith(".heartbeat"):
            beat = Heartbeat.from_bytes(body)
            if beat.node != routing_key[len("node."):-len(".heartbeat")]:
                raise Malformed(f"heartbeat of node {beat.node!r} on routing key {routing_key!r}")
            return beat
        parts = routing_key.split(".")
        if len(parts) != 3 or parts[0] != "task" or not parts[1].isdigit():
            raise Malformed(f"unknown routing key {routing_key!r}")
        key_task_id, kind = int(parts[1]), parts[2]
        if kind == "state":
            event = StateEvent.from_bytes(body)
            _check_state_event(event, key_task_id)
            return event
        if kind in ("stdout", "stderr"):
            chunk = OutputChunk.from_headers(headers or {}, body)
            if chunk.task_id != key_task_id or chunk.stream != kind:
                raise Malformed(f"output chunk of task {chunk.task_id} {chunk.stream} on routing key {routing_key!r}")
            if chunk.offset + len(body) >= 1 << 62:
                raise Malformed(f"output offset {chunk.offset} is out of range")
            return chunk, body
        raise Malformed(f"unknown routing key {routing_key!r}")
    except Malformed:
        raise
    except ValueError as exc:  # pydantic's ValidationError is one
        raise Malformed(one_line(exc)) from None


def _check_state_event(event: StateEvent, key_task_id: int) -> None:
    if event.task_id != key_task_id:
        raise Malformed(f"state event of task {event.task_id} on the routing key of task {key_task_id}")
    if event.task is not None and event.task.task_id != event.task_id:
        raise Malformed(f"state event of task {event.task_id} carries task {event.task.task_id}")
    # Python ints are unbounded; the database's are 64-bit.
    numbers = [event.task_id, event.seq, event.exit_code or 0]
    if event.task is not None:
        numbers += [event.task.batch_id, event.task.memory or 0, event.task.numa or 0]
    if any(not -INT64 <= number < INT64 for number in numbers):
        raise Malformed("a number in the state event is out of the 64-bit range")
