"""The command line's light path: submit, --wait, --kill, --status, --list-tasks, --list-nodes.

Why it exists: these are what people and scripts run over and over, and each invocation used
to spend ~150 ms importing aio-pika, aiormq, asyncio and pydantic before its first byte to
the broker (issue 18). Here they talk through :mod:`client.light_broker` (on :mod:`client.wire`,
a blocking AMQP client on pamqp's framing), read :mod:`client.light_config` and send
:mod:`client.bodies` (the contract's JSON, byte for byte); what needs more of the API goes to
:mod:`client.session` (aio-pika).

It is the same client, not a lesser one: tasks and kills go out persistent, ``mandatory``,
with publisher confirms, and an id is printed only once the broker confirmed its task; an
unroutable one is refused in the aio-pika path's words; every message carries the AMQP
``user_id`` of the broker user; targets are checked against the runners' retained node info
and :mod:`client.checks` before anything is published. A broker that cannot be reached is
one line and exit 3; ``--wait`` outlives a broker restart (:mod:`client.light_broker`).
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Any, Callable

from client import render, wire
from client.bodies import encode_kill, encode_task
from client.checks import node_refusal, offline_note, pool_refusal
from client.console import Progress, emit, exit_code_for, reported, say, write_stdout
from client.errors import BadRequest, NotYours
from client.exits import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from client.light_broker import Broker, TimedOut, Unreachable
from client.light_config import ClientSettings, NotPlain, read_settings
from client.requests import (KillRequest, ListNodesRequest, ListTasksRequest, Request, StatusRequest,
                             SubmitRequest)
from hakuriver import identity, ids
from hakuriver.bounds import DEFAULT_RETRY_DELAY_S
from hakuriver.broker_address import split_urls
from hakuriver.mounts import parse_mount
from hakuriver.states import TaskState
from hakuriver.topology import ALL_NODES_KEY, POOL_KEY, parse_target, target_key

if TYPE_CHECKING:
    import ssl

POOL_CHECK_TIMEOUT = 2.0        # how long a pool submission asks the host for its nodes' sizes


class ConfigRefused(Exception):
    """The config file or environment cannot be used (hakuriver.config's own words); exit code 2."""


def handles(request: Request) -> bool:
    """Whether this path carries ``request`` out (the rest goes to :mod:`client.session`)."""
    if isinstance(request, SubmitRequest):
        # --after goes to the host, which holds the task: the aio-pika path checks the ids with it first
        return request.sweep_size is None and not request.follow and not request.after
    return isinstance(request, (KillRequest, StatusRequest, ListTasksRequest, ListNodesRequest))


def ssl_context_for(settings: ClientSettings) -> ssl.SSLContext | None:
    """The TLS context for amqps:// addresses (None for amqp://): ``hakuriver.tls.client_ssl_context``
    of ``[broker] ca_file/cert_file/key_file``, made by :func:`_settings`."""
    return settings.ssl_context


def run(request: Request) -> int:
    """Carry out ``request`` (one :func:`handles` accepts); the exit code."""
    try:
        settings = _settings(request.config_file)
    except ConfigRefused as exc:
        say(f"hakuriver.client: {exc}")
        return EXIT_USAGE
    handlers: dict[type, Callable[[Broker, Any], int]] = {
        SubmitRequest: lambda broker, r: _submit(broker, settings, r), KillRequest: _kill,
        StatusRequest: _status, ListTasksRequest: _list_tasks, ListNodesRequest: _list_nodes}
    broker = Broker(settings, ssl_context_for(settings))
    try:
        return reported(lambda: handlers[type(request)](broker, request), (BadRequest,), (Unreachable,))
    finally:
        broker.close()


def _settings(config_file: str | None) -> ClientSettings:
    """The client's settings; where the light reader is not sure, :func:`hakuriver.config.load_config`
    decides (its refusal, naming the key and the file, becomes :class:`ConfigRefused`)."""
    try:
        settings = read_settings(config_file)
        for url in split_urls(settings.broker_url):
            if wire.parse_url(url).tls:
                raise NotPlain("TLS: hakuriver.tls reads [broker] ca_file/cert_file/key_file")
        return settings
    except (NotPlain, ValueError):
        pass
    from hakuriver.config import ConfigError, load_config
    from hakuriver.tls import client_ssl_context

    try:
        config = load_config(config_file)
        context = client_ssl_context(config.broker)
    except ConfigError as exc:
        raise ConfigRefused(str(exc)) from None
    return ClientSettings(config.broker.url, config.broker.prefix, config.broker.queue_type,
                          config.docker.default_container, config.client.max_sweep, context)


# ---- the commands -----------------------------------------------------------------------


def task_fields(request: SubmitRequest, settings: ClientSettings, user: str) -> list[dict[str, Any]]:
    """One task per target (the pool if none), one batch id; every field of hakuriver.messages.Task."""
    container = request.container if request.container is not None else settings.default_container
    batch, host, now = ids.new_id(), socket.gethostname(), time.time()
    mounts = [parse_mount(m)._asdict() for m in request.mounts]
    tasks = []
    for text in request.targets or [POOL_KEY]:
        target = parse_target(text)
        gpus = None if target.gpus is None else list(target.gpus)
        tasks.append(dict(task_id=ids.new_id(), batch_id=batch, command=request.command[0],
                          args=list(request.command[1:]), env=dict(request.env), cores=float(request.cores),
                          memory=request.memory, target=target.node, numa=target.numa, gpus=gpus,
                          gpu_count=request.gpus if gpus is None else len(gpus),
                          container=None if container.upper() == "NULL" else container,
                          privileged=request.privileged, mounts=mounts, retries=request.retries,
                          retry_delay=(DEFAULT_RETRY_DELAY_S if request.retry_delay is None
                                       else float(request.retry_delay)),
                          attempt=1, after=[], user=user,
                          submit_host=host, submitted_at=now))
    return tasks


def check_targets(broker: Broker, tasks: list[dict[str, Any]]) -> list[str]:
    """Refuse what can never run (client.checks), before anything is published; notes for people."""
    notes = []
    cores = max(t["cores"] for t in tasks)
    memory = max(t["memory"] or 0 for t in tasks)
    for node in dict.fromkeys(t["target"] for t in tasks if t["target"] != POOL_KEY):
        mine = [t for t in tasks if t["target"] == node]
        view = broker.node_view(node)
        if view is None:
            raise BadRequest(f"unknown node {node!r}")
        info, connected = view
        refusal = node_refusal(node, info.get("numa") or [], info.get("cores") or 0, info.get("memory") or 0,
                               info.get("gpus") or [], {t["numa"] for t in mine if t["numa"] is not None},
                               cores, memory, sorted({g for t in mine for g in t["gpus"] or ()}),
                               max(t["gpu_count"] for t in mine))
        if refusal is not None:
            raise BadRequest(refusal)
        if not connected:
            notes.append(offline_note(node))
    pool = [t for t in tasks if t["target"] == POOL_KEY and (t["cores"] or t["memory"] or t["gpu_count"])]
    if pool:
        try:
            nodes = broker.query("list_nodes", {}, timeout=POOL_CHECK_TIMEOUT)["nodes"]
        except (Unreachable, BadRequest):
            return notes   # submitting needs the broker only: without the host's answer, no check
        refusal = pool_refusal(nodes, max(t["cores"] for t in pool), max(t["memory"] or 0 for t in pool),
                               max(t["gpu_count"] for t in pool))
        if refusal is not None:
            raise BadRequest(refusal)
    return notes


def _submit(broker: Broker, settings: ClientSettings, request: SubmitRequest) -> int:
    tasks = task_fields(request, settings, broker.user)
    bodies = [encode_task(task) for task in tasks]   # bad input refused before we connect
    broker.connect()
    notes = check_targets(broker, tasks)
    task_ids = [task["task_id"] for task in tasks]
    if request.wait:
        broker.subscribe(task_ids)
    keys = [target_key(task["target"], task["numa"]) for task in tasks]
    returned = broker.publish(f"{broker.prefix}.tasks", list(zip(keys, bodies)))
    for task_id, body in zip(task_ids, bodies):
        if body not in returned:
            write_stdout(f"{task_id}\n".encode())
    returned_keys = [key for key, body in zip(keys, bodies) if body in returned]
    if returned_keys and set(returned_keys) == {POOL_KEY}:
        raise BadRequest("no runner has joined the pool yet (--target any)")
    if returned_keys:
        raise BadRequest(f"unknown node {next(key for key in returned_keys if key != POOL_KEY)!r}")
    for note in notes:  # said once the tasks are safely queued: they wait, nothing was refused
        say(f"hakuriver.client: {note}")
    if not request.wait:
        return EXIT_OK
    progress = Progress(len(tasks))
    try:
        results = broker.wait(task_ids, request.timeout, progress.update)
    except TimedOut as exc:
        progress.finish()
        say(f"hakuriver.client: gave up waiting after {request.timeout:g} s; {exc.pending} task(s) not finished")
        return EXIT_UNREACHABLE
    progress.finish()
    return exit_code_for(results.values())


def _check_ours(broker: Broker, task_id: int, task: dict[str, Any], answer: dict[str, Any]) -> None:
    admins = [broker.user] if answer.get("admin") else []
    if (why := identity.refusal(broker.user, task_id, task.get("user"), admins)) is not None:
        raise NotYours(why)


def _kill(broker: Broker, request: KillRequest) -> int:
    """A kill to the task's node, or to every node while the host does not know the node (see
    client.api.Client.kill); with --wait, until the task has ended."""
    task_id = request.task_id
    broker.connect()
    if request.wait:
        broker.subscribe([task_id])
    try:
        answer = broker.query("status", {"task_ids": [task_id]}, timeout=3.0)
    except Unreachable:
        answer = {"tasks": []}
    task = answer["tasks"][0] if answer["tasks"] else None
    if task is not None:
        _check_ours(broker, task_id, task, answer)
        if TaskState(task["state"]).terminal:
            say(f"task {task_id} already ended: {task['state']}")
            return EXIT_OK
    node = task["node"] if task and task.get("node") else ALL_NODES_KEY
    body = encode_kill(task_id, broker.user)
    control = f"{broker.prefix}.control"
    if broker.publish(control, [(node, body)]) and node != ALL_NODES_KEY:
        broker.publish(control, [(ALL_NODES_KEY, body)], mandatory=False)
    if task is None:
        say(f"kill sent for task {task_id} to every runner (the host has no record of it yet)")
    else:
        say(f"kill sent for task {task_id}")
    if request.wait:
        try:
            results = broker.wait([task_id], request.timeout, lambda event: None)
        except TimedOut:
            say(f"hakuriver.client: gave up waiting after {request.timeout:g} s; task {task_id} has not ended")
            return EXIT_UNREACHABLE
        say(render.outcome_line(results[task_id]))
    return EXIT_OK


def _status(broker: Broker, request: StatusRequest) -> int:
    broker.connect()
    result = broker.query("status", {"task_ids": request.task_ids})
    found = {t["task_id"]: t for t in result["tasks"]}
    missing = [i for i in request.task_ids if i not in found]
    if missing:
        raise BadRequest(f"unknown task {missing[0]}")
    tasks = [found[i] for i in request.task_ids]
    emit(request.as_json, tasks[0] if len(tasks) == 1 else {"tasks": tasks}, lambda: render.status(tasks))
    return EXIT_OK


def _list_tasks(broker: Broker, request: ListTasksRequest) -> int:
    """Page by page (the host bounds each reply in bytes), as client.api.Client.list_tasks."""
    broker.connect()
    filters = {"state": request.state, "node": request.node, "batch": request.batch,
               "user": broker.user if request.mine else request.user}
    tasks: list[dict[str, Any]] = []
    before = request.before
    while len(tasks) < request.limit:
        page = broker.query("list_tasks", {**filters, "limit": request.limit - len(tasks), "before": before})
        tasks += page["tasks"]
        before = page.get("next_before")
        if before is None or not page["tasks"]:
            before = None
            break
    emit(request.as_json, {"tasks": tasks, "next_before": before}, lambda: render.task_table(tasks))
    if before is not None and not request.as_json:
        say(f"more: --before {before}")
    return EXIT_OK


def _list_nodes(broker: Broker, request: ListNodesRequest) -> int:
    broker.connect()
    result = broker.query("list_nodes", {})
    emit(request.as_json, {"nodes": result["nodes"]}, lambda: render.node_table(result["nodes"]))
    return EXIT_OK
