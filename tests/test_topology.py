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


@pytest.mark.parametrize("node, numa, gpus", [("node1", None, None), ("node1", 0, None), ("any", None, None),
                                             ("a.b", 3, None), ("node1", None, (0, 1)), ("node1", 1, (3,))])
def test_target_keys_parse_back(node, numa, gpus):
    assert parse_target(target_key(node, numa, gpus)) == (node, numa, gpus)


def test_gpu_ids_are_not_part_of_the_routing_key():
    assert target_key("node1", 1) == "node1:1"
    assert target_key("node1", None, (0, 1)) == "node1::0,1"


@pytest.mark.parametrize("text, says", [
    ("node1::", "GPU ids"), ("node1::a", "GPU ids"), ("node1::0,,1", "GPU ids"), ("node1::-1", "GPU ids"),
    ("node1::0,0", "GPU 0 given twice"), ("node1:::0", "invalid target"), ("any::0", "pool"),
    ("node1:x::0", "invalid target"), ("::0", "invalid target"),
])
def test_bad_gpu_targets_are_refused_by_name(text, says):
    with pytest.raises(ValueError, match=says) as caught:
        parse_target(text)
    assert repr(text) in str(caught.value)
