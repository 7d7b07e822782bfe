"""The Python API (client.api) against a real local cluster."""

from __future__ import annotations

import asyncio

import pytest

from client.api import BadRequest, Client, TaskSpec
from harness.local_cluster import Cluster, delete_prefix, wait_until, wait_until_async
from hakuriver.config import load_config
from hakuriver.states import TaskState
from private_broker import private_broker  # noqa: F401  (the session fixture)


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


def test_a_waiter_is_bound_again_after_the_broker_restarts(tmp_path, private_broker):  # noqa: F811
    """Its binds go out ``nowait``, which aio-pika cannot restore: the client binds them again on
    reconnect, so events after the restart arrive live (a ``running`` event; catching up from the
    ledger only ever reports ends)."""
    c = Cluster(tmp_path / "cluster", ["node1"], broker={"url": private_broker.url}, node={"cores": 1},
                timing={"heartbeat_interval": 0.5, "heartbeat_timeout_factor": 4, "kill_grace": 2.0})
    go = tmp_path / "go"
    hold = TaskSpec(command="sh", args=["-c", f"while [ ! -e {go} ]; do sleep 0.05; done"], cores=1)

    async def main():
        async with Client(c.load_config()) as client:
            first = client.make_tasks(hold, ["node1"])
            second = client.make_tasks(TaskSpec(command="true", args=[], cores=1), ["node1"])
            second_id = second[0].task_id
            waiter = await client.waiter([second_id])
            seen = []
            waiter.on_state = lambda event: seen.append((event.state, event.seq))
            await client.submit(first + second)
            await wait_until_async(lambda: (TaskState.QUEUED, 1) in seen, 30, "the second task queued")

            await asyncio.to_thread(private_broker.stop_app)
            await asyncio.to_thread(private_broker.start_app)

            def bound() -> bool:
                listed = private_broker.ctl("list_bindings", "routing_key", "--quiet", "--no-table-headers")
                return f"task.{second_id}.state" in listed.stdout.split()
            await asyncio.to_thread(wait_until, bound, 30, "the waiter's binding back on the broker")
            go.touch()
            return second_id, await waiter.wait(60), seen
    try:
        c.start()
        second_id, results, seen = asyncio.run(main())
    finally:
        c.stop()
        asyncio.run(delete_prefix(c.prefix, c.nodes, url=private_broker.url))
    assert results[second_id].state == TaskState.COMPLETED
    assert any(state == TaskState.RUNNING and seq > 0 for state, seq in seen), seen
