"""The ``systemd`` executor: a host task in a transient scope unit, where systemd is PID 1.

On a machine run by systemd, cgroups belong to systemd; writing them behind its back
(as the ``process`` executor does) is what systemd asks programs not to do. So the
task is started as ``systemd-run --scope --unit=hakuriver-task-<id> -p CPUQuota=…
-p MemoryMax=… -p MemorySwapMax=0 -p AllowedCPUs=… -p AllowedMemoryNodes=… -- COMMAND``.

Why a scope and not a transient service (``--unit`` alone): with ``--scope``
systemd-run asks systemd for the scope, moves itself into it and then ``exec``\\ s the
command under its own pid, so the task is still the runner's child: stdout and stderr
go straight to the runner's files, its exit status is the command's, and waiting,
process-group signals, affinity, the task's environment and working directory work
exactly as for the ``process`` executor: both use :class:`~runner.executors.host.HostProcesses`
for that part. A service would need ``StandardOutput=append:`` and polling of
``ExecMainStatus`` instead. Every task gets its scope, whatever its limits: the scope
is what tracks the task's whole tree, also processes that leave its process group.

Why no ``--collect``: a scope that ends normally is unloaded anyway; one that ends
*failed* is kept loaded so that its ``Result`` (``oom-kill`` when ``MemoryMax`` ended
it) can still be read after the task exits. :meth:`destroy` then stops the unit (which
kills anything left in it) and runs ``systemctl reset-failed`` to unload it.

cgroup v1 ("legacy") systemd cannot apply ``AllowedCPUs``/``AllowedMemoryNodes``
(those need the v2 cpuset controller); there ``numactl`` pins the command where it is
installed, else CPU affinity does (and memory binding is unenforced on multi-node
machines). Scopes have no exit status of their own; a failure of systemd-run itself
(no D-Bus, unit name taken) is exit 1 with systemd-run's message in the task's stderr.

How this was tried: it cannot run on the development machine (systemd is not PID 1
there), so the command line is built by the pure :func:`systemd_run_argv`, tested on
its own, and the rest is the host tasks' shared, tested code. Restart: as for
the ``process`` executor the task cannot be followed; :meth:`recover` stops its unit
and returns None, so the runner reports it ``lost``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from hakuriver.messages import Task
from runner.accounts import setpriv_argv
from runner.executors.base import Executor, Handle, Outcome, PauseRefused, RunSpec
from runner.executors.host import HostProcesses, Launch, affinity_setter, stop_with_grace
from runner.numa import SYS_NODE_ROOT, detect_topology, format_cpulist

DEFAULT_UNIT_PREFIX = "hakuriver-task"
CGROUP_ROOT = "/sys/fs/cgroup"


def unit_name(task_id: int, prefix: str = DEFAULT_UNIT_PREFIX) -> str:
    return f"{prefix}-{task_id}.scope"


def cpu_quota(cores: float) -> str:
    """systemd's CPUQuota for ``cores`` (100% is one core), at least 1%."""
    return f"{max(1, round(cores * 100))}%"


def systemd_run_argv(task: Task, spec: RunSpec, *, unit_prefix: str = DEFAULT_UNIT_PREFIX,
                     cpuset: bool = True, numactl: str | None = None) -> list[str]:
    """The full command line that runs ``task`` in its own scope with its limits.

    ``cpuset``: whether systemd can apply AllowedCPUs/AllowedMemoryNodes (cgroup v2).
    Otherwise, ``numactl`` (its path) pins the command to the NUMA node when given.
    """
    argv = ["systemd-run", "--scope", "--quiet", f"--unit={unit_name(task.task_id, unit_prefix)}",
            f"--description=HakuRiver task {task.task_id}"]
    properties: list[str] = []
    if task.cores > 0:
        properties.append(f"CPUQuota={cpu_quota(task.cores)}")
    if task.memory is not None:
        properties += [f"MemoryMax={task.memory}", "MemorySwapMax=0"]
    command = setpriv_argv(spec.account, [task.command, *task.args])
    if cpuset:
        if spec.cpus:
            properties.append(f"AllowedCPUs={format_cpulist(spec.cpus)}")
        if spec.mems:
            properties.append(f"AllowedMemoryNodes={format_cpulist(spec.mems)}")
    elif numactl and (spec.cpus or spec.mems):
        pinning = [numactl]
        if spec.cpus:
            pinning.append(f"--physcpubind={format_cpulist(spec.cpus)}")
        if spec.mems:
            pinning.append(f"--membind={format_cpulist(spec.mems)}")
        command = [*pinning, "--", *command]
    for prop in properties:
        argv += ["-p", prop]
    return [*argv, "--", *command]


def systemd_is_init(run_dir: str = "/run/systemd/system", init_comm: str = "/proc/1/comm") -> bool:
    """systemd's own test (sd_booted) plus PID 1's name, as a container may bind-mount /run."""
    try:
        return Path(run_dir).is_dir() and Path(init_comm).read_text().strip() == "systemd"
    except OSError:
        return False


class SystemdExecutor(Executor):
    name = "systemd"
    poll_interval = 0.1  # each liveness check runs systemctl

    def __init__(self, unit_prefix: str = DEFAULT_UNIT_PREFIX, sys_node_root: str = SYS_NODE_ROOT,
                 cgroup_root: str = CGROUP_ROOT) -> None:
        # no cgroups of our own: systemd owns them
        self.processes = HostProcesses()
        self.unit_prefix = unit_prefix
        self._memory_nodes = len(detect_topology(sys_node_root))
        self._cpuset = (Path(cgroup_root) / "cgroup.controllers").exists()
        self._numactl = shutil.which("numactl")

    @classmethod
    def available(cls) -> bool:
        return systemd_is_init() and shutil.which("systemd-run") is not None

    def unenforceable(self) -> list[str]:
        if self._cpuset or self._numactl or self._memory_nodes <= 1:
            return []
        return ["numa-memory"]

    async def start(self, task: Task, spec: RunSpec) -> Handle:
        self.processes.check(task, spec)
        launch = self._launch(task, spec)
        try:
            return await self.processes.spawn(task, spec, launch, self.name)
        except BaseException:
            await _remove_unit(launch.data["unit"])
            raise

    async def wait(self, handle: Handle) -> Outcome:
        exit_code = await self.processes.wait(handle.task_id)
        if exit_code is None:
            return Outcome(exit_code=None, message="the task was not started by this runner")
        if await _unit_property(handle.data["unit"], "Result") == "oom-kill":
            limit = handle.data.get("memory")
            return Outcome(exit_code=exit_code, oom=True,
                           message=f"memory limit of {limit} bytes exceeded" if limit else "out of memory")
        return Outcome(exit_code=exit_code)

    async def stop(self, handle: Handle, grace: float) -> None:
        await stop_with_grace(lambda: self._alive(handle), lambda sig: self._signal(handle, sig),
                              grace, self.poll_interval)

    async def destroy(self, handle: Handle) -> None:
        if self.processes.running(handle.task_id):
            await self._signal(handle, signal.SIGKILL)
        else:  # the first process is gone, but what it started may still run in its group
            self.processes.signal_group(handle.task_id, signal.SIGKILL)
        await _remove_unit(handle.data["unit"])  # stopping the scope kills what is left in it
        await self.processes.forget(handle)

    async def pause(self, handle: Handle) -> str:
        """``systemctl freeze`` (systemd 246+, the scope's cgroup freezer); where systemd cannot
        freeze (older systemd, or a v1 hierarchy), SIGSTOP to every process of the scope."""
        unit = handle.data["unit"]
        if await _systemctl("freeze", unit) == 0:
            handle.data["paused_by"] = "freeze"
            return "systemctl freeze (the scope's cgroup freezer)"
        if await _systemctl("kill", "--signal=SIGSTOP", unit) != 0:
            raise PauseRefused(f"systemd could neither freeze nor signal {unit}")
        handle.data["paused_by"] = "signal"
        return "SIGSTOP to every process of its scope (systemd cannot freeze it)"

    async def resume(self, handle: Handle) -> str:
        if handle.data.pop("paused_by", "freeze") == "freeze":
            await _systemctl("thaw", handle.data["unit"])
            return "systemctl thaw"
        await _systemctl("kill", "--signal=SIGCONT", handle.data["unit"])
        return "SIGCONT to every process of its scope"

    async def inspect(self, handle: Handle) -> dict[str, Any]:
        info = dict(handle.data)
        info["running"] = self.processes.running(handle.task_id)
        info["active_state"] = await _unit_property(handle.data["unit"], "ActiveState")
        return info

    async def recover(self, handle: Handle, spec: RunSpec) -> Handle | None:
        """Stop what is left of a task from before the restart; it cannot be followed (None → lost)."""
        self.processes.kill_stale(handle)
        if handle.data.get("unit"):
            await _remove_unit(handle.data["unit"])
        await self.processes.forget(handle)
        return None

    # ---- this executor's own part --------------------------------------------------------

    def _launch(self, task: Task, spec: RunSpec) -> Launch:
        launch = Launch(argv=systemd_run_argv(task, spec, unit_prefix=self.unit_prefix, cpuset=self._cpuset,
                                              numactl=self._numactl),
                        data={"unit": unit_name(task.task_id, self.unit_prefix), "memory": task.memory})
        if not self._cpuset and not self._numactl and (spec.cpus or spec.mems):
            # systemd-run execs the command in this very process, so affinity carries over
            if spec.cpus:
                launch.preexec = affinity_setter(spec.cpus)
            if spec.mems and self._memory_nodes > 1:
                launch.unenforced.append("numa-memory")
        return launch

    async def _alive(self, handle: Handle) -> bool:
        if self.processes.running(handle.task_id):
            return True
        return await _systemctl("is-active", "--quiet", handle.data["unit"]) == 0

    async def _signal(self, handle: Handle, sig: int) -> None:
        """``sig`` to the whole scope, then let it run on, so a paused task ends at once."""
        self.processes.signal_group(handle.task_id, sig)
        await _systemctl("kill", f"--signal={signal.Signals(sig).name}", handle.data["unit"])
        if "paused_by" in handle.data:
            await self.resume(handle)


async def _remove_unit(unit: str) -> None:
    """Stop the scope (killing anything left in it) and unload it, also when it ended failed."""
    # SIGKILL first: `systemctl stop` alone sends SIGTERM and waits out the stop
    # timeout (90 s by default) for a leftover process that ignores it
    await _systemctl("kill", "--signal=SIGKILL", unit)
    await _systemctl("stop", unit)
    await _systemctl("reset-failed", unit)


async def _systemctl(*args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        "systemctl", *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait()


async def _unit_property(unit: str, name: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "systemctl", "show", "--property", name, "--value", unit,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "SYSTEMD_PAGER": ""})
    out, _ = await proc.communicate()
    return out.decode().strip()
