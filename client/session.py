"""The command line's aio-pika path: what :mod:`client.quick` leaves to the full Python API.

Why it exists: the light path (:mod:`client.quick`, a blocking AMQP client without aio-pika,
pydantic or asyncio) carries out the everyday commands: submit, --wait, --kill, --status,
--list-tasks, --list-nodes. What needs more of the API (a --sweep's thousands of tasks,
--follow's live output, --stdout/--stderr pages, --pause/--resume, --health) comes here,
to :class:`client.api.Client`; kept apart from :mod:`client.cli` so that its heavy imports
happen only for these. What is printed where: :mod:`client.console`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from client import render
from client.api import BadRequest, Client, HostUnavailable, TaskSpec, WrongState
from client.console import Progress, emit, exit_code_for, followed_output, reported, say, write_stdout
from client.exits import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from client.requests import HealthRequest, OutputRequest, PauseRequest, Request, SubmitRequest
from hakuriver.broker import BrokerUnreachable
from hakuriver.config import Config, ConfigError, load_config
from hakuriver.messages import Mount, StateEvent
from hakuriver.states import TaskState

PAUSE_CONFIRM_S = 15.0  # how long --pause/--resume wait for the runner's event before saying so


def run(request: Request) -> int:
    # The broker library logs connection failures itself; we say them once, in our own words.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).addHandler(logging.NullHandler())
    try:
        config = load_config(request.config_file)
    except ConfigError as exc:
        say(f"hakuriver.client: {exc}")
        return EXIT_USAGE
    # ConfigError: a [broker] TLS file that is no certificate, found when connecting
    return reported(lambda: asyncio.run(_run(config, request)), (BadRequest, ConfigError),
                    (BrokerUnreachable, HostUnavailable))


async def _run(config: Config, request: Request) -> int:
    handlers: dict[type, Callable[[Client, Any], Any]] = {
        SubmitRequest: lambda client, r: _submit(client, config, r),
        PauseRequest: _pause, OutputRequest: _output, HealthRequest: _health,
    }
    async with Client(config) as client:
        return await handlers[type(request)](client, request)


async def _submit(client: Client, config: Config, request: SubmitRequest) -> int:
    container = request.container if request.container is not None else config.docker.default_container
    spec = TaskSpec(command=request.command[0], args=request.command[1:], env=request.env,
                    cores=request.cores, memory=request.memory, gpus=request.gpus,
                    container=None if container.upper() == "NULL" else container,
                    privileged=request.privileged, mounts=[Mount.parse(m) for m in request.mounts],
                    retries=request.retries, retry_delay=request.retry_delay, after=request.after)
    arg_lists = None
    if request.sweep_size is not None:
        from hakurun import span

        if request.sweep_size > config.client.max_sweep:
            raise BadRequest(f"--sweep of {request.sweep_size} tasks is over the limit of "
                             f"{config.client.max_sweep} ([client] max_sweep)")
        arg_lists = span.expand(spec.args)
    tasks = client.make_tasks(spec, request.targets, arg_lists)
    await client.check_after(request.after)
    notes = await client.check_targets(tasks)
    waiter = None
    if request.wait:
        waiter = await client.waiter([t.task_id for t in tasks], follow=request.follow, on_output=followed_output)
        progress = Progress(len(tasks))
        waiter.on_state = progress.update
    await client.submit(tasks, on_confirmed=lambda task: write_stdout(f"{task.task_id}\n".encode()))
    for note in notes:  # said once the tasks are safely queued: they wait, nothing was refused
        say(f"hakuriver.client: {note}")
    if waiter is None:
        return EXIT_OK
    try:
        results = await waiter.wait(request.timeout)
    except asyncio.TimeoutError:
        progress.finish()
        say(f"hakuriver.client: gave up waiting after {request.timeout:g} s; "
             f"{len(waiter.pending)} task(s) not finished")
        return EXIT_UNREACHABLE
    progress.finish()
    return exit_code_for(list(results.values()))


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
        say(f"hakuriver.client: {exc}")
        return EXIT_FAILED
    try:
        event = await asyncio.wait_for(confirmed, PAUSE_CONFIRM_S)
    except asyncio.TimeoutError:
        say(f"hakuriver.client: {'resume' if request.resume else 'pause'} sent for task {task_id}; "
             f"its runner did not confirm within {PAUSE_CONFIRM_S:g} s (see --status {task_id})")
        return EXIT_FAILED
    if event.state != wanted:
        say(f"hakuriver.client: task {task_id} ended meanwhile: {render.outcome_line(event)}")
        return EXIT_FAILED
    say(f"task {task_id} {event.message or event.state}")
    return EXIT_OK


async def _output(client: Client, request: OutputRequest) -> int:
    """--stdout ID and --stderr ID: the task's stream is the answer, so it goes to our stdout."""
    await client.read_output(request.task_id, request.stream, write_stdout, follow=request.follow,
                             attempt=request.attempt)
    return EXIT_OK


async def _health(client: Client, request: HealthRequest) -> int:
    result = await client.query("health", {"node": request.node})
    if request.node and not result["nodes"]:
        raise BadRequest(f"unknown node {request.node!r}")
    emit(request.as_json, result, lambda: render.health(result))
    return EXIT_FAILED if any(not n["online"] for n in result["nodes"]) else EXIT_OK


