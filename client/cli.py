"""``hakuriver.client``: submit, wait, query, kill, pause, resume.

Only :mod:`client.options` (the option table and its parser, standard library only) is
imported at start-up; the rest loads once the command line is known to be good, so ``--help``
and usage errors are fast (tests/test_cli_imports.py). The everyday commands then run on the
light path (:mod:`client.quick`: no aio-pika, pydantic or asyncio); the others on the
aio-pika API (:mod:`client.session`).
Everything for a person goes to stderr; stdout carries only task ids (on submit) or
the query's answer (a task's output included), so ``TASK=$(hakuriver.client --wait ...)``
holds the id. The command line becomes one typed request (:mod:`client.requests`) that
:mod:`client.quick` or :mod:`client.session` carries out; exit codes are in :mod:`client.exits`.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, NoReturn

from client.exits import EXIT_FAILED, EXIT_OK, EXIT_PIPE_CLOSED, EXIT_USAGE
from client.options import BARE, UsageError, help_text, parse
from hakuriver import bounds

if TYPE_CHECKING:  # building the request classes costs start-up time; --help needs none of them
    from client.requests import Request, SubmitRequest

__all__ = ["UsageError", "main"]

# query option -> its dest in client.options
QUERY_OPTIONS = {"status": "status_ids", "stdout": "stdout_id", "stderr": "stderr_id", "kill": "kill_id",
                 "pause": "pause_id", "resume": "resume_id",
                 "list_tasks": "list_tasks", "list_nodes": "list_nodes", "health": "health"}


def _write(fd: int, text: str) -> None:
    """All of ``text`` on ``fd``, unbuffered: nothing is left to flush (and fail) at exit."""
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]


def fail(message: str, code: int) -> NoReturn:
    try:
        _write(2, f"hakuriver.client: {message}\n")
    except OSError:
        pass  # stderr closed: nobody reads what we tell people; the exit code still says it
    sys.exit(code)


def _task_id(text: str, option: str) -> int:
    if not text.isdigit() or int(text) >= bounds.INT64:
        raise UsageError(f"invalid task id {text!r} for {option}")
    return int(text)


def main(argv: list[str] | None = None) -> NoReturn:
    """Run COMMAND on a HakuRiver node, or query and control tasks (``argv``: sys.argv[1:])."""
    try:
        options = parse(sys.argv[1:] if argv is None else argv)
        if options["help"]:
            try:
                _write(1, help_text())
            except BrokenPipeError:  # ``--help | head``: the reader has what it wanted
                sys.exit(EXIT_PIPE_CLOSED)
            except OSError as exc:   # no stdout at all (``>&-``)
                fail(f"cannot write the help on stdout: {exc.strerror}", EXIT_FAILED)
            sys.exit(EXIT_OK)
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
    if o["timeout"] is not None and (not o["timeout"] > 0 or not o["wait"]):  # also refuses nan
        raise UsageError(f"--timeout {o['timeout']:g} needs --wait and a value above 0")
    if o["follow"] and not (o["wait"] or o["stdout_id"] or o["stderr_id"]):
        raise UsageError("--follow goes with --wait or --stdout/--stderr")
    if o["wait"] and queries and queries != ["kill"]:
        raise UsageError(f"--wait does not go with --{queries[0].replace('_', '-')}")
    if o["config_file"] and os.path.isdir(o["config_file"]):
        raise UsageError(f"invalid --config {o['config_file']!r}: a directory, not a file")
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
        return HealthRequest(node=None if o["health"] == BARE else o["health"], **common)
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
    from client.bodies import is_env_name
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
        if not sep or not is_env_name(key):
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
