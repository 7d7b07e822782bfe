"""What the two host executors share: a host task as a child process of the runner.

The ``process`` and ``systemd`` executors both start a host task as the runner's own
child: its stdout and stderr are the runner's output files themselves (no byte passes
through the runner's memory), it leads its own session and process group, and its exit
status comes from waiting on it. They differ only in what stands in front of the
command (a shell that joins the task's cgroup; ``systemd-run --scope``) and in how they
reach the task's whole tree (its cgroup; its scope). So each executor holds a
:class:`HostProcesses` for the shared part and says itself how to signal, check and
clean up, instead of one overriding the other's private hooks.

Also defined here, because it is the same for every host task whatever the executor
(README "Host tasks"):

* **Environment**: a fixed, documented base (:func:`base_environment`: ``PATH``,
  ``HOME``, ``USER``, ``LOGNAME``, ``LANG``, and ``PWD``), then the task's own variables
  (``HAKURIVER_*`` and the user's ``--env``, which win). Nothing else of the runner's
  environment reaches a task: not its credentials, not its virtual environment, not its
  ``HAKURIVER_*`` configuration. A task then behaves the same whichever shell or
  service manager started the runner.
* **Working directory**: its own directory, ``<local_temp_dir>/task-<id>``, made when it
  starts and removed with its contents when it ends (as a container's ``--rm``): tasks
  never write into each other's relative paths or into the runner's directory.
  Results belong in the shared directory (``$HAKURIVER_SHARED_DIR``).
* **A file the kernel cannot execute** (a script without ``#!``) runs with ``/bin/sh``,
  as ``execvp``, ``sh`` and ``systemd-run`` do; so it runs the same with or without limits.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import pwd
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from hakuriver.messages import Task
from runner.executors.base import Handle, RunSpec, StartFailed

SHELL = "/bin/sh"
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
LANG = "C.UTF-8"
WORKDIR_PREFIX = "task-"


# ---- what a host task starts with ----------------------------------------------------

@functools.cache
def _base() -> tuple[tuple[str, str], ...]:
    try:
        user = pwd.getpwuid(os.getuid())
        home, name = user.pw_dir, user.pw_name
    except KeyError:  # a uid without a passwd entry (some containers)
        home, name = "/", str(os.getuid())
    # this installation's console scripts (hakurun, hakuriver.client) last: a task's
    # `python3` is the system's, not the runner's virtual environment's
    scripts = sysconfig.get_path("scripts")
    path = [*SYSTEM_PATH, *([scripts] if scripts and scripts not in SYSTEM_PATH else [])]
    return (("PATH", ":".join(path)), ("HOME", home), ("USER", name), ("LOGNAME", name), ("LANG", LANG))


def base_environment() -> dict[str, str]:
    """What every host task's environment starts from, whatever the runner's own holds."""
    return dict(_base())


def task_environment(own: dict[str, str], workdir: Path, account: Any = None) -> dict[str, str]:
    """The base (with ``account``'s ``HOME``, ``USER``, ``LOGNAME`` when the task runs as one),
    ``PWD``, then the task's own variables (``HAKURIVER_*``, the user's ``--env``)."""
    person = {} if account is None else {"HOME": account.home, "USER": account.name, "LOGNAME": account.name}
    return {**base_environment(), **person, "PWD": str(workdir), **own}


def task_workdir(task_id: int, spec: RunSpec) -> Path:
    """Where the task starts: ``spec.cwd`` when given, else its own directory under local temp."""
    if spec.cwd:
        return Path(spec.cwd)
    return Path(spec.local_temp_dir or tempfile.gettempdir()) / f"{WORKDIR_PREFIX}{task_id}"


# ---- starting ------------------------------------------------------------------------

@dataclass
class Launch:
    """How an executor starts one task: the whole command line, and what its handle keeps."""

    argv: list[str]
    data: dict[str, Any]
    unenforced: list[str] = field(default_factory=list)
    preexec: Callable[[], None] | None = None  # runs in the child between fork and exec


class HostProcesses:
    """The host tasks one executor started, as its own children: spawn, wait, signal, forget."""

    def __init__(self) -> None:
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    def check(self, task: Task, spec: RunSpec) -> None:
        """:class:`StartFailed` when the command cannot be executed, before anything is made for it.

        Needed because the task starts through a shell or systemd-run, which would turn
        "not found" into exit 127 instead of a start failure.
        """
        workdir = task_workdir(task.task_id, spec)
        _resolve(task.command, task_environment(spec.env, workdir, spec.account), workdir)

    async def spawn(self, task: Task, spec: RunSpec, launch: Launch, executor: str) -> Handle:
        """Start ``launch.argv`` in the task's working directory and environment; its handle.

        On failure nothing of the task is left (its working directory is removed); the
        caller undoes what it made itself (cgroup, unit).
        """
        workdir = task_workdir(task.task_id, spec)
        made = not spec.cwd
        if made:
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                if spec.account is not None:  # the owner's alone: no other user's task reaches into it
                    os.chown(workdir, spec.account.uid, spec.account.gid)
                    workdir.chmod(0o700)
            except OSError as exc:
                raise StartFailed(f"cannot make the working directory {workdir}: {exc.strerror or exc}") from None
        env = task_environment(spec.env, workdir, spec.account)
        try:
            proc = await _exec(launch.argv, env, workdir, spec, launch.preexec)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            if made:
                await _remove_tree(workdir)
            raise StartFailed(_start_error(task.command, exc, None if made else str(workdir))) from None
        except BaseException:
            if made:
                await _remove_tree(workdir)
            raise
        self._procs[task.task_id] = proc
        data = {**launch.data, "pid": proc.pid, "started": create_time(proc.pid)}
        if made:
            data["workdir"] = str(workdir)
        return Handle(task.task_id, executor, data, list(launch.unenforced))

    async def wait(self, task_id: int) -> int | None:
        """The exit code (128+N for signal N); None for a task this runner did not start."""
        proc = self._procs.get(task_id)
        if proc is None:
            return None
        code = await proc.wait()
        return code if code >= 0 else 128 - code

    def running(self, task_id: int) -> bool:
        """Whether the task's first process (the one waited on) still runs."""
        proc = self._procs.get(task_id)
        return proc is not None and proc.returncode is None

    def group_alive(self, task_id: int) -> bool:
        """Whether anything still runs in the task's process group."""
        proc = self._procs.get(task_id)
        return proc is not None and _group_exists(proc.pid)

    def signal_group(self, task_id: int, sig: int) -> None:
        proc = self._procs.get(task_id)
        if proc is not None:
            _signal_group(proc.pid, sig)

    @staticmethod
    def kill_stale(handle: Handle) -> None:
        """After a runner restart: SIGKILL the task's process group if its pid still names it."""
        pid, started = handle.data.get("pid"), handle.data.get("started")
        if pid and started and create_time(pid) == started:
            _signal_group(pid, signal.SIGKILL)

    async def forget(self, handle: Handle) -> None:
        """Drop the task and remove its working directory (call once its processes are gone)."""
        self._procs.pop(handle.task_id, None)
        workdir = handle.data.get("workdir")
        if workdir:
            await _remove_tree(Path(workdir))


def affinity_setter(cpus: list[int]) -> Callable[[], None]:
    """A ``preexec`` that pins the child to ``cpus`` (the NUMA fallback where no cpuset can)."""
    allowed = frozenset(cpus)

    def set_affinity() -> None:  # runs in the child between fork and exec: one syscall only
        os.sched_setaffinity(0, allowed)

    return set_affinity


async def stop_with_grace(alive: Callable[[], Awaitable[bool]], send: Callable[[int], Awaitable[None]],
                          grace: float, poll: float) -> None:
    """SIGTERM through ``send``; SIGKILL once ``grace`` seconds passed with ``alive`` still true."""
    if not await alive():
        return
    await send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while await alive() and time.monotonic() < deadline:
        await asyncio.sleep(poll)
    if await alive():
        await send(signal.SIGKILL)


async def _exec(argv: list[str], env: dict[str, str], workdir: Path, spec: RunSpec,
                preexec: Callable[[], None] | None) -> asyncio.subprocess.Process:
    with open(spec.stdout_path, "ab") as out, open(spec.stderr_path, "ab") as err:
        def start(args: list[str]) -> Awaitable[asyncio.subprocess.Process]:
            return asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                env=env, cwd=workdir, start_new_session=True, preexec_fn=preexec)

        try:
            return await start(argv)
        except OSError as exc:
            if exc.errno != errno.ENOEXEC:
                raise
        # neither "#!" nor a binary format the kernel knows: sh runs it, as execvp does
        return await start([SHELL, _resolve(argv[0], env, workdir), *argv[1:]])


def _resolve(command: str, env: dict[str, str], workdir: Path) -> str:
    """The file ``command`` names (relative ones from the working directory), or :class:`StartFailed`."""
    if "/" in command:
        path = workdir / command
        if not path.exists():
            raise StartFailed(f"command not found: {command}")
        if path.is_dir() or not os.access(path, os.X_OK):
            raise StartFailed(f"permission denied: {command}")
        return command
    found = find_on_path(command, env.get("PATH", os.defpath))
    if found is None:
        raise StartFailed(f"command not found: {command}")
    return found


_found_commands: dict[tuple[str, str], str] = {}
FOUND_COMMANDS_MAX = 256


def find_on_path(command: str, search_path: str) -> str | None:
    """``shutil.which``, remembering where commands were found.

    ``which`` tries every PATH entry (a stat or two each) for every task; a remembered
    file costs one ``access`` call to confirm it is still there and executable. Misses
    are not remembered: a command installed later is found on its next task.
    """
    key = (command, search_path)
    found = _found_commands.get(key)
    if found is not None and os.access(found, os.X_OK) and not os.path.isdir(found):
        return found
    found = shutil.which(command, path=search_path)
    _found_commands.pop(key, None)
    if found is not None:
        if len(_found_commands) >= FOUND_COMMANDS_MAX:
            del _found_commands[next(iter(_found_commands))]  # the oldest entry
        _found_commands[key] = found
    return found


def _start_error(command: str, exc: BaseException, cwd: str | None) -> str:
    if isinstance(exc, OSError) and cwd and exc.filename == cwd:
        return f"cannot start {command}: working directory {cwd}: {exc.strerror}"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {command}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {command}"
    if isinstance(exc, OSError):
        return f"cannot start {command}: {exc.strerror or exc}"
    return f"cannot start {command}: {exc}"  # e.g. preexec_fn failed: CPUs not allowed here


async def _remove_tree(path: Path) -> None:
    try:
        os.rmdir(path)  # usually the task left nothing: one system call, no thread
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    # it left files, maybe many: the event loop must not wait on the disk
    await asyncio.to_thread(shutil.rmtree, path, True)


# ---- naming one process across pid reuse ------------------------------------------------

def create_time(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (None if there is no such process).

    Together with the pid this names one process across pid reuse. The same value as
    ``psutil.Process(pid).create_time()`` (older handles hold that), computed the same
    way from ``starttime``, field 22 of ``/proc/<pid>/stat``, in clock ticks since boot,
    without psutil's per-call overhead.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # field 2, the command name, is in parentheses and may itself hold spaces or ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    return float(fields[STARTTIME_FIELD - 3]) / _clock_ticks() + _boot_time()


STARTTIME_FIELD = 22


@functools.cache
def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


@functools.cache
def _boot_time() -> float:
    return psutil.boot_time()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
