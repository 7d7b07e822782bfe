"""``--sweep`` and the pool target (``--target any`` or none) through the real CLI."""

from __future__ import annotations

import collections
import time

from harness.local_cluster import Cluster


def test_sweep_of_1000_completes(cluster):
    start = time.perf_counter()
    result = cluster.cli("--wait", "--sweep", "--target", "node1", "--container", "NULL", "--",
                         "true", "span:{1..1000}", timeout=300)
    elapsed = time.perf_counter() - start
    ids = result.stdout.decode().split()
    assert result.returncode == 0, result.stderr.decode()[-500:]
    assert len(ids) == 1000 == len(set(ids))
    assert b"1000/1000 done: 1000 completed, 0 failed" in result.stderr
    print(f"sweep of 1000 `true`: {1000 / elapsed:.0f} tasks/s end to end")


def test_sweep_goes_round_robin_in_order(cluster):
    result = cluster.cli("--wait", "--sweep", "--target", "node1", "--target", "node2", "--",
                         "echo", "span:{3..1}", "span:[a, b]")
    assert result.returncode == 0, result.stderr
    ids = result.stdout.decode().split()
    tasks = [cluster.task(i) for i in ids]
    assert [t["args"] for t in tasks] == [["3", "a"], ["3", "b"], ["2", "a"], ["2", "b"], ["1", "a"], ["1", "b"]]
    assert [t["node"] for t in tasks] == ["node1", "node2"] * 3
    assert len({t["batch_id"] for t in tasks}) == 1


def test_sweep_over_the_cap_is_refused(tmp_path):
    c = Cluster(tmp_path / "c", ["node1"], client={"max_sweep": 10})
    result = c.cli("--sweep", "--target", "node1", "--", "true", "span:{1..11}")
    assert result.returncode == 2 and b"11" in result.stderr and b"max_sweep" in result.stderr
    assert result.stdout == b""


def test_pool_tasks_go_to_whichever_node_has_room(cluster):
    start = time.perf_counter()
    result = cluster.cli("--wait", "--sweep", "--cores", "1", "--", "sh", "-c", "sleep 1", "span:{1..20}",
                         timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr.decode()
    tasks = [cluster.task(i) for i in result.stdout.decode().split()]
    per_node = collections.Counter(t["node"] for t in tasks)
    print(f"20 pool tasks of 1 s on 2 x 2 cores: {elapsed:.1f} s, {dict(per_node)}")
    assert sum(per_node.values()) == 20 and set(per_node) == {"node1", "node2"}
    assert min(per_node.values()) >= 6
    # no node ever ran more than its 2 cores' worth at once
    for node in per_node:
        spans = sorted((t["started_at"], t["finished_at"]) for t in tasks if t["node"] == node)
        for i, (started, _) in enumerate(spans):
            assert sum(1 for s, f in spans[:i] if f > started + 0.05) <= 1
