"""A cgroup of its own per host task, on cgroup v2 (unified) or v1 (one hierarchy per controller).

Every task of the ``process`` executor gets one, whatever its limits: the cgroup is how
the runner finds every process the task started (also those that left its process
group or session, e.g. with ``setsid``), so that a kill, or the end of the task, ends
them all. It also enforces the task's memory limit, CPU quota and NUMA cpuset, and the
kernel's OOM counter in it tells whether the memory limit ended the task.

Layout: ``<hierarchy>/<parent>/<task name>``; ``parent`` is runner-owned and
configurable, so concurrent runners (and tests) never touch each other's groups.

* v2 (``<root>/cgroup.controllers`` exists): the parent sits at the root of the
  hierarchy, because of v2's rule that only leaves hold processes: the runner's own
  cgroup usually holds the runner and could not delegate controllers below itself.
* v1: the parent sits under the runner's own cgroup in each hierarchy
  (``/proc/self/cgroup``), so tasks stay inside whatever limits the runner's own
  supervisor put on the runner; v1 has no rule against that.

A process joins by writing ``0`` ("the writer") to each of :meth:`TaskCgroup.procs_files`
itself, before it execs the user's command (see :mod:`runner.executors.process`), so
the command never runs outside its limits, not even for a moment.

On v1 a task gets groups only in the hierarchies of the limits it has (each one is
a mkdir, writes and an rmdir per task: any one of them already holds every process of
the task), plus one in the ``freezer`` hierarchy where it is mounted: that group is what
pauses the whole task (``--pause``), and it tracks the task as well. A task without
limits where there is no freezer gets one group in a hierarchy that exists only to
group processes, the first writable of :data:`TRACKERS` (a mkdir and rmdir there cost
about 60-350 µs, against 250 µs for ``memory``, measured here). On v2 a group without
limits is just a directory, ``cgroup.kill`` ends it atomically and ``cgroup.freeze``
pauses it.

Pausing (:meth:`TaskCgroup.freeze`): the kernel stops every process of the group, its
children too, wherever they moved in process groups or sessions, and none of them can
notice it (unlike SIGSTOP, which a task sees and which reaches only one process group).
A frozen v1 group holds even a SIGKILL back until it is thawed, so every kill here
thaws the group after signalling it.

Whatever controller cannot be written here is reported by name (``memory``, ``cpu``,
``cpuset``) as an unenforced limit; the task still runs.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

from runner.numa import format_cpulist

DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "hakuriver"
CONTROLLERS = ("memory", "cpu", "cpuset")
# v1 hierarchies that only group processes, cheapest first: where a task without limits is tracked
TRACKERS = ("freezer", "pids", "cpuacct")  # the freezer first: it also pauses
FREEZE_WAIT_S = 5.0  # a freeze takes effect within microseconds; FREEZING longer than this is an error
CPUSET_FILES = ("cpuset.cpus", "cpuset.mems")
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses smaller quotas
REMOVE_FIRST_WAIT = 0.001  # seconds; doubled per busy round of TaskCgroup.remove
REMOVE_MAX_WAIT = 0.05


def _write(path: Path, value: str) -> None:
    # cgroup files take one value per write(2); a buffered writer might split it
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _keyed_counter(text: str, key: str) -> int | None:
    """The number after ``key`` in a flat-keyed file (``oom_kill 1``); None if absent."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


class TaskCgroup(abc.ABC):
    """One task's cgroup: join it, list and kill its processes, read its OOM count, remove it."""

    version: int

    @abc.abstractmethod
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes itself into to join."""

    @abc.abstractmethod
    def dirs(self) -> list[Path]:
        """Every directory of this cgroup (one per v1 hierarchy, one on v2)."""

    @abc.abstractmethod
    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer ended in this cgroup because of its limit."""

    @abc.abstractmethod
    def to_data(self) -> dict[str, Any]:
        """JSON-able data for :func:`attach`, stored in the task's handle."""

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for path in self.procs_files():
            pids.update(int(line) for line in _read(path).split() if line.isdigit())
        return sorted(pids)

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every process in the cgroup now (one pass)."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (one pass; :meth:`remove` repeats until empty)."""
        self.signal_all(signal.SIGKILL)
        self.thaw()  # a frozen process dies only once thawed

    def can_freeze(self) -> bool:
        """Whether this group can be frozen (v2 always; v1 where it has a freezer group)."""
        return False

    async def freeze(self) -> None:
        """Stop every process of the group until :meth:`thaw`; returns once they are stopped."""
        raise OSError("this cgroup has no freezer")

    def thaw(self) -> None:
        """Let a frozen group run again (a no-op when it is not frozen or cannot freeze)."""

    def exists(self) -> bool:
        return any(path.is_dir() for path in self.dirs())

    async def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left and remove the cgroup; True once every directory is gone.

        Usually the task has been reaped and the first rmdir succeeds, with no kill and
        no wait. rmdir fails with EBUSY while a process is still in the group (a dying
        process leaves it only once the kernel has torn it down), so only then this
        kills and retries, waiting 1 ms at first and longer each round.
        """
        deadline = time.monotonic() + timeout
        backoff = REMOVE_FIRST_WAIT
        while True:
            if self._rmdir_all():
                return True
            if time.monotonic() >= deadline:
                return False
            self.kill()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, REMOVE_MAX_WAIT)

    def _rmdir_all(self) -> bool:
        """rmdir every directory; True when none is left (False: some group is still busy)."""
        done = True
        for path in self.dirs():
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                done = False
        return done


class V2TaskCgroup(TaskCgroup):
    version = 2

    def __init__(self, path: Path) -> None:
        self.path = path

    def procs_files(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    def dirs(self) -> list[Path]:
        return [self.path]

    def oom_kills(self) -> int:
        return _keyed_counter(_read(self.path / "memory.events"), "oom_kill") or 0

    def kill(self) -> None:
        # cgroup.kill (Linux 5.14+) kills the whole group atomically, forks included
        kill_file = self.path / "cgroup.kill"
        if kill_file.exists():
            try:
                _write(kill_file, "1")
                return
            except OSError:
                pass
        super().kill()

    def can_freeze(self) -> bool:
        return (self.path / "cgroup.freeze").exists()

    async def freeze(self) -> None:
        _write(self.path / "cgroup.freeze", "1")
        await _until_frozen(lambda: _keyed_counter(_read(self.path / "cgroup.events"), "frozen") == 1)

    def thaw(self) -> None:
        if self.can_freeze():
            _try_write(self.path / "cgroup.freeze", "0")

    def to_data(self) -> dict[str, Any]:
        return {"version": 2, "path": str(self.path)}


class V1TaskCgroup(TaskCgroup):
    version = 1

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths  # controller → directory in that controller's hierarchy

    def procs_files(self) -> list[Path]:
        return [path / "cgroup.procs" for path in self.paths.values()]

    def dirs(self) -> list[Path]:
        return list(self.paths.values())

    def oom_kills(self) -> int:
        """From ``memory.oom_control``'s ``oom_kill`` line (Linux 4.13+).

        Older kernels have no such line; there ``memory.failcnt`` > 0 (the limit was hit
        and reclaim did not help enough to avoid a failure) is the best sign available.
        """
        memory = self.paths.get("memory")
        if memory is None:
            return 0
        count = _keyed_counter(_read(memory / "memory.oom_control"), "oom_kill")
        if count is not None:
            return count
        failcnt = _read(memory / "memory.failcnt").strip()
        return 1 if failcnt.isdigit() and int(failcnt) > 0 else 0

    def can_freeze(self) -> bool:
        return "freezer" in self.paths

    async def freeze(self) -> None:
        state = self.paths["freezer"] / "freezer.state"
        _write(state, "FROZEN")
        await _until_frozen(lambda: _read(state).strip() == "FROZEN")

    def thaw(self) -> None:
        if self.can_freeze():
            _try_write(self.paths["freezer"] / "freezer.state", "THAWED")

    def to_data(self) -> dict[str, Any]:
        return {"version": 1, "paths": {name: str(path) for name, path in self.paths.items()}}


async def _until_frozen(frozen) -> None:
    """Wait until ``frozen()``: a group is FREEZING while some process is in an uninterruptible sleep."""
    deadline = time.monotonic() + FREEZE_WAIT_S
    wait = REMOVE_FIRST_WAIT
    while not frozen():
        if time.monotonic() >= deadline:
            raise OSError(f"the cgroup did not freeze within {FREEZE_WAIT_S:g} s")
        await asyncio.sleep(wait)
        wait = min(wait * 2, REMOVE_MAX_WAIT)


def attach(data: dict[str, Any]) -> TaskCgroup | None:
    """The cgroup described by :meth:`TaskCgroup.to_data`, e.g. after a runner restart."""
    if data.get("version") == 2:
        return V2TaskCgroup(Path(data["path"]))
    if data.get("version") == 1:
        return V1TaskCgroup({name: Path(path) for name, path in data.get("paths", {}).items()})
    return None


class Cgroups(abc.ABC):
    """The runner's view of one cgroup hierarchy: which controllers it may write, new task groups."""

    def __init__(self, root: str = DEFAULT_ROOT, parent: str = DEFAULT_PARENT) -> None:
        self.root = Path(root)
        self.parent = parent
        self._writable: list[str] | None = None

    def probe(self) -> list[str]:
        """Controllers among ``memory``, ``cpu``, ``cpuset`` that this runner can use (cached)."""
        if self._writable is None:
            self._writable = [name for name in self._probe() if name in CONTROLLERS]
        return list(self._writable)

    def unenforceable(self) -> list[str]:
        writable = self.probe()
        return [name for name in CONTROLLERS if name not in writable]

    @abc.abstractmethod
    def tracks(self) -> bool:
        """Whether a task group can be made here at all, so that a task's whole tree is tracked."""

    @abc.abstractmethod
    def _probe(self) -> list[str]:
        ...

    @abc.abstractmethod
    def create(self, name: str, *, memory: int | None, cores: float,
               cpus: list[int] | None, mems: list[int] | None) -> tuple[TaskCgroup | None, list[str]]:
        """A new task cgroup with the limits set, and the limits it could not set.

        Returns ``(None, unenforced)`` when no hierarchy is usable at all.
        """

    @abc.abstractmethod
    def parent_dirs(self) -> list[Path]:
        ...

    def remove_parent(self) -> None:
        """Remove the runner's parent groups if empty (tests; a runner normally keeps them)."""
        for path in self.parent_dirs():
            try:
                os.rmdir(path)
            except OSError:
                pass


def _requested(memory: int | None, cores: float, cpus: list[int] | None, mems: list[int] | None) -> list[str]:
    wanted = []
    if memory is not None:
        wanted.append("memory")
    if cores > 0:
        wanted.append("cpu")
    if cpus or mems:
        wanted.append("cpuset")
    return wanted


def _cpu_quota_us(cores: float) -> int:
    return max(MIN_CPU_QUOTA_US, int(round(cores * CPU_PERIOD_US)))


class V2Cgroups(Cgroups):
    version = 2

    @property
    def parent_dir(self) -> Path:
        return self.root / self.parent

    def parent_dirs(self) -> list[Path]:
        return [self.parent_dir]

    def tracks(self) -> bool:
        self.probe()  # makes the parent where it can
        return self.parent_dir.is_dir()

    def _probe(self) -> list[str]:
        available = _read(self.root / "cgroup.controllers").split()
        wanted = [name for name in CONTROLLERS if name in available]
        try:
            self.parent_dir.mkdir(exist_ok=True)
        except OSError:
            return []
        # each controller must be delegated by the root and by our parent to reach a task's group
        for directory in (self.root, self.parent_dir):
            for name in wanted:
                try:
                    _write(directory / "cgroup.subtree_control", f"+{name}")
                except OSError:
                    pass
        return _read(self.parent_dir / "cgroup.subtree_control").split()

    def create(self, name, *, memory, cores, cpus, mems):
        wanted = _requested(memory, cores, cpus, mems)
        writable = self.probe()
        path = self.parent_dir / name
        try:
            path.mkdir(exist_ok=True)
        except OSError:  # also when the parent is missing: nothing usable here
            return None, wanted
        unenforced = [limit for limit in wanted if limit not in writable]
        settings: dict[str, list[tuple[str, str]]] = {}
        if memory is not None:
            # no swap: the limit means RAM+swap, like Docker's --memory without --memory-swap;
            # oom.group: an OOM ends the whole task rather than one arbitrary process of it
            settings["memory"] = [("memory.max", str(memory)), ("memory.swap.max?", "0"),
                                  ("memory.oom.group?", "1")]
        if cores > 0:
            settings["cpu"] = [("cpu.max", f"{_cpu_quota_us(cores)} {CPU_PERIOD_US}")]
        if cpus or mems:
            settings["cpuset"] = ([("cpuset.cpus", format_cpulist(cpus))] if cpus else []) + \
                                 ([("cpuset.mems", format_cpulist(mems))] if mems else [])
        for controller, pairs in settings.items():
            if controller in writable and not _apply(path, controller, pairs):
                _mark_unenforced(unenforced, controller, wanted)
        return V2TaskCgroup(path), unenforced


class V1Cgroups(Cgroups):
    version = 1

    def __init__(self, root: str = DEFAULT_ROOT, parent: str = DEFAULT_PARENT,
                 proc_cgroup: str = "/proc/self/cgroup") -> None:
        super().__init__(root, parent)
        self._own = _own_v1_paths(proc_cgroup)
        # the parent cpuset's cpus and mems, read once by probe(): a new v1 cpuset group
        # starts empty and must be given both before it takes a process
        self._parent_cpuset: dict[str, str] = {}
        self._tracker: str | None = None

    def parent_dir(self, controller: str) -> Path:
        own = self._own.get(controller, "/").lstrip("/")
        return self.root / controller / own / self.parent

    def parent_dirs(self) -> list[Path]:
        return [self.parent_dir(name) for name in (*CONTROLLERS, *TRACKERS)]

    def tracker(self) -> str | None:
        """The hierarchy that holds tasks without limits (cached): the first usable of
        :data:`TRACKERS`, else a writable limit hierarchy (not cpuset: a group there
        must be given CPUs and memory nodes first); None where there is none."""
        if self._tracker is None:
            self._tracker = ""
            for name in TRACKERS:
                try:
                    self.parent_dir(name).mkdir(exist_ok=True)
                except OSError:
                    continue
                self._tracker = name
                break
            else:
                self._tracker = next((name for name in self.probe() if name != "cpuset"), "")
        return self._tracker or None

    def tracks(self) -> bool:
        return self.tracker() is not None

    def freezes(self) -> bool:
        """Whether task groups can be made in the freezer hierarchy (cached through :meth:`tracker`)."""
        return self.tracker() == "freezer"

    def _probe(self) -> list[str]:
        usable = []
        for name in CONTROLLERS:
            parent = self.parent_dir(name)
            try:
                parent.mkdir(exist_ok=True)
                if name == "cpuset":
                    _inherit_cpuset(parent)
                    self._parent_cpuset = {filename: _read(parent / filename).strip()
                                           for filename in CPUSET_FILES}
            except OSError:
                continue
            usable.append(name)
        return usable

    def create(self, name, *, memory, cores, cpus, mems):
        """Groups in the hierarchies of the requested limits only (one per hierarchy costs
        a mkdir, its writes and an rmdir); where that makes none (no limits, or none
        could be set), one group in the :meth:`tracker` hierarchy, which still tracks
        every process of the task."""
        wanted = _requested(memory, cores, cpus, mems)
        writable = self.probe()
        controllers = [controller for controller in wanted if controller in writable]
        settings: dict[str, list[tuple[str, str]]] = {}
        if memory is not None:
            # memsw (RAM+swap) must not be below the RAM limit, hence RAM first
            settings["memory"] = [("memory.limit_in_bytes", str(memory)),
                                  ("memory.memsw.limit_in_bytes?", str(memory))]
        if cores > 0:
            settings["cpu"] = [("cpu.cfs_period_us", str(CPU_PERIOD_US)),
                               ("cpu.cfs_quota_us", str(_cpu_quota_us(cores)))]
        if cpus or mems:
            # both files, always: what the task does not restrict comes from the parent
            settings["cpuset"] = [
                ("cpuset.cpus", format_cpulist(cpus) if cpus else self._parent_cpuset.get("cpuset.cpus", "")),
                ("cpuset.mems", format_cpulist(mems) if mems else self._parent_cpuset.get("cpuset.mems", ""))]
        unenforced = [limit for limit in wanted if limit not in controllers]
        paths: dict[str, Path] = {}
        for controller in controllers:
            path = self.parent_dir(controller) / name
            try:
                path.mkdir(exist_ok=True)
            except OSError:
                _mark_unenforced(unenforced, controller, wanted)
                continue
            if controller in settings and not _apply(path, controller, settings[controller]):
                # a group whose limit did not take is of no use; the task must not join it
                _mark_unenforced(unenforced, controller, wanted)
                _try_rmdir(path)
                continue
            paths[controller] = path
        # the freezer group pauses the task; where there is none, a task without limits
        # still needs one group that tracks it
        tracker = "freezer" if self.freezes() else None if paths else self.tracker()
        if tracker is not None:
            path = self.parent_dir(tracker) / name
            try:
                path.mkdir(exist_ok=True)
                paths[tracker] = path
            except OSError:
                pass
        if not paths:
            return None, unenforced
        return V1TaskCgroup(paths), unenforced


def _mark_unenforced(unenforced: list[str], controller: str, wanted: list[str]) -> None:
    if controller in wanted and controller not in unenforced:
        unenforced.append(controller)


def _try_write(path: Path, value: str) -> None:
    try:
        _write(path, value)
    except OSError:
        pass


def _try_rmdir(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _apply(path: Path, controller: str, pairs: list[tuple[str, str]]) -> bool:
    """Write one controller's files; False when a required one fails (the limit is unenforced).

    A file name ending in ``?`` is optional: written where the kernel has it.
    """
    for filename, value in pairs:
        optional = filename.endswith("?")
        target = path / filename.rstrip("?")
        if optional and not target.exists():
            continue
        try:
            _write(target, value)
        except OSError:
            if not optional:
                return False
    return True


def _inherit_cpuset(path: Path) -> None:
    for filename in CPUSET_FILES:
        if not _read(path / filename).strip():
            _write(path / filename, _read(path.parent / filename).strip())


def _own_v1_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller → this process's cgroup path, from ``/proc/self/cgroup`` lines ``N:ctrl,ctrl:/path``."""
    paths: dict[str, str] = {}
    for line in _read(Path(proc_cgroup)).splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[1]:
            continue
        for controller in parts[1].split(","):
            paths[controller] = parts[2]
    return paths


def open_cgroups(root: str = DEFAULT_ROOT, parent: str = DEFAULT_PARENT) -> Cgroups:
    """The hierarchy mounted at ``root``: v2 if it is unified, else v1 (possibly with nothing usable)."""
    if (Path(root) / "cgroup.controllers").exists():
        return V2Cgroups(root, parent)
    return V1Cgroups(root, parent)
