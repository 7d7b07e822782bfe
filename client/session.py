"""One client invocation, after the command line was found good: talk to the broker, print, exit.

Kept apart from :mod:`client.cli` so that the heavy imports (aio-pika, pydantic)
happen only here, after ``--help`` and usage errors have had their fast path.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from client.api import BadRequest, Client, HostUnavailable, TaskSpec
from client.cli import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from client import render
from hakuriver.broker import BrokerUnreachable
from hakuriver.config import ConfigError, load_config
from hakuriver.messages import StateEvent
from hakuriver.states import TaskState

PROGRESS_LINE_ABOVE = 10  # more tasks than this: a live progress line instead of a line per task


def _say(message: str) -> None:
    click.echo(message, err=True)


def run(request: dict) -> int:
    try:
        config = load_config(request["config_file"])
    except ConfigError as exc:
        _say(f"hakuriver.client: {exc}")
        return EXIT_USAGE
    try:
        return asyncio.run(_run(config, request))
    except BadRequest as exc:
        _say(f"hakuriver.client: {exc}")
        return EXIT_USAGE
    except (BrokerUnreachable, HostUnavailable) as exc:
        _say(f"hakuriver.client: {exc}")
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


async def _run(config, request: dict) -> int:
    async with Client(config) as client:
        mode = request["mode"]
        if mode == "submit":
            return await _submit(client, config, request)
        if mode == "kill":
            return await _kill(client, request)
        if mode in ("stdout", "stderr"):
            out = sys.stdout.buffer if mode == "stdout" else sys.stderr.buffer

            def write(data: bytes) -> None:
                out.write(data)
                out.flush()
            await client.read_output(request["task_id"], mode, write, follow=request["follow"])
            return 0
        return await _query(client, mode, request)


async def _submit(client: Client, config, request: dict) -> int:
    container = request["container"] if request["container"] is not None else config.docker.default_container
    spec = TaskSpec(command=request["command"][0], args=request["command"][1:], env=request["env"],
                    cores=request["cores"], memory=request["memory"],
                    container=None if container.upper() == "NULL" else container,
                    privileged=request["privileged"], mounts=request["mounts"])
    arg_lists = None
    if request["sweep"]:
        from hakurun import span

        if request["sweep_size"] > config.client.max_sweep:
            raise BadRequest(f"--sweep of {request['sweep_size']} tasks is over the limit of "
                             f"{config.client.max_sweep} ([client] max_sweep)")
        arg_lists = span.expand(spec.args)
    tasks = client.make_tasks(spec, request["targets"], arg_lists)
    await client.check_targets(tasks)
    waiter = await client.waiter([t.task_id for t in tasks], follow=request["follow"]) if request["wait"] else None
    progress = _Progress(len(tasks)) if waiter is not None else None
    if waiter is not None:
        waiter.on_state = progress.update

    def confirmed(task) -> None:
        sys.stdout.write(f"{task.task_id}\n")
        sys.stdout.flush()
    await client.submit(tasks, on_confirmed=confirmed)
    if waiter is None:
        return 0
    try:
        results = await waiter.wait(request["timeout"])
    except asyncio.TimeoutError:
        progress.finish()
        _say(f"hakuriver.client: gave up waiting after {request['timeout']:g} s; "
             f"{len(waiter.pending)} task(s) not finished")
        return EXIT_UNREACHABLE
    progress.finish()
    return exit_code_for(list(results.values()))


def exit_code_for(results: list[StateEvent]) -> int:
    """0 if all completed; the exit code of the one failed task if it has one; else 1."""
    failures = [r for r in results if r.state != TaskState.COMPLETED]
    if not failures:
        return 0
    if len(failures) == 1 and failures[0].state == TaskState.FAILED and failures[0].exit_code:
        return failures[0].exit_code & 0xFF or EXIT_FAILED
    return EXIT_FAILED


class _Progress:
    """What a person sees on stderr while --wait waits: a line per task for a few, a live line for many."""

    def __init__(self, total: int):
        self.total = total
        self.counts = {"done": 0, "failed": 0, "running": 0}
        self.live = total > PROGRESS_LINE_ABOVE
        self.tty = sys.stderr.isatty()

    def update(self, event: StateEvent) -> None:
        if event.state == TaskState.RUNNING:
            self.counts["running"] += 1
        elif event.state.terminal:
            self.counts["running"] = max(0, self.counts["running"] - 1)
            self.counts["done" if event.state == TaskState.COMPLETED else "failed"] += 1
            if not self.live:
                _say(render.outcome_line(event))
            elif self.counts["failed"] and event.state != TaskState.COMPLETED and not self.tty:
                _say(render.outcome_line(event))
        if self.live and self.tty:
            sys.stderr.write(f"\r{self._line()}")
            sys.stderr.flush()

    def _line(self) -> str:
        c = self.counts
        return f"{c['done'] + c['failed']}/{self.total} done: {c['done']} completed, {c['failed']} failed, " \
               f"{c['running']} running"

    def finish(self) -> None:
        if self.live:
            sys.stderr.write(("\r" if self.tty else "") + self._line() + "\n")
            sys.stderr.flush()


async def _kill(client: Client, request: dict) -> int:
    task_id = request["task_id"]
    waiter = await client.waiter([task_id]) if request["wait"] else None
    task = await client.kill(task_id)
    if task is not None and TaskState(task["state"]).terminal:
        _say(f"task {task_id} already ended: {task['state']}")
        return 0
    _say(f"kill sent for task {task_id}")
    if waiter is not None:
        results = await waiter.wait()
        _say(render.outcome_line(results[task_id]))
    return 0


async def _query(client: Client, mode: str, request: dict) -> int:
    as_json = request["json"]
    if mode == "status":
        result = await client.query("status", {"task_ids": request["task_ids"]})
        found = {t["task_id"]: t for t in result["tasks"]}
        missing = [i for i in request["task_ids"] if i not in found]
        if missing:
            raise BadRequest(f"unknown task {missing[0]}")
        tasks = [found[i] for i in request["task_ids"]]
        _emit(as_json, tasks[0] if len(tasks) == 1 else {"tasks": tasks}, lambda: render.status(tasks))
    elif mode == "list_tasks":
        params = {k: request[k] for k in ("state", "node", "batch", "limit")}
        result = await client.query("list_tasks", params)
        _emit(as_json, {"tasks": result["tasks"]}, lambda: render.task_table(result["tasks"]))
    elif mode == "list_nodes":
        result = await client.query("list_nodes", {})
        _emit(as_json, {"nodes": result["nodes"]}, lambda: render.node_table(result["nodes"]))
    elif mode == "health":
        result = await client.query("health", {"node": request["node"]})
        if request["node"] and not result["nodes"]:
            raise BadRequest(f"unknown node {request['node']!r}")
        _emit(as_json, result, lambda: render.health(result))
        if any(not n["online"] for n in result["nodes"]):
            return EXIT_FAILED
    return 0


def _emit(as_json: bool, data: Any, table) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if as_json else table())
