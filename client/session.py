"""One client invocation, after the command line was found good: talk to the broker, print, exit.

Kept apart from :mod:`client.cli` so that the heavy imports (aio-pika, pydantic)
happen only here, after ``--help`` and usage errors have had their fast path.

Where things go: the answer (task ids, a query's result, a task's output for ``--stdout``
and ``--stderr`` alike) on stdout; lines for people on stderr. Only ``--wait --follow``,
which shows live tasks, puts their stderr on our stderr. Readers that go away are normal:
a closed stdout (``| head``) ends the client quietly (exit 141, like SIGPIPE); a closed
stderr only silences the lines for people, and the client goes on to its real exit code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any, Callable

from client import render
from client.api import BadRequest, Client, HostUnavailable, NotYours, TaskSpec, WrongState
from client.exits import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PIPE_CLOSED, EXIT_UNREACHABLE,
                          EXIT_USAGE)
from client.requests import (HealthRequest, KillRequest, ListNodesRequest, ListTasksRequest, OutputRequest,
                             PauseRequest, Request, StatusRequest, SubmitRequest)
from hakuriver.broker import BrokerUnreachable
from hakuriver.config import Config, ConfigError, load_config
from hakuriver.messages import Mount, StateEvent
from hakuriver.states import TaskState

PAUSE_CONFIRM_S = 15.0  # how long --pause/--resume wait for the runner's event before saying so
PROGRESS_LINE_ABOVE = 10  # more tasks than this: a live progress line instead of a line per task


class StdoutClosed(Exception):
    """Whoever read our stdout has gone (``| head``); nothing more to say to anyone."""


def _silence(fd: int) -> None:
    """Point ``fd`` at /dev/null, so later writes and the flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        _silence(sys.stdout.fileno())
        raise StdoutClosed from None


def _write_stderr(data: bytes) -> None:
    try:
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
    except BrokenPipeError:
        _silence(sys.stderr.fileno())  # nobody reads what we tell people: carry on without it


def _say(message: str) -> None:
    _write_stderr(f"{message}\n".encode())


def _followed_output(stream: str, data: bytes) -> None:
    """--wait --follow: a live task's stdout on ours, its stderr on ours."""
    (_write_stdout if stream == "stdout" else _write_stderr)(data)


def run(request: Request) -> int:
    # The broker library logs connection failures itself; we say them once, in our own words.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).addHandler(logging.NullHandler())
    try:
        config = load_config(request.config_file)
    except ConfigError as exc:
        _say(f"hakuriver.client: {exc}")
        return EXIT_USAGE
    try:
        return asyncio.run(_run(config, request))
    except BadRequest as exc:
        _say(f"hakuriver.client: {exc}")
        return EXIT_USAGE
    except NotYours as exc:  # someone else's task: a refusal, not bad input
        _say(str(exc))
        return EXIT_FAILED
    except (BrokerUnreachable, HostUnavailable) as exc:
        _say(f"hakuriver.client: {exc}")
        return EXIT_UNREACHABLE
    except StdoutClosed:
        return EXIT_PIPE_CLOSED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def _run(config: Config, request: Request) -> int:
    handlers: dict[type, Callable[[Client, Any], Any]] = {
        SubmitRequest: lambda client, r: _submit(client, config, r),
        KillRequest: _kill, PauseRequest: _pause, StatusRequest: _status, OutputRequest: _output, ListTasksRequest: _list_tasks,
        ListNodesRequest: _list_nodes, HealthRequest: _health,
    }
    async with Client(config) as client:
        return await handlers[type(request)](client, request)


async def _submit(client: Client, config: Config, request: SubmitRequest) -> int:
    container = request.container if request.container is not None else config.docker.default_container
    spec = TaskSpec(command=request.command[0], args=request.command[1:], env=request.env,
                    cores=request.cores, memory=request.memory, gpus=request.gpus,
                    container=None if container.upper() == "NULL" else container,
                    privileged=request.privileged, mounts=[Mount.parse(m) for m in request.mounts])
    arg_lists = None
    if request.sweep_size is not None:
        from hakurun import span

        if request.sweep_size > config.client.max_sweep:
            raise BadRequest(f"--sweep of {request.sweep_size} tasks is over the limit of "
                             f"{config.client.max_sweep} ([client] max_sweep)")
        arg_lists = span.expand(spec.args)
    tasks = client.make_tasks(spec, request.targets, arg_lists)
    notes = await client.check_targets(tasks)
    waiter = None
    if request.wait:
        waiter = await client.waiter([t.task_id for t in tasks], follow=request.follow, on_output=_followed_output)
        progress = _Progress(len(tasks))
        waiter.on_state = progress.update
    await client.submit(tasks, on_confirmed=lambda task: _write_stdout(f"{task.task_id}\n".encode()))
    for note in notes:  # said once the tasks are safely queued: they wait, nothing was refused
        _say(f"hakuriver.client: {note}")
    if waiter is None:
        return EXIT_OK
    try:
        results = await waiter.wait(request.timeout)
    except asyncio.TimeoutError:
        progress.finish()
        _say(f"hakuriver.client: gave up waiting after {request.timeout:g} s; "
             f"{len(waiter.pending)} task(s) not finished")
        return EXIT_UNREACHABLE
    progress.finish()
    return exit_code_for(list(results.values()))


def exit_code_for(results: list[StateEvent]) -> int:
    """0 if all completed; the exit code of the one failed task if it has one; else 1."""
    failures = [r for r in results if r.state != TaskState.COMPLETED]
    if not failures:
        return EXIT_OK
    if len(failures) == 1 and failures[0].state == TaskState.FAILED and failures[0].exit_code:
        return failures[0].exit_code & 0xFF or EXIT_FAILED
    return EXIT_FAILED


class _Progress:
    """What a person sees on stderr while --wait waits: a line per task for a few, a live line for many."""

    def __init__(self, total: int):
        self.total = total
        self.counts = {"done": 0, "failed": 0}
        self._running: set[int] = set()  # a resumed task sends ``running`` again: counted once
        self.live = total > PROGRESS_LINE_ABOVE
        self.tty = sys.stderr.isatty()

    def update(self, event: StateEvent) -> None:
        if event.state == TaskState.RUNNING:
            self._running.add(event.task_id)
        elif event.state.terminal:
            self._running.discard(event.task_id)
            self.counts["done" if event.state == TaskState.COMPLETED else "failed"] += 1
            if not self.live:
                _say(render.outcome_line(event))
            elif self.counts["failed"] and event.state != TaskState.COMPLETED and not self.tty:
                _say(render.outcome_line(event))
        if self.live and self.tty:
            _write_stderr(f"\r{self._line()}".encode())

    def _line(self) -> str:
        c = {**self.counts, "running": len(self._running)}
        return f"{c['done'] + c['failed']}/{self.total} done: {c['done']} completed, {c['failed']} failed, " \
               f"{c['running']} running"

    def finish(self) -> None:
        if self.live:
            _write_stderr((("\r" if self.tty else "") + self._line() + "\n").encode())


async def _kill(client: Client, request: KillRequest) -> int:
    task_id = request.task_id
    waiter = await client.waiter([task_id]) if request.wait else None
    task = await client.kill(task_id)
    if task is not None and TaskState(task["state"]).terminal:
        _say(f"task {task_id} already ended: {task['state']}")
        return EXIT_OK
    if task is None:
        _say(f"kill sent for task {task_id} to every runner (the host has no record of it yet)")
    else:
        _say(f"kill sent for task {task_id}")
    if waiter is not None:
        try:
            results = await waiter.wait(request.timeout)
        except asyncio.TimeoutError:
            _say(f"hakuriver.client: gave up waiting after {request.timeout:g} s; task {task_id} has not ended")
            return EXIT_UNREACHABLE
        _say(render.outcome_line(results[task_id]))
    return EXIT_OK


async def _pause(client: Client, request: PauseRequest) -> int:
    """--pause/--resume: refused (exit 1, nothing sent) unless the task runs (is paused); then
    waits for the runner's event, which says how it was done (cgroup freezer, SIGSTOP, docker)."""
    task_id, wanted = request.task_id, TaskState.RUNNING if request.resume else TaskState.PAUSED
    confirmed: asyncio.Future[StateEvent] = asyncio.get_running_loop().create_future()

    def seen(event: StateEvent) -> None:
        if (event.state == wanted or event.state.terminal) and not confirmed.done():
            confirmed.set_result(event)

    waiter = await client.waiter([task_id])
    waiter.on_state = seen
    try:
        await client.pause(task_id, resume=request.resume)
    except WrongState as exc:
        _say(f"hakuriver.client: {exc}")
        return EXIT_FAILED
    try:
        event = await asyncio.wait_for(confirmed, PAUSE_CONFIRM_S)
    except asyncio.TimeoutError:
        _say(f"hakuriver.client: {'resume' if request.resume else 'pause'} sent for task {task_id}; "
             f"its runner did not confirm within {PAUSE_CONFIRM_S:g} s (see --status {task_id})")
        return EXIT_FAILED
    if event.state != wanted:
        _say(f"hakuriver.client: task {task_id} ended meanwhile: {render.outcome_line(event)}")
        return EXIT_FAILED
    _say(f"task {task_id} {event.message or event.state}")
    return EXIT_OK


async def _output(client: Client, request: OutputRequest) -> int:
    """--stdout ID and --stderr ID: the task's stream is the answer, so it goes to our stdout."""
    await client.read_output(request.task_id, request.stream, _write_stdout, follow=request.follow)
    return EXIT_OK


async def _status(client: Client, request: StatusRequest) -> int:
    result = await client.query("status", {"task_ids": request.task_ids})
    found = {t["task_id"]: t for t in result["tasks"]}
    missing = [i for i in request.task_ids if i not in found]
    if missing:
        raise BadRequest(f"unknown task {missing[0]}")
    tasks = [found[i] for i in request.task_ids]
    _emit(request.as_json, tasks[0] if len(tasks) == 1 else {"tasks": tasks}, lambda: render.status(tasks))
    return EXIT_OK


async def _list_tasks(client: Client, request: ListTasksRequest) -> int:
    tasks, next_before = await client.list_tasks(limit=request.limit, before=request.before, state=request.state,
                                                 node=request.node, batch=request.batch,
                                                 user=client.user if request.mine else request.user)
    _emit(request.as_json, {"tasks": tasks, "next_before": next_before}, lambda: render.task_table(tasks))
    if next_before is not None and not request.as_json:
        _say(f"more: --before {next_before}")
    return EXIT_OK


async def _list_nodes(client: Client, request: ListNodesRequest) -> int:
    result = await client.query("list_nodes", {})
    _emit(request.as_json, {"nodes": result["nodes"]}, lambda: render.node_table(result["nodes"]))
    return EXIT_OK


async def _health(client: Client, request: HealthRequest) -> int:
    result = await client.query("health", {"node": request.node})
    if request.node and not result["nodes"]:
        raise BadRequest(f"unknown node {request.node!r}")
    _emit(request.as_json, result, lambda: render.health(result))
    return EXIT_FAILED if any(not n["online"] for n in result["nodes"]) else EXIT_OK


def _emit(as_json: bool, data: Any, table: Callable[[], str]) -> None:
    _write_stdout((json.dumps(data, indent=2) + "\n" if as_json else table()).encode())
