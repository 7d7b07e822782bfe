"""The process executor with real processes and real cgroups (run as root), and its fallbacks."""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from hakuriver.messages import Task
from runner.cgroups import attach
from runner.executors import host
from runner.executors.base import Handle, RunSpec, StartFailed
from runner.executors.host import HostProcesses, base_environment
from runner.executors.process import FROZEN_BY_CGROUP, STOPPED_BY_SIGNAL, ProcessExecutor
from runner.numa import detect_topology, format_cpulist

MiB = 1 << 20


@pytest.fixture
def executor():
    executor = ProcessExecutor(cgroup_parent=f"hk-test-{uuid.uuid4().hex[:8]}")
    yield executor
    executor.cgroups.remove_parent()
    assert not any(path.exists() for path in executor.cgroups.parent_dirs()), "a task cgroup was left behind"


@pytest.fixture
def fallback(tmp_path):
    """An executor whose cgroup root has no controllers: nothing can be enforced by cgroup."""
    root = tmp_path / "no-cgroups"
    root.mkdir()
    return ProcessExecutor(cgroup_root=str(root), cgroup_parent="hk-test")


def _need(executor, *controllers):
    missing = [name for name in controllers if name not in executor.cgroups.probe()]
    if missing:
        pytest.skip(f"cgroup controllers {missing} are not writable here")


def _need_tracking(executor):
    if not executor.cgroups.tracks():
        pytest.skip("no cgroup can be made here (not root?): tasks cannot be tracked")


_ids = iter(range(1, 10**6))


def _task(command, *args, **limits):
    return Task(task_id=int(time.time() * 1000) * 1000 + next(_ids), batch_id=1, command=command,
                args=list(args), target="test", **limits)


def _spec(tmp_path, **kwargs):
    return RunSpec(env={}, stdout_path=tmp_path / "stdout", stderr_path=tmp_path / "stderr",
                   local_temp_dir=str(tmp_path / "local"), **kwargs)


def _marker():
    return f"300.{uuid.uuid4().int % 10**6:06d}"


def _processes_with(marker):
    """Live processes with ``marker`` as an argument, once exec'd (not the cgroup-joining shell)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if marker in cmdline and "hakuriver-join" not in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def _cgroup_dirs(handle):
    group = attach(handle.data["cgroup"]) if handle.data.get("cgroup") else None
    return group.dirs() if group else []


async def _until(predicate, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def _run(executor, task, spec):
    handle = await executor.start(task, spec)
    try:
        return handle, await asyncio.wait_for(executor.wait(handle), 60)
    finally:
        await executor.destroy(handle)


async def test_output_goes_to_the_files_and_the_cgroup_is_removed(executor, tmp_path):
    handle, outcome = await _run(executor, _task("sh", "-c", "echo out; echo err >&2; exit 3"), _spec(tmp_path))
    assert outcome.exit_code == 3 and not outcome.oom
    assert (tmp_path / "stdout").read_bytes() == b"out\n"
    assert (tmp_path / "stderr").read_bytes() == b"err\n"
    assert handle.data["pid"] > 0
    assert not any(path.exists() for path in _cgroup_dirs(handle))


async def test_environment_and_cwd_reach_the_task(executor, tmp_path):
    spec = _spec(tmp_path, cwd=str(tmp_path))
    spec.env["HK_PROBE"] = "value with spaces"
    _, outcome = await _run(executor, _task("sh", "-c", 'printf "%s|%s" "$HK_PROBE" "$(pwd)"'), spec)
    assert outcome.exit_code == 0
    assert (tmp_path / "stdout").read_text() == f"value with spaces|{tmp_path}"


async def test_a_task_gets_the_base_environment_its_own_variables_and_its_own_directory(
        executor, tmp_path, monkeypatch):
    monkeypatch.setenv("HK_RUNNER_SECRET", "must-not-leak")
    monkeypatch.setenv("HAKURIVER_BROKER_URL", "amqp://runner:password@broker/")
    spec = _spec(tmp_path)
    spec.env.update(HAKURIVER_TASK_ID="42", USER_VAR="from --env")
    task = _task("sh", "-c", 'pwd; ls -A; echo; env -0')
    handle = await executor.start(task, spec)
    workdir = tmp_path / "local" / f"task-{task.task_id}"
    assert workdir.is_dir()
    assert (await asyncio.wait_for(executor.wait(handle), 60)).exit_code == 0
    await executor.destroy(handle)
    where, listing, env_text = (tmp_path / "stdout").read_text().split("\n", 2)
    assert where == str(workdir) and listing == ""  # an empty directory of its own
    env = dict(item.split("=", 1) for item in env_text.lstrip("\n").split("\0") if item)
    env.pop("SHLVL", None)  # the shell's own
    assert env == {**base_environment(), "PWD": str(workdir), "HAKURIVER_TASK_ID": "42", "USER_VAR": "from --env"}
    assert set(base_environment()) == {"PATH", "HOME", "USER", "LOGNAME", "LANG"}
    assert not workdir.exists(), "the working directory is removed when the task ends"


async def test_what_a_task_leaves_in_its_directory_is_removed_when_it_ends(executor, tmp_path):
    task = _task("sh", "-c", "mkdir -p sub/deeper && echo data > sub/deeper/file && echo top > file")
    handle, outcome = await _run(executor, task, _spec(tmp_path))
    assert outcome.exit_code == 0
    assert handle.data["workdir"] == str(tmp_path / "local" / f"task-{task.task_id}")
    assert not (tmp_path / "local" / f"task-{task.task_id}").exists()
    assert (tmp_path / "local").is_dir()  # local temp itself stays


async def test_the_users_env_wins_over_the_base(executor, tmp_path):
    spec = _spec(tmp_path)
    spec.env.update(PATH=f"{tmp_path}/bin:/usr/bin:/bin", LANG="de_DE.UTF-8")
    _, outcome = await _run(executor, _task("sh", "-c", 'printf "%s|%s" "$PATH" "$LANG"'), spec)
    assert outcome.exit_code == 0
    assert (tmp_path / "stdout").read_text() == f"{tmp_path}/bin:/usr/bin:/bin|de_DE.UTF-8"


@pytest.mark.parametrize("kind", ["tracked", "untracked"])
async def test_a_script_without_a_shebang_runs_with_sh_either_way(executor, fallback, tmp_path, kind):
    """Both start paths (the cgroup-joining shell; a direct spawn) run it as execvp does."""
    chosen = executor if kind == "tracked" else fallback
    if kind == "tracked":
        _need_tracking(executor)
    script = tmp_path / "no-shebang"
    script.write_text('echo "ran as sh: $0 $1"\n')
    script.chmod(0o755)
    handle, outcome = await _run(chosen, _task(str(script), "arg"), _spec(tmp_path))
    assert (handle.data["cgroup"] is not None) is (kind == "tracked")
    assert outcome.exit_code == 0, (tmp_path / "stderr").read_text()
    assert (tmp_path / "stdout").read_text() == f"ran as sh: {script} arg\n"


async def test_unknown_command_fails_to_start_and_leaves_nothing(executor, tmp_path):
    task = _task("hk-no-such-command-xyz")
    with pytest.raises(StartFailed, match="command not found"):
        await executor.start(task, _spec(tmp_path))
    with pytest.raises(StartFailed, match="command not found"):
        await executor.start(_task("./missing-script"), _spec(tmp_path, cwd=str(tmp_path)))
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    with pytest.raises(StartFailed, match="permission denied"):
        await executor.start(_task("./not-executable"), _spec(tmp_path, cwd=str(tmp_path)))
    assert not any((parent / str(task.task_id)).exists() for parent in executor.cgroups.parent_dirs())
    assert not (tmp_path / "local" / f"task-{task.task_id}").exists()


async def test_a_signal_death_is_128_plus_the_signal(executor, tmp_path):
    _, outcome = await _run(executor, _task("sh", "-c", "kill -TERM $$"), _spec(tmp_path))
    assert outcome.exit_code == 143 and not outcome.oom


async def test_memory_over_the_limit_is_oom(executor, tmp_path):
    _need(executor, "memory")
    task = _task(sys.executable, "-c", "bytearray(400 * 2**20)", memory=64 * MiB)
    handle, outcome = await _run(executor, task, _spec(tmp_path))
    assert handle.unenforced == []
    assert outcome.oom is True
    assert outcome.exit_code == 137
    assert str(64 * MiB) in outcome.message


async def test_sigkill_without_the_limit_hit_is_not_oom(executor, tmp_path):
    _need(executor, "memory")
    _, outcome = await _run(executor, _task("sh", "-c", "kill -KILL $$", memory=64 * MiB), _spec(tmp_path))
    assert outcome.exit_code == 137 and outcome.oom is False


async def test_one_core_quota_is_shared_by_two_busy_processes(executor, tmp_path):
    _need(executor, "cpu")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to tell 1 core from 2")
    task = _task("sh", "-c", "while :; do :; done & while :; do :; done", cores=1)
    handle = await executor.start(task, _spec(tmp_path))
    try:
        group = attach(handle.data["cgroup"])
        await _until(lambda: len(group.pids()) == 2)
        procs = [psutil.Process(pid) for pid in group.pids()]

        def cpu_seconds():
            return sum(sum(proc.cpu_times()[:2]) for proc in procs)

        cpu_before, wall_before = cpu_seconds(), time.monotonic()
        await asyncio.sleep(2.0)  # a measuring window, not synchronisation
        cores_used = (cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
        # unlimited, two busy loops would use 2 cores; the quota allows 1
        assert cores_used < 1.35, cores_used
        if cores_used < 0.5:  # the quota's value itself: test_limits_are_written_to_the_kernel_files
            pytest.skip(f"the machine is too busy to tell: the task got {cores_used:.2f} of a core")
    finally:
        await executor.stop(handle, grace=1)
        await executor.destroy(handle)


async def test_numa_node_target_runs_on_that_nodes_cpus(executor, tmp_path):
    node = detect_topology()[0]
    await _expect_cpus(executor, tmp_path, node.cpus, [0])


async def test_a_cpu_subset_is_enforced(executor, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[:1]
    handle = await _expect_cpus(executor, tmp_path, cpus, [0])
    if "cpuset" in executor.cgroups.probe():
        assert handle.data["cgroup"] and "cpuset" not in handle.unenforced


async def test_affinity_is_the_fallback_without_a_cpuset(fallback, tmp_path):
    cpus = sorted(os.sched_getaffinity(0))[-1:]
    handle = await _expect_cpus(fallback, tmp_path, cpus, [0])
    assert handle.unenforced == []  # one memory node here: nothing to bind memory to


async def _expect_cpus(executor, tmp_path, cpus, mems):
    marker = _marker()
    handle = await executor.start(_task("sleep", marker), _spec(tmp_path, cpus=cpus, mems=mems))
    try:
        # start returns once the trampoline runs; the limits hold from the exec of the command on
        await _until(lambda: _processes_with(marker) == [handle.data["pid"]])
        status = Path(f"/proc/{handle.data['pid']}/status").read_text()
        allowed = next(line.split(":", 1)[1].strip() for line in status.splitlines()
                       if line.startswith("Cpus_allowed_list"))
        assert allowed == format_cpulist(cpus)
        return handle
    finally:
        await executor.stop(handle, grace=1)
        await executor.destroy(handle)


async def test_stop_reaches_every_process_and_destroy_removes_the_cgroup(executor, tmp_path):
    _need_tracking(executor)
    marker = _marker()
    # setsid: one sleep leaves the process group; only the cgroup still knows it
    script = f"sleep {marker} & setsid sleep {marker} & sleep {marker}; wait"
    handle = await executor.start(_task("sh", "-c", script), _spec(tmp_path))
    await _until(lambda: len(_processes_with(marker)) == 3)
    await executor.stop(handle, grace=5)
    outcome = await asyncio.wait_for(executor.wait(handle), 10)
    assert outcome.exit_code == 143 and not outcome.oom
    await executor.destroy(handle)
    assert _processes_with(marker) == []
    assert not any(path.exists() for path in _cgroup_dirs(handle))


async def test_stop_escalates_to_sigkill_after_the_grace(executor, tmp_path):
    marker = _marker()
    # an ignored SIGTERM stays ignored across exec, so the sleep ignores it too
    handle = await executor.start(_task("sh", "-c", f"trap '' TERM; sleep {marker}"), _spec(tmp_path))
    await _until(lambda: _processes_with(marker))
    started = time.monotonic()
    await executor.stop(handle, grace=0.3)
    outcome = await asyncio.wait_for(executor.wait(handle), 10)
    assert time.monotonic() - started >= 0.3
    assert outcome.exit_code == 137 and not outcome.oom
    await executor.destroy(handle)
    await _until(lambda: not _processes_with(marker))


async def test_recover_kills_what_is_left_and_reports_lost(executor, tmp_path):
    marker = _marker()
    handle = await executor.start(_task("sh", "-c", f"sleep {marker} & sleep {marker}; wait"), _spec(tmp_path))
    await _until(lambda: len(_processes_with(marker)) == 2)
    stored = Handle.from_dict(handle.to_dict())
    restarted = ProcessExecutor(cgroup_parent=executor.cgroups.parent)
    assert await restarted.recover(stored, _spec(tmp_path)) is None
    await _until(lambda: not _processes_with(marker))
    assert not any(path.exists() for path in _cgroup_dirs(handle))
    await asyncio.wait_for(executor.wait(handle), 10)
    await executor.destroy(handle)


async def test_without_cgroups_the_task_runs_and_says_what_is_unenforced(fallback, tmp_path):
    assert fallback.unenforceable() == ["memory", "cpu", "tracking"]
    task = _task("sh", "-c", "echo ran", memory=64 * MiB, cores=1)
    handle, outcome = await _run(fallback, task, _spec(tmp_path, cpus=[0], mems=[0]))
    assert outcome.exit_code == 0
    assert (tmp_path / "stdout").read_text() == "ran\n"
    assert handle.unenforced == ["memory", "cpu"]
    assert handle.data["cgroup"] is None


async def test_without_a_cpuset_memory_binding_is_unenforced_on_multi_node_machines(tmp_path):
    sys_nodes = tmp_path / "nodes"
    for index in (0, 1):
        (sys_nodes / f"node{index}").mkdir(parents=True)
        (sys_nodes / f"node{index}" / "cpulist").write_text(str(index))
        (sys_nodes / f"node{index}" / "meminfo").write_text(f"Node {index} MemTotal: 1024 kB\n")
    executor = ProcessExecutor(cgroup_root=str(tmp_path / "none"), sys_node_root=str(sys_nodes))
    assert executor.unenforceable() == ["memory", "cpu", "numa-memory", "tracking"]
    cpus = sorted(os.sched_getaffinity(0))[:1]
    handle, outcome = await _run(executor, _task("true"), _spec(tmp_path, cpus=cpus, mems=[0]))
    assert outcome.exit_code == 0
    assert handle.unenforced == ["numa-memory"]


async def test_inspect_lists_the_tasks_processes(executor, tmp_path):
    _need_tracking(executor)
    marker = _marker()
    handle = await executor.start(_task("sleep", marker), _spec(tmp_path))
    try:
        await _until(lambda: _processes_with(marker) == [handle.data["pid"]])
        info = await executor.inspect(handle)
        assert info["running"] is True
        assert info["pids"] == [handle.data["pid"]]
        assert info["oom_kills"] == 0
    finally:
        await executor.stop(handle, grace=1)
        await executor.destroy(handle)


def _cgroup2_mount():
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return fields[1]
    return None


async def test_on_a_v2_hierarchy_the_cgroup_tracks_and_kills_the_whole_task(tmp_path):
    """Run on whatever cgroup2 mount exists (on hybrid v1 machines: one without controllers)."""
    mount = _cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    executor = ProcessExecutor(cgroup_root=mount, cgroup_parent=f"hk-test-{uuid.uuid4().hex[:8]}")
    marker = _marker()
    handle = await executor.start(_task("sh", "-c", f"setsid sleep {marker} & sleep {marker}"), _spec(tmp_path))
    try:
        if handle.data["cgroup"] is None:
            pytest.skip(f"{mount} is not writable here")
        assert handle.data["cgroup"]["version"] == 2
        await _until(lambda: len(_processes_with(marker)) == 2)
        # the shell and both sleeps, also the one that left the session
        assert set((await executor.inspect(handle))["pids"]) == {handle.data["pid"], *_processes_with(marker)}
        await executor.stop(handle, grace=5)
        assert (await asyncio.wait_for(executor.wait(handle), 10)).exit_code == 143
        await executor.destroy(handle)
        assert _processes_with(marker) == []
        assert not any(path.exists() for path in _cgroup_dirs(handle))
    finally:
        await executor.destroy(handle)
        executor.cgroups.remove_parent()
    assert not any(path.exists() for path in executor.cgroups.parent_dirs())


async def test_a_task_without_limits_is_tracked_so_processes_that_left_its_group_end_with_it(executor, tmp_path):
    """`setsid` leaves the task's session and process group; its cgroup still holds it."""
    _need_tracking(executor)
    marker = _marker()
    task = _task("sh", "-c", f"setsid sleep {marker} & echo started")
    handle = await executor.start(task, _spec(tmp_path))
    try:
        assert handle.data["cgroup"] is not None and handle.unenforced == []
        assert (await asyncio.wait_for(executor.wait(handle), 60)).exit_code == 0
        await _until(lambda: _processes_with(marker))  # the task ended; its escaped child runs on
        assert set(attach(handle.data["cgroup"]).pids()) >= set(_processes_with(marker))
    finally:
        await executor.destroy(handle)
    assert _processes_with(marker) == []
    assert not any(path.exists() for path in _cgroup_dirs(handle))


async def test_a_kill_of_a_task_without_limits_reaches_processes_that_left_its_group(executor, tmp_path):
    _need_tracking(executor)
    marker = _marker()
    handle = await executor.start(_task("sh", "-c", f"setsid sleep {marker} & sleep {marker}"), _spec(tmp_path))
    await _until(lambda: len(_processes_with(marker)) == 2)
    await executor.stop(handle, grace=5)
    assert (await asyncio.wait_for(executor.wait(handle), 10)).exit_code == 143
    await _until(lambda: not _processes_with(marker))  # stop alone, before destroy
    await executor.destroy(handle)


@pytest.mark.parametrize("limits, controllers", [
    ({"cores": 1}, ["cpu"]),
    ({"memory": 64 * MiB}, ["memory"]),
    ({"cpus": "first", "mems": [0]}, ["cpuset"]),
])
async def test_a_task_gets_groups_only_for_the_limits_it_has(executor, tmp_path, limits, controllers):
    """... and one in the freezer hierarchy where it is mounted, which pauses it (--pause)."""
    if executor.cgroups.version != 1:
        pytest.skip("one group per controller exists only on cgroup v1")
    _need(executor, *controllers)
    spec_fields = {}
    if "cpus" in limits:
        spec_fields = {"cpus": sorted(os.sched_getaffinity(0))[:1], "mems": limits.pop("mems")}
        limits.pop("cpus")
    handle, outcome = await _run(executor, _task("true", **limits), _spec(tmp_path, **spec_fields))
    assert outcome.exit_code == 0 and handle.unenforced == []
    freezer = ["freezer"] if executor.cgroups.freezes() else []
    assert sorted(handle.data["cgroup"]["paths"]) == sorted(controllers + freezer)


async def test_on_v1_a_task_without_limits_is_tracked_in_one_group_of_a_tracking_hierarchy(executor, tmp_path):
    if executor.cgroups.version != 1:
        pytest.skip("hierarchies per controller exist only on cgroup v1")
    _need_tracking(executor)
    handle, outcome = await _run(executor, _task("true"), _spec(tmp_path))
    assert outcome.exit_code == 0 and handle.unenforced == []
    assert list(handle.data["cgroup"]["paths"]) == [executor.cgroups.tracker()]


def test_a_found_command_is_looked_up_again_once_it_is_gone(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    command = f"hk-probe-{uuid.uuid4().hex[:8]}"
    assert host.find_on_path(command, str(bin_dir)) is None
    tool = bin_dir / command
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert host.find_on_path(command, str(bin_dir)) == str(tool)  # a miss was not remembered
    assert host.find_on_path(command, str(bin_dir)) == str(tool)  # from the cache
    tool.unlink()
    assert host.find_on_path(command, str(bin_dir)) is None
    with pytest.raises(StartFailed, match="command not found"):
        HostProcesses().check(_task(command), RunSpec(env={"PATH": str(bin_dir)}, stdout_path=tmp_path / "o",
                                                      stderr_path=tmp_path / "e"))


def test_create_time_is_psutils_value_and_none_for_no_process():
    for pid in (1, os.getpid()):
        assert host.create_time(pid) == psutil.Process(pid).create_time()
    assert host.create_time(2**22 + 1) is None  # above the kernel's largest pid


def _pidfd_works():
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    return True


def test_the_fast_child_watcher_reaps_children():
    # in a fresh interpreter: the watcher is process-wide
    script = ("import asyncio, json, sys; from runner.executors.process import use_fast_child_watcher\n"
              "installed = use_fast_child_watcher()\n"
              "async def main():\n"
              "    procs = [await asyncio.create_subprocess_exec('sh', '-c', f'exit {n}') for n in range(5)]\n"
              "    codes = [await proc.wait() for proc in procs]\n"
              "    watcher = (type(asyncio.get_event_loop_policy().get_child_watcher()).__name__\n"
              "               if sys.version_info < (3, 12) else None)\n"
              "    print(json.dumps([installed, codes, watcher]))\n"
              "asyncio.run(main())\n")
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", script],
                            capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    installed, codes, watcher = json.loads(result.stdout)
    assert codes == [0, 1, 2, 3, 4]
    if sys.version_info >= (3, 12):
        assert installed is False  # asyncio uses pidfds by itself there
    elif _pidfd_works():
        assert installed is True and watcher == "PidfdChildWatcher"
    else:
        assert installed is False and watcher != "PidfdChildWatcher"


async def test_without_a_freezer_a_pause_stops_the_process_group_and_says_so(fallback, tmp_path):
    """No cgroup: SIGSTOP/SIGCONT to the task's process group, named in what pause returns;
    a stop of the stopped task still ends it at once (SIGCONT follows the signal)."""
    marker = _marker()
    handle = await fallback.start(_task("sh", "-c", f"sleep {marker} & sleep {marker}; wait"), _spec(tmp_path))
    try:
        await _until(lambda: len(_processes_with(marker)) == 2)
        assert await fallback.pause(handle) == STOPPED_BY_SIGNAL
        await _until(lambda: all(psutil.Process(pid).status() == psutil.STATUS_STOPPED
                                 for pid in _processes_with(marker)))
        assert "SIGCONT" in await fallback.resume(handle)
        await _until(lambda: all(psutil.Process(pid).status() != psutil.STATUS_STOPPED
                                 for pid in _processes_with(marker)))
        await fallback.pause(handle)
        await fallback.stop(handle, grace=5)
        assert (await asyncio.wait_for(fallback.wait(handle), 10)).exit_code == 143
    finally:
        await fallback.destroy(handle)
    assert _processes_with(marker) == []


async def test_a_frozen_task_is_stopped_at_once_by_a_stop(executor, tmp_path):
    _need_tracking(executor)
    if not await _can_freeze(executor):
        pytest.skip("no cgroup freezer here")
    marker = _marker()
    handle = await executor.start(_task("sh", "-c", f"setsid sleep {marker} & sleep {marker}; wait"), _spec(tmp_path))
    try:
        await _until(lambda: len(_processes_with(marker)) == 2)
        assert await executor.pause(handle) == FROZEN_BY_CGROUP
        await executor.stop(handle, grace=30)   # a frozen group would hold SIGTERM back for the whole grace
        assert (await asyncio.wait_for(executor.wait(handle), 10)).exit_code == 143
        await _until(lambda: not _processes_with(marker))
    finally:
        await executor.destroy(handle)


async def _can_freeze(executor) -> bool:
    group, _ = executor.cgroups.create("probe-freeze", memory=None, cores=0, cpus=None, mems=None)
    if group is None:
        return False
    try:
        return group.can_freeze()
    finally:
        await group.remove()
