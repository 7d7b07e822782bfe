"""Whether an attempt that ended runs again, and how its events stay in order: the retry rule.

Why it exists: a retry must be decided once. The runner that ends an attempt is the one
place that knows for sure how it ended (the host only guesses ``lost`` from silence), so it
decides, and writes the decision into its store in the same transaction as the attempt's
``retrying`` event (:meth:`runner.store.RunnerStore.retry`): a crash before that commit
leaves the attempt unfinished in the store (the restarted runner ends it again and decides
then); a crash after it finds the next attempt recorded. Nothing else ever retries a task.

Pure functions, so tests call them directly.
"""

from __future__ import annotations

from hakuriver.messages import Task
from hakuriver.states import TaskState

# Ends that another run may cure. ``killed`` was asked for, ``rejected`` can never run and
# ``killed_oom`` would only hit the same limit again: those are never retried.
RETRIED = frozenset({TaskState.FAILED, TaskState.LOST})

# Each attempt numbers its events from its own base: attempt K's ``queued`` is (K-1)·2³² + 1.
# Every event of a later attempt is above every event of an earlier one, whichever runner
# sends it, so the ledger's "higher seq wins" keeps working across attempts and nodes.
ATTEMPT_SEQ_SHIFT = 32


def seq_base(attempt: int) -> int:
    """The ``seq`` an attempt's store row starts from (its first event is one above)."""
    return (attempt - 1) << ATTEMPT_SEQ_SHIFT


def next_attempt(task: Task, state: TaskState) -> Task | None:
    """The task's next attempt if the attempt that just ended ``state`` is to run again, else None."""
    if state not in RETRIED or task.attempt > task.retries:
        return None
    return task.model_copy(update={"attempt": task.attempt + 1})


def retry_message(task: Task, state: TaskState, exit_code: int | None, message: str) -> str:
    """What the ``retrying`` event says: how the attempt ended and when the next one runs."""
    how = f"exit {exit_code}" if state is TaskState.FAILED and exit_code is not None else state.value
    why = f": {message}" if message else ""
    return (f"attempt {task.attempt} of {task.retries + 1} {state.value} ({how}){why}; "
            f"attempt {task.attempt + 1} in {task.retry_delay:g} s")
