"""Host-execution limits seen through the real CLI (cgroups on this machine)."""

from __future__ import annotations

import uuid

import pytest

from runner.cgroups import open_cgroups
from runner.numa import detect_topology, format_cpulist


def test_memory_over_the_limit_ends_killed_oom(cluster):
    result = cluster.cli("--wait", "--target", "node1", "--container", "NULL", "--memory", "64M", "--",
                         "python3", "-c", "bytearray(400*2**20)")
    task = cluster.task(result.stdout.decode().strip())
    assert result.returncode == 1
    assert task["state"] == "killed_oom", task


def test_numa_target_runs_on_that_nodes_cpus(cluster):
    result = cluster.cli("--wait", "--target", "node1:0", "--container", "NULL", "--",
                         "grep", "Cpus_allowed_list", "/proc/self/status")
    assert result.returncode == 0, result.stderr
    output = cluster.cli("--stdout", result.stdout.decode().strip()).stdout.decode()
    assert output.split()[-1] == format_cpulist(detect_topology()[0].cpus)


def _everything_enforceable_here() -> bool:
    hierarchy = open_cgroups(parent=f"hk-test-{uuid.uuid4().hex[:8]}")
    try:
        return not hierarchy.unenforceable() and hierarchy.tracks()
    finally:
        hierarchy.remove_parent()


def test_nodes_report_what_they_enforce(cluster):
    if not _everything_enforceable_here():
        pytest.skip("not every cgroup controller is writable here: the nodes rightly list some")
    nodes = cluster.query("--list-nodes")["nodes"]
    assert all("process" in n["executors"] for n in nodes)
    assert all(n["unenforced"] == [] for n in nodes)
