"""Routing keys: every key Topology builds parses back to what built it, and nothing else parses."""

from __future__ import annotations

import pytest

from hakuriver.topology import NodeKey, TaskKey, Topology, parse_target, target_key


@pytest.mark.parametrize("key, parsed", [
    (Topology.state_key(7), TaskKey(7, "state")),
    (Topology.output_key(2**62, "stdout"), TaskKey(2**62, "stdout")),
    (Topology.output_key(0, "stderr"), TaskKey(0, "stderr")),
    (Topology.heartbeat_key("node1"), NodeKey("node1")),
    (Topology.heartbeat_key("gpu.box-2"), NodeKey("gpu.box-2")),  # dots in a node name survive
])
def test_built_keys_parse_back(key, parsed):
    assert Topology.parse_key(key) == parsed


@pytest.mark.parametrize("key", [
    "", "task", "task.7", "task.7.", "task..state", "task.-7.state", "task.7.stdin", "task.x.state",
    "task.².state", "task.7.state.extra", "node.heartbeat", "node..heartbeat", "node.n1.beat", "nodes.n1.heartbeat",
    "any", "node1",
])
def test_other_keys_are_refused_by_name(key):
    with pytest.raises(ValueError, match="unknown routing key"):
        Topology.parse_key(key)


@pytest.mark.parametrize("node, numa", [("node1", None), ("node1", 0), ("any", None), ("a.b", 3)])
def test_target_keys_parse_back(node, numa):
    assert parse_target(target_key(node, numa)) == (node, numa)
