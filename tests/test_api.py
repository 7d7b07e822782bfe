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


def test_kill_of_a_task_nobody_has_recorded_yet_still_reaches_it(cluster):
    """The README's promise: such a kill goes to every runner, and the one that gets the task never runs it."""
    async def main():
        async with Client(load_config(str(cluster.config))) as client:
            tasks = client.make_tasks(TaskSpec(command="sleep", args=["300"]), ["node1"])
            ledger_had = await client.kill(tasks[0].task_id)  # before the task exists anywhere
            waiter = await client.waiter([tasks[0].task_id])
            await client.submit(tasks)
            return ledger_had, await waiter.wait(60)
    ledger_had, results = asyncio.run(main())
    assert ledger_had is None
    assert [e.state for e in results.values()] == [TaskState.KILLED]
