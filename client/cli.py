"""``hakuriver.client``: submit, wait, query, kill, pause, resume.

Only click is imported at start-up; the rest loads once the command line is known to be
good, so ``--help`` and usage errors are fast (tests/test_cli_imports.py). The everyday
commands then run on the light path (:mod:`client.quick`: no aio-pika, pydantic or
asyncio); the others on the aio-pika API (:mod:`client.session`).
Everything for a person goes to stderr; stdout carries only task ids (on submit) or
the query's answer (a task's output included), so ``TASK=$(hakuriver.client --wait ...)``
holds the id. The command line becomes one typed request (:mod:`client.requests`) that
:mod:`client.quick` or :mod:`client.session` carries out; exit codes are in :mod:`client.exits`.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, NoReturn

import click

from client.exits import EXIT_USAGE
from hakuriver import bounds
from hakuriver.cli_options import config_option

if TYPE_CHECKING:  # building dataclasses costs start-up time; --help needs none of them
    from client.requests import Request, SubmitRequest

ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# query option -> the name click gives its value
QUERY_OPTIONS = {"status": "status_ids", "stdout": "stdout_id", "stderr": "stderr_id", "kill": "kill_id",
                 "pause": "pause_id", "resume": "resume_id",
                 "list_tasks": "list_tasks", "list_nodes": "list_nodes", "health": "health"}


class UsageError(Exception):
    """Bad input found before anything is sent; exit code 2."""


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"hakuriver.client: {message}", err=True)
    sys.exit(code)


def _task_id(text: str, option: str) -> int:
    if not text.isdigit() or int(text) >= bounds.INT64:
        raise UsageError(f"invalid task id {text!r} for {option}")
    return int(text)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False,
                                 "max_content_width": 100})
@click.option("--target", "targets", multiple=True, metavar="NODE[:NUMA][::GPUS]",
              help="Node to run on (repeatable: one task per target); 'any' or none: the shared pool. "
                   "NODE::0,1 takes exactly those GPUs.")
@click.option("--gpus", metavar="N", help="Any N free GPUs (on the target node, or on a pool node that has them).")
@click.option("--container", metavar="NAME", help="Container environment; NULL runs on the host. Default from config.")
@click.option("--cores", metavar="N", help="Cores for the task (0 = no CPU limit).")
@click.option("--memory", metavar="SIZE", help="Memory limit: 512M, 8G, 1.5G, 8GiB, 2T (binary units).")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE", help="Environment variable (repeatable).")
@click.option("--mount", "mounts", multiple=True, metavar="HOST:CONTAINER[:ro]", help="Extra mount (repeatable).")
@click.option("--privileged", is_flag=True, help="Ask for a privileged container.")
@click.option("--retries", metavar="N", help=f"Run a task that ends failed or lost again, up to N more times "
                                             f"(0 to {bounds.MAX_RETRIES}; default 0).")
@click.option("--retry-delay", metavar="SECONDS",
              help=f"With --retries: wait this long before each new attempt (default {bounds.DEFAULT_RETRY_DELAY_S:g}).")
@click.option("--after", "afters", multiple=True, metavar="ID[,ID...]",
              help="Hold the task until every listed task completed (repeatable); if one ends otherwise, it never runs.")
@click.option("--wait", is_flag=True, help="Wait for every task; exit with the outcome.")
@click.option("--follow", is_flag=True, help="With --wait or --stdout/--stderr: stream output live.")
@click.option("--sweep", is_flag=True, help="Expand span:{a..b} / span:[x,y] in the command: one task per combination.")
@click.option("--timeout", type=float, metavar="SECONDS", help="With --wait: give up after this long (exit 3).")
@click.option("--status", "status_ids", multiple=True, metavar="ID", help="Show a task's status (repeatable).")
@click.option("--stdout", "stdout_id", metavar="ID", help="Print a task's stdout (on our stdout).")
@click.option("--stderr", "stderr_id", metavar="ID", help="Print a task's stderr (on our stdout too).")
@click.option("--attempt", metavar="K", help="With --stdout/--stderr: the output of attempt K of a retried task "
                                            "(default: the last).")
@click.option("--kill", "kill_id", metavar="ID", help="Kill a task (running, waiting, or not recorded yet).")
@click.option("--pause", "pause_id", metavar="ID", help="Pause a running task's whole process tree (keeps its resources).")
@click.option("--resume", "resume_id", metavar="ID", help="Resume a paused task.")
@click.option("--list-tasks", is_flag=True, help="List tasks, newest first.")
@click.option("--list-nodes", is_flag=True, help="List nodes with resources and health.")
@click.option("--health", is_flag=False, flag_value="*", default=None, metavar="[NODE]",
              help="Health of all nodes (or one) and of the host.")
@click.option("--state", metavar="STATE", help="--list-tasks: only this state.")
@click.option("--node", metavar="NODE", help="--list-tasks: only this node.")
@click.option("--batch", metavar="BATCH", help="--list-tasks: only this batch.")
@click.option("--user", metavar="NAME", help="--list-tasks: only tasks of this user (its broker user name).")
@click.option("--mine", is_flag=True, help="--list-tasks: only my tasks (those of my broker user).")
@click.option("--limit", metavar="N", help=f"--list-tasks: at most N (default 50, at most {bounds.MAX_LIST_LIMIT}).")
@click.option("--before", metavar="ID", help="--list-tasks: only tasks older than ID (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def main(**options) -> None:
    """Run COMMAND on a HakuRiver node, or query and control tasks.

    \b
      hakuriver.client --target node1 --cores 4 --memory 8G -- python train.py
      TASK=$(hakuriver.client --wait --target node1 -- make test)
      hakuriver.client --stdout $TASK
    """
    try:
        request = _validate(options)
    except UsageError as exc:
        fail(str(exc), EXIT_USAGE)
    from client import quick

    if quick.handles(request):
        sys.exit(quick.run(request))
    from client.session import run

    sys.exit(run(request))


def _validate(o: dict) -> Request:
    """Check everything that can be checked without the broker; returns the request."""
    queries = [name for name, key in QUERY_OPTIONS.items() if o[key]]
    command = list(o["command"])
    submit_only = [flag for flag in ("targets", "gpus", "container", "cores", "memory", "envs", "mounts", "privileged",
                                     "sweep", "retries", "retry_delay", "afters") if o[flag]]
    list_filters = [flag for flag in ("state", "node", "batch", "user", "mine", "limit", "before") if o[flag]]
    if len(queries) > 1:
        raise UsageError("conflicting options: " + " and ".join("--" + q.replace("_", "-") for q in queries))
    if queries and command:
        raise UsageError(f"--{queries[0].replace('_', '-')} takes no command (got {command[0]!r})")
    if queries and submit_only:
        flag = {"targets": "target", "envs": "env", "mounts": "mount", "afters": "after",
                "retry_delay": "retry-delay"}.get(submit_only[0], submit_only[0])
        raise UsageError(f"--{flag} does not go with --{queries[0].replace('_', '-')}")
    if o["attempt"] is not None and queries not in (["stdout"], ["stderr"]):
        raise UsageError("--attempt goes with --stdout or --stderr only")
    if list_filters and queries != ["list_tasks"]:
        raise UsageError(f"--{list_filters[0]} goes with --list-tasks only")
    if o["timeout"] is not None and (o["timeout"] <= 0 or not o["wait"]):
        raise UsageError(f"--timeout {o['timeout']:g} needs --wait and a value above 0")
    if o["follow"] and not (o["wait"] or o["stdout_id"] or o["stderr_id"]):
        raise UsageError("--follow goes with --wait or --stdout/--stderr")
    if o["wait"] and queries and queries != ["kill"]:
        raise UsageError(f"--wait does not go with --{queries[0].replace('_', '-')}")
    common = {"config_file": o["config_file"], "as_json": o["as_json"]}
    if queries:
        return _validate_query(queries[0], o, common)
    if not command:
        raise UsageError("no command given (usage: hakuriver.client [options] -- COMMAND [ARGS...])")
    if o["as_json"]:
        raise UsageError("--json is for queries; a submission prints task ids")
    return _validate_submit(command, o, common)


def _validate_query(query: str, o: dict, common: dict) -> Request:
    from client.requests import (HealthRequest, KillRequest, ListNodesRequest, ListTasksRequest, OutputRequest,
                                 PauseRequest, StatusRequest)

    if query == "status":
        return StatusRequest(task_ids=[_task_id(t, "--status") for t in o["status_ids"]], **common)
    if query in ("stdout", "stderr"):
        attempt = o["attempt"]
        if attempt is not None and (not (attempt.isdigit() and attempt.isascii())
                                    or not 1 <= int(attempt) <= bounds.MAX_RETRIES + 1):
            raise UsageError(f"invalid --attempt {attempt!r} (a whole number from 1 to {bounds.MAX_RETRIES + 1})")
        return OutputRequest(task_id=_task_id(o[f"{query}_id"], f"--{query}"), stream=query, follow=o["follow"],
                             attempt=int(attempt) if attempt is not None else None, **common)
    if query == "kill":
        return KillRequest(task_id=_task_id(o["kill_id"], "--kill"), wait=o["wait"], timeout=o["timeout"], **common)
    if query in ("pause", "resume"):
        return PauseRequest(task_id=_task_id(o[f"{query}_id"], f"--{query}"), resume=query == "resume", **common)
    if query == "health":
        return HealthRequest(node=None if o["health"] == "*" else o["health"], **common)
    if query == "list_nodes":
        return ListNodesRequest(**common)
    from hakuriver.states import TaskState

    states = [s.value for s in TaskState]
    if o["state"] and o["state"] not in states:
        raise UsageError(f"invalid --state {o['state']!r} (one of {', '.join(states)})")
    if o["batch"] and not o["batch"].isdigit():
        raise UsageError(f"invalid --batch {o['batch']!r}")
    limit = o["limit"]
    if limit and (not limit.isdigit() or not 1 <= int(limit) <= bounds.MAX_LIST_LIMIT):
        raise UsageError(f"invalid --limit {limit!r} (a whole number from 1 to {bounds.MAX_LIST_LIMIT}; "
                         "list further with --before ID, the last id listed)")
    if o["user"] and o["mine"]:
        raise UsageError("--user and --mine do not go together")
    return ListTasksRequest(state=o["state"], node=o["node"], batch=int(o["batch"]) if o["batch"] else None,
                            user=o["user"], mine=o["mine"],
                            limit=int(limit) if limit else 50,
                            before=_task_id(o["before"], "--before") if o["before"] else None, **common)


def _validate_submit(command: list[str], o: dict, common: dict) -> SubmitRequest:
    from client.requests import SubmitRequest
    from hakuriver.mounts import parse_mount
    from hakuriver.sizes import parse_size
    from hakuriver.topology import parse_target

    cores = 0.0
    if o["cores"] is not None:
        try:
            cores = float(o["cores"])
        except ValueError:
            raise UsageError(f"invalid --cores {o['cores']!r} (a number from 0 to {bounds.MAX_CORES})") from None
        if not 0 <= cores <= bounds.MAX_CORES:  # also refuses nan
            raise UsageError(f"invalid --cores {o['cores']!r} (a number from 0 to {bounds.MAX_CORES})")
    memory = None
    if o["memory"] is not None:
        try:
            memory = parse_size(o["memory"])
        except ValueError as exc:
            raise UsageError(f"invalid --memory: {exc}") from None
        if memory > bounds.MAX_MEMORY:
            raise UsageError(f"invalid --memory {o['memory']!r}: over the bound of {bounds.MAX_MEMORY} bytes")
    if o["container"] is not None and o["container"].upper() != "NULL":
        from hakuriver.images import check_environment_name  # pathlib and datetime: only when named

        try:
            check_environment_name(o["container"])
        except ValueError as exc:
            raise UsageError(f"--container: {exc}") from None
    env = {}
    for item in o["envs"]:
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY.match(key):
            raise UsageError(f"invalid --env {item!r} (use KEY=VALUE with KEY a variable name)")
        env[key] = value
    for item in o["mounts"]:
        try:
            parse_mount(item)
        except ValueError as exc:
            raise UsageError(f"--mount: {exc}") from None
    targets = list(o["targets"])
    for target in targets:
        try:
            parse_target(target)
        except ValueError as exc:
            raise UsageError(f"--target: {exc}") from None
    if len(set(targets)) != len(targets):
        dup = next(t for t in targets if targets.count(t) > 1)
        raise UsageError(f"--target {dup!r} given twice")
    gpus = _gpu_count(o["gpus"], targets)
    retries, after = _retries(o["retries"]), _after(o["afters"])
    retry_delay = _retry_delay(o["retry_delay"]) if o["retry_delay"] is not None else None
    sweep_size = None
    if o["sweep"]:
        from hakurun import span

        try:
            span.validate(command[1:])
        except ValueError as exc:
            raise UsageError(f"--sweep: {exc}") from None
        if not span.has_spans(command[1:]):
            raise UsageError("--sweep needs at least one span:{a..b} or span:[x,y] argument")
        sweep_size = span.count(command[1:])
    return SubmitRequest(command=command, targets=targets, gpus=gpus, container=o["container"], cores=cores,
                         memory=memory,
                         env=env, mounts=list(o["mounts"]), privileged=o["privileged"], wait=o["wait"], follow=o["follow"],
                         timeout=o["timeout"], sweep_size=sweep_size, retries=retries, retry_delay=retry_delay,
                         after=after, **common)


def _retries(text: str | None) -> int:
    if text is None:
        return 0
    if not (text.isdigit() and text.isascii()) or int(text) > bounds.MAX_RETRIES:
        raise UsageError(f"invalid --retries {text!r} (a whole number from 0 to {bounds.MAX_RETRIES})")
    return int(text)


def _retry_delay(text: str) -> float:
    try:
        delay = float(text)
    except ValueError:
        delay = -1.0
    if not 0 <= delay <= bounds.MAX_RETRY_DELAY_S:  # also refuses nan
        raise UsageError(f"invalid --retry-delay {text!r} (seconds from 0 to {bounds.MAX_RETRY_DELAY_S:g})")
    return delay


def _after(items: tuple[str, ...]) -> list[int]:
    """``--after ID[,ID...]`` (repeatable) as one list of task ids, each once, in the order given."""
    after: list[int] = []
    for item in items:
        for text in item.split(","):
            task_id = _task_id(text.strip(), "--after")
            if task_id not in after:
                after.append(task_id)
    if len(after) > bounds.MAX_AFTER:
        raise UsageError(f"--after lists {len(after)} tasks, over the bound of {bounds.MAX_AFTER}")
    return after


def _gpu_count(text: str | None, targets: list[str]) -> int:
    """``--gpus N`` as a number; a usage error if it is not one, or disagrees with a ``::IDS`` target."""
    from hakuriver.topology import parse_target

    count = 0
    if text is not None:
        if not (text.isdigit() and text.isascii()) or not 1 <= int(text) <= bounds.MAX_GPUS:
            raise UsageError(f"invalid --gpus {text!r} (a whole number from 1 to {bounds.MAX_GPUS})")
        count = int(text)
    for target in targets:
        ids = parse_target(target).gpus
        if ids is not None and count and count != len(ids):
            raise UsageError(f"--gpus {count} disagrees with --target {target!r} ({len(ids)} GPU ids)")
    return count


if __name__ == "__main__":
    main()
