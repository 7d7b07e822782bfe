"""The Python API (client.api) against a real local cluster."""

from __future__ import annotations

import asyncio

import pytest

from client.api import BadRequest, Client, TaskSpec
from hakuriver.config import load_config
from hakuriver.states import TaskState


def test_run_submits_and_waits_for_every_target(cluster):
    async def main():
        async with Client(load_config(str(cluster.config))) as client:
            results = await client.run(TaskSpec(command="sh", args=["-c", "exit 3"]), ["node1", "node2"], timeout=30)
            again = await client.run(TaskSpec(command="true", args=[]), ["node1"], timeout=30)
            with pytest.raises(BadRequest, match="node9"):
                await client.run(TaskSpec(command="true", args=[]), ["node9"], timeout=30)
            return results, again
    results, again = asyncio.run(main())
    assert sorted(e.node for e in results.values()) == ["node1", "node2"]
    assert all(e.state == TaskState.FAILED and e.exit_code == 3 for e in results.values())
    assert [e.state for e in again.values()] == [TaskState.COMPLETED]
