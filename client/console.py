"""What a client invocation says, and where: the answer on stdout, lines for people on stderr.

Why it exists: both command-line paths (the aio-pika session of :mod:`client.session` and the
light one of :mod:`client.quick`) print the same things the same way; this is that one way.
Readers that go away are normal: a closed stdout (``| head``) ends the client quietly (exit
141, like SIGPIPE, through :class:`StdoutClosed`); a closed stderr only silences the lines for
people, and the client goes on to its real exit code. Events are anything with a StateEvent's
``task_id``, ``state``, ``exit_code``, ``node`` and ``message``: no message model is imported here.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Iterable

from client import render
from client.errors import NotYours
from client.exits import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PIPE_CLOSED, EXIT_UNREACHABLE,
                          EXIT_USAGE)
from hakuriver.states import TaskState

PROGRESS_LINE_ABOVE = 10  # more tasks than this: a live progress line instead of a line per task


class StdoutClosed(Exception):
    """Whoever read our stdout has gone (``| head``); nothing more to say to anyone."""


def _silence(fd: int) -> None:
    """Point ``fd`` at /dev/null, so later writes and the flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def write_stdout(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        _silence(sys.stdout.fileno())
        raise StdoutClosed from None


def write_stderr(data: bytes) -> None:
    try:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
    except BrokenPipeError:
        _silence(sys.stderr.fileno())  # nobody reads what we tell people: carry on without it


def say(message: str) -> None:
    write_stderr(f"{message}\n".encode())


def followed_output(stream: str, data: bytes) -> None:
    """--wait --follow: a live task's stdout on ours, its stderr on ours."""
    (write_stdout if stream == "stdout" else write_stderr)(data)


def emit(as_json: bool, data: Any, table: Callable[[], str]) -> None:
    """A query's answer: its data as JSON, or the table for people."""
    write_stdout((json.dumps(data, indent=2) + "\n" if as_json else table()).encode())


def reported(body: Callable[[], int], usage: tuple[type[BaseException], ...],
             unreachable: tuple[type[BaseException], ...]) -> int:
    """``body()``'s exit code, or the one its failure means, said in one line: ``usage`` errors
    are bad input (2), someone else's task a refusal (1), ``unreachable`` ones the broker or
    host (3). Both command-line paths end here, so a failure reads the same on either."""
    try:
        return body()
    except usage as exc:
        say(f"hakuriver.client: {exc}")
        return EXIT_USAGE
    except NotYours as exc:  # someone else's task: a refusal, not bad input
        say(str(exc))
        return EXIT_FAILED
    except unreachable as exc:
        say(f"hakuriver.client: {exc}")
        return EXIT_UNREACHABLE
    except StdoutClosed:
        return EXIT_PIPE_CLOSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def exit_code_for(results: Iterable[Any]) -> int:
    """0 if all completed; the exit code of the one failed task if it has one; else 1."""
    failures = [r for r in results if r.state != TaskState.COMPLETED]
    if not failures:
        return EXIT_OK
    if len(failures) == 1 and failures[0].state == TaskState.FAILED and failures[0].exit_code:
        return failures[0].exit_code & 0xFF or EXIT_FAILED
    return EXIT_FAILED


class Progress:
    """What a person sees on stderr while --wait waits: a line per task for a few, a live line for many."""

    def __init__(self, total: int):
        self.total = total
        self.counts = {"done": 0, "failed": 0}
        self._running: set[int] = set()  # a resumed task sends ``running`` again: counted once
        self.live = total > PROGRESS_LINE_ABOVE
        self.tty = sys.stderr.isatty()

    def update(self, event: Any) -> None:
        if event.state == TaskState.RUNNING:
            self._running.add(event.task_id)
        elif event.state.terminal:
            self._running.discard(event.task_id)
            self.counts["done" if event.state == TaskState.COMPLETED else "failed"] += 1
            if not self.live:
                say(render.outcome_line(event))
            elif self.counts["failed"] and event.state != TaskState.COMPLETED and not self.tty:
                say(render.outcome_line(event))
        if self.live and self.tty:
            write_stderr(f"\r{self._line()}".encode())

    def _line(self) -> str:
        c = {**self.counts, "running": len(self._running)}
        return f"{c['done'] + c['failed']}/{self.total} done: {c['done']} completed, {c['failed']} failed, " \
               f"{c['running']} running"

    def finish(self) -> None:
        if self.live:
            write_stderr((("\r" if self.tty else "") + self._line() + "\n").encode())
