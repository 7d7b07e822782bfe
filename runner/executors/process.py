"""The ``process`` executor: the task as a plain child process, tracked and limited by its own cgroup.

* Every task gets its own cgroup (:mod:`runner.cgroups`, v2 or v1), whatever its limits:
  it tracks every process the task starts, also one that leaves its process group or
  session (``setsid``), so that a kill, and the end of the task, reach them all. Where
  the task has limits the same cgroup enforces them: memory with no swap, CPU quota of
  ``cores``, and a cpuset of the NUMA node's CPUs and memory for ``node:N`` targets; its
  OOM counter tells ``killed_oom`` from any other SIGKILL.
* Where the cpuset cannot be written, CPU affinity (``sched_setaffinity`` in the child)
  still pins the task to the node's CPUs; binding its memory to the node is then not
  possible (reported as ``numa-memory`` where the machine has more than one memory node).
* Any limit that cannot be enforced is listed in :attr:`Handle.unenforced`; the task runs
  anyway. Where no cgroup can be made at all (not root), tasks run untracked (their
  process group is what stop and destroy signal) and the node lists ``tracking`` among
  what it does not enforce.

Joining the cgroup before the user's command runs: the child is ``/bin/sh -c`` with a
tiny script that writes ``0`` ("myself") into each ``cgroup.procs`` and then ``exec``\\ s
the command under the same pid, so not one instruction of the task runs outside its
group. The obvious alternative, ``preexec_fn``, forces fork() instead of the
vfork()/posix_spawn path, and measured here (a ``true`` task, Python 3.11, 2-core VM):

    bare spawn 0.9 ms, sh trampoline 2.2 ms, preexec_fn 6.1 ms (runner-sized process);

fork() copies the page tables of the whole runner, which grows with its memory, and
running Python code between fork and exec is unsafe once the runner has threads
(aiosqlite, the default executor). ``preexec_fn`` is used only for the affinity
fallback, where it does nothing but the one ``sched_setaffinity`` system call. What the
tracking costs per task, cgroup and trampoline together, is a row of ``bench/run``
(section ``executor``).

Pause (:meth:`pause`): the task's cgroup is frozen (v1 ``freezer.state``, v2
``cgroup.freeze``), which stops every process of the task at once, also one that left
its process group. Where the task has no group that can freeze, its process group gets
SIGSTOP (and SIGCONT on resume): that misses a process that called ``setsid``, and the
task can see it; the returned text, shown in the task's status, says which was used. A
kill thaws (or SIGCONTs) the task right after signalling it, so it ends at once.

Spawning, the task's environment and working directory are shared with the ``systemd``
executor (:mod:`runner.executors.host`).

Restart: a process task cannot be followed once the runner that waited on it is
gone (it is no longer our child, so its exit status is lost). :meth:`recover` kills
whatever is left of it (its cgroup, else its process group if the pid still names
the same process) and returns None; the runner then reports it ``lost``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from hakuriver.messages import Task
from runner.accounts import setpriv_argv
from runner.cgroups import DEFAULT_PARENT, DEFAULT_ROOT, TaskCgroup, attach, open_cgroups
from runner.executors.base import Executor, Handle, Outcome, PauseRefused, RunSpec
from runner.executors.host import SHELL, HostProcesses, Launch, affinity_setter, stop_with_grace
from runner.numa import SYS_NODE_ROOT, detect_topology

# argv: sh -c JOIN_SCRIPT hakuriver-join N PROCS_1..PROCS_N COMMAND ARGS...
# A failed join (the group vanished) ends the task with 125 and says so in its stderr;
# it never runs the command untracked.
JOIN_SCRIPT = ('n=$1; shift; while [ "$n" -gt 0 ]; do '
               'echo 0 >"$1" || { echo "hakuriver: cannot join cgroup $1" >&2; exit 125; }; '
               'shift; n=$((n - 1)); done; exec "$@"')

FROZEN_BY_CGROUP = "cgroup freezer"
STOPPED_BY_SIGNAL = "SIGSTOP to its process group (no cgroup freezer)"


class ProcessExecutor(Executor):
    name = "process"
    poll_interval = 0.02  # while waiting out a stop's grace period

    def __init__(self, cgroup_root: str = DEFAULT_ROOT, cgroup_parent: str = DEFAULT_PARENT,
                 sys_node_root: str = SYS_NODE_ROOT) -> None:
        self.cgroups = open_cgroups(cgroup_root, cgroup_parent)
        self._memory_nodes = len(detect_topology(sys_node_root))
        self.processes = HostProcesses()

    def unenforceable(self) -> list[str]:
        missing = self.cgroups.unenforceable()
        limits = [name for name in missing if name != "cpuset"]
        # without a cpuset, affinity still pins CPUs; only memory-node binding is lost
        if "cpuset" in missing and self._memory_nodes > 1:
            limits.append("numa-memory")
        if not self.cgroups.tracks():
            limits.append("tracking")
        return limits

    async def start(self, task: Task, spec: RunSpec) -> Handle:
        self.processes.check(task, spec)
        launch = self._launch(task, spec)
        try:
            return await self.processes.spawn(task, spec, launch, self.name)
        except BaseException:
            await _remove_cgroup(launch.data)
            raise

    async def wait(self, handle: Handle) -> Outcome:
        exit_code = await self.processes.wait(handle.task_id)
        if exit_code is None:
            return Outcome(exit_code=None, message="the task was not started by this runner")
        cgroup = _cgroup(handle.data)
        if cgroup is not None and cgroup.oom_kills() > 0:
            limit = handle.data.get("memory")
            return Outcome(exit_code=exit_code, oom=True,
                           message=f"memory limit of {limit} bytes exceeded" if limit else "out of memory")
        return Outcome(exit_code=exit_code)

    async def stop(self, handle: Handle, grace: float) -> None:
        await stop_with_grace(lambda: self._alive(handle), lambda sig: self._signal(handle, sig),
                              grace, self.poll_interval)

    async def pause(self, handle: Handle) -> str:
        cgroup = _cgroup(handle.data)
        if cgroup is not None and cgroup.can_freeze():
            try:
                await cgroup.freeze()
            except OSError as exc:
                cgroup.thaw()
                raise PauseRefused(f"the cgroup freezer failed: {exc}") from None
            return FROZEN_BY_CGROUP
        if not self.processes.group_alive(handle.task_id):
            raise PauseRefused("the task's process group is gone")
        self.processes.signal_group(handle.task_id, signal.SIGSTOP)
        return STOPPED_BY_SIGNAL

    async def resume(self, handle: Handle) -> str:
        cgroup = _cgroup(handle.data)
        if cgroup is not None and cgroup.can_freeze():
            cgroup.thaw()
            return "thawed its cgroup"
        self.processes.signal_group(handle.task_id, signal.SIGCONT)
        return "SIGCONT to its process group"

    async def destroy(self, handle: Handle) -> None:
        # the first process may be gone while what it started still runs: its group, its cgroup
        cgroup = _cgroup(handle.data)
        if cgroup is None:
            await self._signal(handle, signal.SIGKILL)
        else:
            self.processes.signal_group(handle.task_id, signal.SIGKILL)
            self.processes.signal_group(handle.task_id, signal.SIGCONT)
            # Whatever is left is in the cgroup, and remove() kills it, but only once an rmdir
            # says the group is busy: usually it is empty by now, and one rmdir per hierarchy is
            # all this costs (no reading of every cgroup.procs, no thaw, for every task).
            await cgroup.remove()
        await self.processes.forget(handle)

    async def inspect(self, handle: Handle) -> dict[str, Any]:
        info = dict(handle.data)
        info["running"] = self.processes.running(handle.task_id)
        cgroup = _cgroup(handle.data)
        if cgroup is not None:
            info["pids"] = cgroup.pids()
            info["oom_kills"] = cgroup.oom_kills()
        return info

    async def recover(self, handle: Handle, spec: RunSpec) -> Handle | None:
        """Kill what is left of a task from before the restart; it cannot be followed (None → lost)."""
        self.processes.kill_stale(handle)
        await _remove_cgroup(handle.data)
        await self.processes.forget(handle)
        return None

    # ---- this executor's own part --------------------------------------------------------

    def _launch(self, task: Task, spec: RunSpec) -> Launch:
        """The task's cgroup (made now, limits set) and the command line that joins it."""
        cgroup, unenforced = self.cgroups.create(
            str(task.task_id), memory=task.memory, cores=task.cores, cpus=spec.cpus, mems=spec.mems)
        launch = Launch(argv=setpriv_argv(spec.account, [task.command, *task.args]), unenforced=unenforced,
                        data={"cgroup": cgroup.to_data() if cgroup else None, "memory": task.memory})
        if "cpuset" in unenforced:
            unenforced.remove("cpuset")
            if spec.cpus:
                launch.preexec = affinity_setter(spec.cpus)
            if spec.mems and self._memory_nodes > 1:
                unenforced.append("numa-memory")
        if cgroup is not None:
            procs = [str(path) for path in cgroup.procs_files()]
            launch.argv = [SHELL, "-c", JOIN_SCRIPT, "hakuriver-join", str(len(procs)), *procs, *launch.argv]
        return launch

    async def _alive(self, handle: Handle) -> bool:
        if self.processes.running(handle.task_id):
            return True
        cgroup = _cgroup(handle.data)
        if cgroup is not None:
            return bool(cgroup.pids())
        return self.processes.group_alive(handle.task_id)

    async def _signal(self, handle: Handle, sig: int) -> None:
        """``sig`` to the whole task, then let it run, so a paused task ends at once."""
        self.processes.signal_group(handle.task_id, sig)
        self.processes.signal_group(handle.task_id, signal.SIGCONT)
        cgroup = _cgroup(handle.data)
        if cgroup is not None:
            if sig == signal.SIGKILL:
                cgroup.kill()
            else:
                cgroup.signal_all(sig)
                cgroup.thaw()


def _cgroup(data: dict[str, Any]) -> TaskCgroup | None:
    described = data.get("cgroup")
    return attach(described) if described else None


async def _remove_cgroup(data: dict[str, Any]) -> None:
    """Remove the task's cgroup, killing whatever is still in it."""
    cgroup = _cgroup(data)
    if cgroup is not None:
        await cgroup.remove()


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
