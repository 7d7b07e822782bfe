"""The ``process`` executor: the task as a plain child process, limited by the best means here.

* Its own cgroup (:mod:`runner.cgroups`, v2 or v1) where writable: memory limit with
  no swap, CPU quota of ``cores``, and a cpuset of the NUMA node's CPUs and memory for
  ``node:N`` targets. The cgroup also tracks every process the task starts (even one
  that leaves its session) so stop and destroy reach them all, and its OOM counter
  tells ``killed_oom`` from any other SIGKILL.
* Where the cpuset cannot be written, CPU affinity (``sched_setaffinity`` in the child)
  still pins the task to the node's CPUs; binding its memory to the node is then not
  possible (reported as ``numa-memory`` where the machine has more than one memory node).
* Any limit that cannot be enforced is listed in :attr:`Handle.unenforced`; the task runs anyway.

A task without limits gets neither a cgroup nor the shell below: it is spawned
directly, and its process group is what stop and destroy signal.

Joining the cgroup before the user's command runs: the child is ``/bin/sh -c`` with a
tiny script that writes ``0`` ("myself") into each ``cgroup.procs`` and then ``exec``\\ s
the command under the same pid, so not one instruction of the task runs outside its
limits. The obvious alternative, ``preexec_fn``, forces fork() instead of the
vfork()/posix_spawn path, and measured here (a ``true`` task, Python 3.11, 2-core VM):

    bare spawn 0.9 ms, sh trampoline 2.2 ms, preexec_fn 6.1 ms (runner-sized process);

fork() copies the page tables of the whole runner, which grows with its memory, and
running Python code between fork and exec is unsafe once the runner has threads
(aiosqlite, the default executor). ``preexec_fn`` is used only for the affinity
fallback, where it does nothing but the one ``sched_setaffinity`` system call.
Side effect of the trampoline: the shell exports ``PWD`` (the task's actual cwd).

The child leads its own session and process group, so a signal to the group reaches
everything it started that did not leave it. Its stdout and stderr are the runner's
output files themselves: no byte passes through the runner's memory.

Restart: a process task cannot be followed once the runner that waited on it is
gone (it is no longer our child, so its exit status is lost). :meth:`recover` kills
whatever is left of it (its cgroup, else its process group if the pid still names
the same process) and returns None; the runner then reports it ``lost``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import psutil

from hakuriver.messages import Task
from runner.cgroups import DEFAULT_PARENT, DEFAULT_ROOT, TaskCgroup, attach, open_cgroups
from runner.executors.base import Executor, Handle, Outcome, RunSpec, StartFailed
from runner.numa import SYS_NODE_ROOT, detect_topology

SHELL = "/bin/sh"
# argv: sh -c JOIN_SCRIPT hakuriver-join N PROCS_1..PROCS_N COMMAND ARGS...
# A failed join (the group vanished) ends the task with 125 and says so in its stderr;
# it never runs the command unconfined.
JOIN_SCRIPT = ('n=$1; shift; while [ "$n" -gt 0 ]; do '
               'echo 0 >"$1" || { echo "hakuriver: cannot join cgroup $1" >&2; exit 125; }; '
               'shift; n=$((n - 1)); done; exec "$@"')


class ProcessExecutor(Executor):
    name = "process"
    poll_interval = 0.02  # while waiting out a stop's grace period

    def __init__(self, cgroup_root: str = DEFAULT_ROOT, cgroup_parent: str = DEFAULT_PARENT,
                 sys_node_root: str = SYS_NODE_ROOT) -> None:
        self.cgroups = open_cgroups(cgroup_root, cgroup_parent)
        self._memory_nodes = len(detect_topology(sys_node_root))
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    def unenforceable(self) -> list[str]:
        missing = self.cgroups.unenforceable()
        limits = [name for name in missing if name != "cpuset"]
        # without a cpuset, affinity still pins CPUs; only memory-node binding is lost
        if "cpuset" in missing and self._memory_nodes > 1:
            limits.append("numa-memory")
        return limits

    # ---- the interface -------------------------------------------------------------

    async def start(self, task: Task, spec: RunSpec) -> Handle:
        _check_command(task.command, spec)
        argv, preexec, data, unenforced = await self._launch_plan(task, spec)
        try:
            with open(spec.stdout_path, "ab") as out, open(spec.stderr_path, "ab") as err:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                    env=spec.env, cwd=spec.cwd, start_new_session=True, preexec_fn=preexec)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            await self._cleanup(Handle(task.task_id, self.name, data))
            raise StartFailed(_start_error(task.command, exc, spec.cwd)) from None
        except BaseException:
            await self._cleanup(Handle(task.task_id, self.name, data))
            raise
        self._procs[task.task_id] = proc
        data.update(pid=proc.pid, started=_create_time(proc.pid))
        return Handle(task.task_id, self.name, data, unenforced)

    async def wait(self, handle: Handle) -> Outcome:
        proc = self._procs.get(handle.task_id)
        if proc is None:
            return Outcome(exit_code=None, message="the task was not started by this runner")
        code = await proc.wait()
        exit_code = code if code >= 0 else 128 - code
        if await self._oom(handle):
            limit = handle.data.get("memory")
            return Outcome(exit_code=exit_code, oom=True,
                           message=f"memory limit of {limit} bytes exceeded" if limit else "out of memory")
        return Outcome(exit_code=exit_code)

    async def stop(self, handle: Handle, grace: float) -> None:
        if not await self._alive(handle):
            return
        await self._signal(handle, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while await self._alive(handle) and time.monotonic() < deadline:
            await asyncio.sleep(self.poll_interval)
        if await self._alive(handle):
            await self._signal(handle, signal.SIGKILL)

    async def destroy(self, handle: Handle) -> None:
        proc = self._procs.get(handle.task_id)
        if proc is not None and proc.returncode is None:
            await self._signal(handle, signal.SIGKILL)
        elif proc is not None:
            # the leader is gone, but what it started may still run in its group
            _signal_group(proc.pid, signal.SIGKILL)
        await self._cleanup(handle)
        self._procs.pop(handle.task_id, None)

    async def inspect(self, handle: Handle) -> dict[str, Any]:
        info = dict(handle.data)
        proc = self._procs.get(handle.task_id)
        info["running"] = proc is not None and proc.returncode is None
        cgroup = _cgroup(handle)
        if cgroup is not None:
            info["pids"] = cgroup.pids()
            info["oom_kills"] = cgroup.oom_kills()
        return info

    async def recover(self, handle: Handle, spec: RunSpec) -> Handle | None:
        """Kill what is left of a task from before the restart; it cannot be followed (None → lost)."""
        pid = handle.data.get("pid")
        if pid and handle.data.get("started") and _create_time(pid) == handle.data["started"]:
            _signal_group(pid, signal.SIGKILL)
        await self._cleanup(handle)
        return None

    # ---- what the systemd executor changes -------------------------------------------

    async def _launch_plan(self, task: Task, spec: RunSpec
                           ) -> tuple[list[str], Callable[[], None] | None, dict[str, Any], list[str]]:
        """argv, preexec function, handle data and unenforced limits for this task."""
        cgroup, unenforced = None, []
        if task.memory is not None or task.cores > 0 or spec.cpus or spec.mems:
            # a task without limits needs no cgroup (nor the joining shell): its process
            # group is what stop and destroy signal
            cgroup, unenforced = self.cgroups.create(
                str(task.task_id), memory=task.memory, cores=task.cores, cpus=spec.cpus, mems=spec.mems)
        data: dict[str, Any] = {"cgroup": cgroup.to_data() if cgroup else None, "memory": task.memory}
        preexec = None
        if "cpuset" in unenforced:
            unenforced.remove("cpuset")
            if spec.cpus:
                preexec = affinity_setter(spec.cpus)
            if spec.mems and self._memory_nodes > 1:
                unenforced.append("numa-memory")
        argv = [task.command, *task.args]
        if cgroup is not None:
            procs = [str(path) for path in cgroup.procs_files()]
            argv = [SHELL, "-c", JOIN_SCRIPT, "hakuriver-join", str(len(procs)), *procs, *argv]
        return argv, preexec, data, unenforced

    async def _alive(self, handle: Handle) -> bool:
        proc = self._procs.get(handle.task_id)
        if proc is not None and proc.returncode is None:
            return True
        cgroup = _cgroup(handle)
        if cgroup is not None:
            return bool(cgroup.pids())
        return proc is not None and _group_exists(proc.pid)

    async def _signal(self, handle: Handle, sig: int) -> None:
        proc = self._procs.get(handle.task_id)
        if proc is not None:
            _signal_group(proc.pid, sig)
        cgroup = _cgroup(handle)
        if cgroup is not None:
            if sig == signal.SIGKILL:
                cgroup.kill()
            else:
                cgroup.signal_all(sig)

    async def _oom(self, handle: Handle) -> bool:
        cgroup = _cgroup(handle)
        return cgroup is not None and cgroup.oom_kills() > 0

    async def _cleanup(self, handle: Handle) -> None:
        """Remove the task's cgroup, killing whatever is still in it."""
        cgroup = _cgroup(handle)
        if cgroup is not None:
            await cgroup.remove()


def _cgroup(handle: Handle) -> TaskCgroup | None:
    data = handle.data.get("cgroup")
    return attach(data) if data else None


def _check_command(command: str, spec: RunSpec) -> None:
    """Refuse a command that cannot be executed, before anything is created for it.

    Needed because the task starts through a shell (or systemd-run), which would turn
    "not found" into exit 127 instead of a start failure.
    """
    if "/" in command:
        path = os.path.join(spec.cwd or os.getcwd(), command)
        if not os.path.exists(path):
            raise StartFailed(f"command not found: {command}")
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise StartFailed(f"permission denied: {command}")
        return
    if _find_on_path(command, spec.env.get("PATH", os.defpath)) is None:
        raise StartFailed(f"command not found: {command}")


_found_commands: dict[tuple[str, str], str] = {}
FOUND_COMMANDS_MAX = 256


def _find_on_path(command: str, search_path: str) -> str | None:
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


def use_fast_child_watcher() -> bool:
    """Have asyncio learn of child exits through pidfds; True if installed.

    On Python 3.11 asyncio's default ThreadedChildWatcher starts a thread per child
    to block in waitpid(); the PidfdChildWatcher polls a pidfd in the event loop
    instead (measured here: 585-635 against 413-565 spawns per second). Python 3.12+
    chooses pidfds by itself (and deprecates child watchers), so this does nothing
    there; nor where the kernel has no pidfd_open (before Linux 5.3).

    Process-wide: call once in the main thread of a process whose subprocesses are
    all started from the main thread's event loop (the runner), before or inside
    ``asyncio.run``.
    """
    if sys.version_info >= (3, 12):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    watcher = asyncio.PidfdChildWatcher()
    asyncio.get_event_loop_policy().set_child_watcher(watcher)
    try:
        # asyncio.run attaches a watcher set before it; one set inside it attaches here
        watcher.attach_loop(asyncio.get_running_loop())
    except RuntimeError:
        pass
    return True


def affinity_setter(cpus: list[int]) -> Callable[[], None]:
    allowed = frozenset(cpus)

    def set_affinity() -> None:  # runs in the child between fork and exec: one syscall only
        os.sched_setaffinity(0, allowed)

    return set_affinity


def _create_time(pid: int) -> float | None:
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
