"""The ledger and a task's GPUs: the ids asked for, then the ones it holds once running; a ledger
made before the GPU columns existed gets them when the host opens it."""

from __future__ import annotations

import sqlite3

from hakuriver.host.ledger import Ledger
from hakuriver.messages import StateEvent, Task
from hakuriver.states import TaskState


def _task(task_id: int, **fields) -> Task:
    return Task(task_id=task_id, batch_id=1, command="true", target="node1", **fields)


async def test_a_task_shows_the_gpus_it_asked_for_then_the_ones_it_holds(tmp_path):
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", tmp_path / "logs")
    await ledger.open()
    try:
        await ledger.ingest([StateEvent(task_id=1, state=TaskState.PENDING, seq=0, task=_task(1, gpu_count=2))])
        [task] = await ledger.get_tasks([1])
        assert task["gpus"] is None and task["gpu_count"] == 2
        await ledger.ingest([StateEvent(task_id=1, node="node1", state=TaskState.RUNNING, seq=2, gpus=[0, 3])])
        # a late queued event (it carries the task) does not undo what it runs on
        await ledger.ingest([StateEvent(task_id=1, node="node1", state=TaskState.QUEUED, seq=1,
                                        task=_task(1, gpu_count=2))])
        [task] = await ledger.get_tasks([1])
        assert task["gpus"] == [0, 3] and task["state"] == "running"
        [row] = await ledger.list_tasks()
        assert row["gpus"] == [0, 3]
    finally:
        await ledger.close()


async def test_a_ledger_from_before_the_gpu_columns_gets_them(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite+aiosqlite:///{path}", tmp_path / "logs")
    await ledger.open()
    await ledger.close()
    with sqlite3.connect(path) as db:   # the tasks table as it was before
        db.execute("ALTER TABLE tasks DROP COLUMN gpus")
        db.execute("ALTER TABLE tasks DROP COLUMN gpu_count")
    ledger = Ledger(f"sqlite+aiosqlite:///{path}", tmp_path / "logs")
    await ledger.open()
    try:
        await ledger.ingest([StateEvent(task_id=5, state=TaskState.PENDING, seq=0, task=_task(5, gpus=[1], gpu_count=1))])
        [task] = await ledger.get_tasks([5])
        assert task["gpus"] == [1] and task["gpu_count"] == 1
    finally:
        await ledger.close()


def test_the_dashboard_counts_gpus_from_the_heartbeat_inventory():
    from hakuriver.host.web.data import allocation

    node = {"cores_total": 4, "cores_free": 4, "memory_total": 1, "memory_free": 1,
            "gpus": [{"index": 0}, {"index": 1}, {"index": 2}], "gpus_free": [2]}
    assert allocation(node)["gpus_total"] == 3 and allocation(node)["gpus_allocated"] == 2
    assert allocation({**node, "gpus": [], "gpus_free": []})["gpus_total"] is None   # shown "—"
