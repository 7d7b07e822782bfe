"""Task cgroups on this machine's real hierarchy (as root), and the parts that need no kernel."""

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from runner.cgroups import (CONTROLLERS, TRACKERS, V1Cgroups, V1TaskCgroup, V2Cgroups, V2TaskCgroup, attach,
                            open_cgroups)
from runner.executors.process import JOIN_SCRIPT, SHELL

MiB = 1 << 20


@pytest.fixture
def cgroups():
    hierarchy = open_cgroups(parent=f"hk-test-{uuid.uuid4().hex[:8]}")
    yield hierarchy
    hierarchy.remove_parent()
    assert not any(path.exists() for path in hierarchy.parent_dirs()), "test left a cgroup behind"


def _need(hierarchy, *controllers):
    missing = [name for name in controllers if name not in hierarchy.probe()]
    if missing:
        pytest.skip(f"cgroup controllers {missing} are not writable here")


def _join_and_run(group, *argv):
    """A child that joins ``group`` before exec'ing ``argv``, as the process executor starts tasks."""
    procs = [str(path) for path in group.procs_files()]
    return subprocess.Popen([SHELL, "-c", JOIN_SCRIPT, "hakuriver-join", str(len(procs)), *procs, *argv],
                            start_new_session=True)


async def _until(predicate, timeout=10.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_what_probe_reports_writable_takes_a_limit_and_the_rest_is_unenforced(cgroups):
    writable = cgroups.probe()
    if not writable:
        pytest.skip("no cgroup controller is writable here (not root?)")
    assert set(writable) <= set(CONTROLLERS)
    assert cgroups.unenforceable() == [name for name in CONTROLLERS if name not in writable]
    cpu = sorted(os.sched_getaffinity(0))[0]
    limits = {"memory": {"memory": 64 * MiB}, "cpu": {"cores": 1}, "cpuset": {"cpus": [cpu], "mems": [0]}}
    for name in writable:
        group, unenforced = cgroups.create(f"probe-{name}", **{"memory": None, "cores": 0, "cpus": None,
                                                               "mems": None, **limits[name]})
        try:
            assert unenforced == [], name
        finally:
            assert await group.remove()


async def test_limits_are_written_to_the_kernel_files(cgroups):
    _need(cgroups, "memory", "cpu", "cpuset")
    cpu = sorted(os.sched_getaffinity(0))[0]
    group, unenforced = cgroups.create("limits", memory=64 * MiB, cores=0.5, cpus=[cpu], mems=[0])
    try:
        assert unenforced == []
        if isinstance(group, V1TaskCgroup):
            assert (group.paths["memory"] / "memory.limit_in_bytes").read_text().strip() == str(64 * MiB)
            assert (group.paths["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert (group.paths["cpu"] / "cpu.cfs_period_us").read_text().strip() == "100000"
            assert (group.paths["cpuset"] / "cpuset.cpus").read_text().strip() == str(cpu)
        else:
            assert (group.path / "memory.max").read_text().strip() == str(64 * MiB)
            assert (group.path / "cpu.max").read_text().split() == ["50000", "100000"]
            assert (group.path / "cpuset.cpus").read_text().strip() == str(cpu)
    finally:
        assert await group.remove()
    assert not group.exists()


async def test_join_list_kill_and_remove(cgroups):
    group, _ = cgroups.create("members", memory=None, cores=0, cpus=None, mems=None)
    if group is None:
        pytest.skip("no cgroup hierarchy is writable here")
    marker = f"300.{uuid.uuid4().int % 10**6}"
    child = _join_and_run(group, "/bin/sh", "-c", f"sleep {marker} & sleep {marker}; wait")
    try:
        await _until(lambda: len(group.pids()) == 3)  # the shell and its two sleeps
        assert child.pid in group.pids()
        assert attach(group.to_data()).pids() == group.pids()
        group.kill()
        await _until(lambda: not group.pids())
        assert await group.remove()
        assert not group.exists()
    finally:
        child.kill()
        child.wait()
        await group.remove()


async def test_remove_kills_what_is_still_inside(cgroups):
    group, _ = cgroups.create("busy", memory=None, cores=0, cpus=None, mems=None)
    if group is None:
        pytest.skip("no cgroup hierarchy is writable here")
    child = _join_and_run(group, "sleep", "300")
    try:
        await _until(lambda: child.pid in group.pids())
        assert await group.remove(timeout=5)
        assert child.wait(timeout=5) == -9
    finally:
        child.kill()
        child.wait()


async def test_oom_is_counted_by_the_kernel(cgroups):
    _need(cgroups, "memory")
    group, unenforced = cgroups.create("oom", memory=64 * MiB, cores=0, cpus=None, mems=None)
    try:
        assert "memory" not in unenforced
        child = _join_and_run(group, sys.executable, "-c", "bytearray(400 * 2**20)")
        assert await asyncio.to_thread(child.wait, 30) == -9
        assert group.oom_kills() >= 1
    finally:
        assert await group.remove()


async def test_a_group_within_its_limit_counts_no_oom(cgroups):
    _need(cgroups, "memory")
    group, _ = cgroups.create("no-oom", memory=256 * MiB, cores=0, cpus=None, mems=None)
    try:
        child = _join_and_run(group, sys.executable, "-c", "bytearray(16 * 2**20)")
        assert await asyncio.to_thread(child.wait, 30) == 0
        assert group.oom_kills() == 0
    finally:
        assert await group.remove()


def test_a_root_without_controllers_enforces_nothing(tmp_path):
    hierarchy = open_cgroups(root=str(tmp_path), parent="hk-test")
    assert isinstance(hierarchy, V1Cgroups)
    assert hierarchy.probe() == []
    assert hierarchy.unenforceable() == ["memory", "cpu", "cpuset"]
    group, unenforced = hierarchy.create("1", memory=MiB, cores=1, cpus=[0], mems=[0])
    assert group is None
    assert unenforced == ["memory", "cpu", "cpuset"]
    group, unenforced = hierarchy.create("2", memory=None, cores=0, cpus=None, mems=None)
    assert group is None and unenforced == []
    assert not hierarchy.tracks()


def test_v1_groups_nest_under_the_runners_own_cgroup(tmp_path):
    proc_cgroup = tmp_path / "cgroup"
    proc_cgroup.write_text("4:memory:/outer/inner\n3:cpu,cpuacct:/\n2:cpuset:/\n0::/\n")
    hierarchy = V1Cgroups(root="/sys/fs/cgroup", parent="hk", proc_cgroup=str(proc_cgroup))
    assert hierarchy.parent_dir("memory") == Path("/sys/fs/cgroup/memory/outer/inner/hk")
    assert hierarchy.parent_dir("cpu") == Path("/sys/fs/cgroup/cpu/hk")
    assert hierarchy.parent_dir("cpuset") == Path("/sys/fs/cgroup/cpuset/hk")


def test_unified_root_is_detected_and_unusable_controllers_are_reported(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    hierarchy = open_cgroups(root=str(tmp_path), parent="hk")
    assert isinstance(hierarchy, V2Cgroups)
    # a plain directory takes no subtree_control writes, so nothing is delegated
    assert hierarchy.probe() == []
    group, unenforced = hierarchy.create("7", memory=MiB, cores=2, cpus=None, mems=None)
    assert isinstance(group, V2TaskCgroup) and group.path == tmp_path / "hk" / "7"
    assert unenforced == ["memory", "cpu"]
    assert hierarchy.tracks()  # a group of its own, without limits, still holds the whole task
    group, unenforced = hierarchy.create("8", memory=None, cores=0, cpus=None, mems=None)
    assert group.path == tmp_path / "hk" / "8" and group.path.is_dir() and unenforced == []


def test_v2_oom_count_comes_from_memory_events(tmp_path):
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n")
    assert V2TaskCgroup(tmp_path).oom_kills() == 1
    assert V2TaskCgroup(tmp_path / "gone").oom_kills() == 0


def test_v1_oom_count_falls_back_to_failcnt_on_old_kernels(tmp_path):
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    (tmp_path / "memory.failcnt").write_text("3\n")
    assert V1TaskCgroup({"memory": tmp_path}).oom_kills() == 1
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert V1TaskCgroup({"memory": tmp_path}).oom_kills() == 0
    assert V1TaskCgroup({"cpu": tmp_path}).oom_kills() == 0


def test_handle_data_round_trips():
    v1 = V1TaskCgroup({"memory": Path("/a/memory/x"), "cpu": Path("/a/cpu/x")})
    assert attach(v1.to_data()).paths == v1.paths
    v2 = V2TaskCgroup(Path("/a/hk/x"))
    assert attach(v2.to_data()).path == v2.path
    assert attach({}) is None


async def test_a_v1_cpuset_group_takes_what_the_task_leaves_open_from_the_parent(cgroups):
    if not isinstance(cgroups, V1Cgroups):
        pytest.skip("v1 only: a new v1 cpuset group starts empty")
    _need(cgroups, "cpuset")
    cpu = sorted(os.sched_getaffinity(0))[0]
    group, unenforced = cgroups.create("cpus-only", memory=None, cores=0, cpus=[cpu], mems=None)
    try:
        assert unenforced == [] and list(group.paths) == ["cpuset", *(["freezer"] if cgroups.freezes() else [])]
        parent_mems = (cgroups.parent_dir("cpuset") / "cpuset.mems").read_text().strip()
        assert (group.paths["cpuset"] / "cpuset.mems").read_text().strip() == parent_mems
        assert (group.paths["cpuset"] / "cpuset.cpus").read_text().strip() == str(cpu)
        child = _join_and_run(group, "true")  # an empty cpuset would refuse the join (exit 125)
        assert await asyncio.to_thread(child.wait, 30) == 0
    finally:
        assert await group.remove()


async def test_a_cpuset_that_cannot_be_written_leaves_no_cpuset_group_but_still_tracks(cgroups):
    if not isinstance(cgroups, V1Cgroups):
        pytest.skip("v1 only")
    _need(cgroups, "cpuset")
    group, unenforced = cgroups.create("bad-cpus", memory=None, cores=0, cpus=[4095], mems=None)
    try:
        assert unenforced == ["cpuset"]
        assert not (cgroups.parent_dir("cpuset") / "bad-cpus").exists()
        assert list(group.paths) == [cgroups.tracker()]
    finally:
        assert await group.remove()


async def test_v1_tracks_a_task_without_limits_in_the_cheapest_process_only_hierarchy(cgroups):
    if not isinstance(cgroups, V1Cgroups):
        pytest.skip("v1 only")
    if not cgroups.tracks():
        pytest.skip("no v1 hierarchy is writable here")
    group, unenforced = cgroups.create("plain", memory=None, cores=0, cpus=None, mems=None)
    try:
        assert unenforced == [] and list(group.paths) == [cgroups.tracker()]
        usable = [name for name in TRACKERS if (cgroups.root / name).is_dir()]
        if usable:  # the freezer where mounted (it also pauses), else pids, else cpuacct
            assert cgroups.tracker() == usable[0]
    finally:
        assert await group.remove()


def test_v1_without_a_process_only_hierarchy_tracks_in_a_limit_one(tmp_path):
    (tmp_path / "memory").mkdir()  # a plain directory takes the parent's mkdir like a hierarchy
    hierarchy = V1Cgroups(root=str(tmp_path), parent="hk", proc_cgroup=str(tmp_path / "none"))
    assert hierarchy.tracker() == "memory" and hierarchy.tracks()
    group, unenforced = hierarchy.create("9", memory=None, cores=0, cpus=None, mems=None)
    assert unenforced == [] and group.paths == {"memory": tmp_path / "memory" / "hk" / "9"}


async def test_a_v1_task_with_limits_gets_a_freezer_group_and_freezing_stops_all_of_it(cgroups):
    """Every task can be paused where the freezer is mounted, also one with limits (which
    otherwise needs no process-only group); a frozen group's processes stop, and a kill
    of a frozen group still ends them (the kill thaws it)."""
    if not isinstance(cgroups, V1Cgroups) or not cgroups.freezes():
        pytest.skip("v1 with a writable freezer hierarchy only")
    _need(cgroups, "memory")
    group, unenforced = cgroups.create("freeze", memory=64 * MiB, cores=0, cpus=None, mems=None)
    try:
        assert unenforced == [] and sorted(group.paths) == ["freezer", "memory"] and group.can_freeze()
        child = _join_and_run(group, "sh", "-c", "sleep 60 & sleep 60; wait")
        await _until(lambda: len(group.pids()) == 3)
        await group.freeze()
        assert (group.paths["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
        group.kill()
        await _until(lambda: not group.pids())
        assert await asyncio.to_thread(child.wait, 30) == -signal.SIGKILL
    finally:
        assert await group.remove()
