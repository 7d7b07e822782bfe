"""What arrives on the host's ledger queue, decoded and checked: a pure function tests call directly.

Why it exists: the ledger queue carries four kinds of message (a submitted task, a state
event or several in one, an output chunk, a heartbeat), told apart by exchange and routing
key. Every check that makes a message unusable (wrong key for its body, numbers past 64
bits, bad JSON) lives here, so the service only stores what passed and dead-letters the
rest with the reason.

What passed goes into an :class:`Ingested`: the messages sorted by kind into typed lists,
which is what :meth:`hakuriver.host.ledger.Ledger.ingest` takes, so nothing downstream
sorts a list of anything by type. The service parses a whole batch into one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hakuriver.bounds import INT64
from hakuriver.messages import Heartbeat, OutputChunk, StateEvent, Task, one_line
from hakuriver.states import TaskState
from hakuriver.topology import NodeKey, Topology

MAX_OUTPUT_END = 1 << 62  # an output file's end past this is no real task's output


class Malformed(ValueError):
    """A message the host cannot use; it goes to the dead-letter queue with this reason."""


@dataclass
class Ingested:
    """Usable ledger-queue messages, by kind."""

    events: list[StateEvent] = field(default_factory=list)
    chunks: list[tuple[OutputChunk, bytes]] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events) + len(self.chunks) + len(self.heartbeats)


# -- what arrives on the ledger queue ------------------------------------------------

def parse_event(routing_key: str, headers: dict[str, Any] | None, body: bytes, from_tasks: bool = False,
                into: Ingested | None = None, owner: str | None = None) -> Ingested:
    """Decode one ledger-queue message and add it to ``into`` (a new :class:`Ingested` by
    default), which is returned; :class:`Malformed` with the reason, and nothing added, if
    the message is unusable.

    ``from_tasks``: the message came from the tasks exchange (runners bind the ledger
    there too), so it is a task as submitted: its ``pending`` event, owned by ``owner`` (the
    message's broker-checked ``user_id``), whatever its body's ``user`` says. Without an
    owner it is recorded with none; the runner rejects it ("no authenticated user"). A task a
    service passes on has the owner it names (:func:`hakuriver.identity.task_owner`: the caller's job).
    """
    batch = Ingested() if into is None else into
    try:
        if from_tasks:
            task = Task.from_bytes(body).model_copy(update={"user": owner or ""})
            event = StateEvent(task_id=task.task_id, state=TaskState.PENDING, seq=0, task=task,
                               time=task.submitted_at)
            _check_state_event(event, task.task_id)
            batch.events.append(event)
            return batch
        key = Topology.parse_key(routing_key)
        if isinstance(key, NodeKey):
            beat = Heartbeat.from_bytes(body)
            if beat.node != key.node:
                raise Malformed(f"heartbeat of node {beat.node!r} on routing key {routing_key!r}")
            batch.heartbeats.append(beat)
        elif key.stream == "state":
            events = StateEvent.all_from_bytes(body)  # several: combined by an outbox, routed on each one's key
            if len(events) > 1 and key.task_id not in {event.task_id for event in events}:
                raise Malformed(f"no state event of task {key.task_id} among the {len(events)} on its routing key")
            for event in events:  # one alone must be its key's; in an array each is routed on its own key too
                _check_state_event(event, key.task_id if len(events) == 1 else event.task_id)
            batch.events.extend(events)
        else:
            chunk = OutputChunk.from_headers(headers or {}, body)
            if chunk.task_id != key.task_id or chunk.stream != key.stream:
                raise Malformed(f"output chunk of task {chunk.task_id} {chunk.stream} on routing key {routing_key!r}")
            if chunk.offset + len(body) >= MAX_OUTPUT_END:
                raise Malformed(f"output offset {chunk.offset} is out of range")
            batch.chunks.append((chunk, body))
        return batch
    except Malformed:
        raise
    except ValueError as exc:  # an unknown key; pydantic's ValidationError is one too
        raise Malformed(one_line(exc)) from None


def ends_a_task(routing_key: str, body: bytes) -> bool:
    """Whether this ledger-queue message is a state event that ends its task (a terminal
    state), or a combined one holding such an event, by a quick look at its JSON; False for
    anything else, also for what does not parse (:func:`parse_event` judges it). The host
    stores a batch holding one soon after it came (``Host._collect_batch``): whoever waited
    for that end may read the ledger next."""
    if not routing_key.endswith(".state"):
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return any(_terminal(event) for event in (data if isinstance(data, list) else [data]))


def _terminal(event: Any) -> bool:
    try:
        return TaskState(event.get("state")).terminal
    except (ValueError, AttributeError, TypeError):  # not an object, no such state
        return False


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
