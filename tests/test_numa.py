"""NUMA topology from sysfs (fake trees) and the kernel's CPU-list notation."""

import os

import psutil
import pytest

from runner.numa import detect_topology, format_cpulist, parse_cpulist, parse_meminfo_total


@pytest.mark.parametrize("text, cpus", [
    ("0", [0]),
    ("0-3", [0, 1, 2, 3]),
    ("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]),
    ("4,1,2", [1, 2, 4]),
    ("0-6:2", [0, 2, 4, 6]),
    ("", []),
])
def test_parse_cpulist(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "0-4:0"])
def test_parse_cpulist_rejects_garbage(text):
    with pytest.raises(ValueError):
        parse_cpulist(text)


@pytest.mark.parametrize("cpus, text", [
    ([0, 1, 2, 3, 8, 9, 10, 11], "0-3,8-11"),
    ([5], "5"),
    ([3, 1, 2, 7], "1-3,7"),
    ([], ""),
])
def test_format_cpulist_round_trips(cpus, text):
    assert format_cpulist(cpus) == text
    assert parse_cpulist(text) == sorted(cpus)


def test_parse_meminfo_total():
    text = "Node 1 MemTotal:        5073100 kB\nNode 1 MemFree:  4278576 kB\n"
    assert parse_meminfo_total(text) == 5073100 * 1024
    with pytest.raises(ValueError):
        parse_meminfo_total("Node 1 MemFree: 1 kB\n")


def _fake_node(root, index, cpulist, mem_kb):
    node = root / f"node{index}"
    node.mkdir()
    (node / "cpulist").write_text(cpulist + "\n")
    (node / "meminfo").write_text(f"Node {index} MemTotal:  {mem_kb} kB\nNode {index} MemFree: 1 kB\n")


def test_detect_topology_from_a_fake_tree(tmp_path):
    _fake_node(tmp_path, 0, "0-3,8-11", 1000)
    _fake_node(tmp_path, 1, "4-7,12-15", 2000)
    _fake_node(tmp_path, 2, "", 4000)  # memory-only node (CXL/HBM)
    (tmp_path / "possible").write_text("0-2\n")  # not a node directory
    (tmp_path / "node3").mkdir()                  # unreadable node: skipped
    nodes = detect_topology(str(tmp_path))
    assert list(nodes) == [0, 1, 2]
    assert nodes[0].cpus == [0, 1, 2, 3, 8, 9, 10, 11]
    assert nodes[1].cpus == [4, 5, 6, 7, 12, 13, 14, 15]
    assert nodes[2].cpus == [] and nodes[2].memory == 4000 * 1024
    assert nodes[1].memory == 2000 * 1024


def test_machine_without_numa_is_one_node_with_everything(tmp_path):
    nodes = detect_topology(str(tmp_path / "missing"))
    assert list(nodes) == [0]
    assert nodes[0].cpus == sorted(os.sched_getaffinity(0))
    assert nodes[0].memory == psutil.virtual_memory().total


def test_this_machine_has_a_topology():
    nodes = detect_topology()
    assert nodes and all(node.memory > 0 for node in nodes.values())
    assert set().union(*(node.cpus for node in nodes.values())) >= set(os.sched_getaffinity(0))
