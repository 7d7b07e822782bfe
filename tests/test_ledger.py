"""The ledger's rules, on real SQLite and real PostgreSQL.

PostgreSQL: a fresh database ``hk_test_<uuid8>`` is made for the test run (as user
postgres on 127.0.0.1:5432) and dropped afterwards; each test drops its tables.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid

import asyncpg
import pytest

from hakuriver.host.ledger import (Ledger, OutputMissing, UnknownTask, _ingest_batch, metadata, task_summary,
                                   tasks_table)
from hakuriver.host.web.data import finished_by_node, finished_by_node_query
from hakuriver.messages import Heartbeat, OutputChunk, StateEvent, Task
from hakuriver.states import TaskState

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", database="postgres")


@pytest.fixture(scope="session")
def postgres_url():
    name = f"hk_test_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(**PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger(request, tmp_path, postgres_url):
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'state' / 'ledger.db'}"
    else:
        url = postgres_url
    ledger = Ledger(url, tmp_path / "logs")
    await ledger.open()
    yield ledger
    async with ledger.engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
    await ledger.close()


def make_task(task_id: int, batch_id: int = 1, target: str = "node1", **fields) -> Task:
    return Task(task_id=task_id, batch_id=batch_id, command="python", args=["-c", "print(1)"],
                env={"A": "1"}, cores=2, memory=1 << 30, target=target, user="alice", submit_host="laptop",
                submitted_at=1000.0, **fields)


def event(task_id: int, state: str, seq: int, node: str | None = "node1", t: float | None = None,
          with_task: bool = False, **fields) -> StateEvent:
    return StateEvent(task_id=task_id, state=TaskState(state), seq=seq, node=node,
                      time=t if t is not None else 1000.0 + seq,
                      task=make_task(task_id) if with_task else None, **fields)


async def state_of(ledger: Ledger, task_id: int) -> dict:
    (task,) = await ledger.get_tasks([task_id])
    return task


async def test_lifecycle_fills_every_field(ledger):
    await ledger.ingest([event(7, "pending", 0, node=None, with_task=True)])
    await ledger.ingest([event(7, "queued", 1, with_task=True, t=1001.5)])
    await ledger.ingest([event(7, "running", 2, t=1002.5, unenforced=["memory"])])
    await ledger.ingest([event(7, "completed", 3, t=1003.5, exit_code=0)])
    task = await state_of(ledger, 7)
    assert task["state"] == "completed" and task["exit_code"] == 0 and task["node"] == "node1"
    assert (task["queued_at"], task["started_at"], task["finished_at"]) == (1001.5, 1002.5, 1003.5)
    assert task["command"] == "python" and task["args"] == ["-c", "print(1)"] and task["env"] == {"A": "1"}
    assert task["cores"] == 2 and task["memory"] == 1 << 30 and task["batch_id"] == 1
    assert task["user"] == "alice" and task["submit_host"] == "laptop" and task["submitted_at"] == 1000.0
    assert task["unenforced"] == ["memory"], "a terminal event does not erase what running reported"


async def test_duplicates_and_stale_events_are_ignored(ledger):
    await ledger.ingest([event(8, "pending", 0, with_task=True)])
    await ledger.ingest([event(8, "running", 2, t=1002.0)])
    await ledger.ingest([event(8, "running", 2, t=5000.0, message="duplicate")])
    await ledger.ingest([event(8, "queued", 1, t=1001.0)])  # late: too old to apply
    task = await state_of(ledger, 8)
    assert task["state"] == "running" and task["started_at"] == 1002.0 and task["message"] == ""
    assert task["queued_at"] == 1001.0, "a stale event still tells when the task was queued"


async def test_terminal_state_never_changes(ledger):
    await ledger.ingest([event(9, "pending", 0, with_task=True), event(9, "failed", 3, exit_code=2)])
    await ledger.ingest([event(9, "running", 4), event(9, "completed", 5, exit_code=0)])
    task = await state_of(ledger, 9)
    assert task["state"] == "failed" and task["exit_code"] == 2


async def test_one_batch_applies_in_seq_order(ledger):
    events = [event(10, "pending", 0, with_task=True), event(10, "queued", 1), event(10, "running", 2),
              event(10, "killed", 3, message="by alice")]
    random.Random(4).shuffle(events)
    applied = await ledger.ingest(events)
    task = await state_of(ledger, 10)
    assert task["state"] == "killed" and task["message"] == "by alice"
    assert task["queued_at"] == 1001.0 and task["started_at"] == 1002.0
    assert applied == 4


async def test_event_for_unknown_task_creates_it_and_later_spec_fills_in(ledger):
    await ledger.ingest([event(11, "running", 2, node="node2")])
    task = await state_of(ledger, 11)
    assert task["state"] == "running" and task["node"] == "node2" and task["command"] is None
    await ledger.ingest([event(11, "pending", 0, node=None, with_task=True)])
    task = await state_of(ledger, 11)
    assert task["state"] == "running", "the stale pending event does not apply"
    assert task["command"] == "python", "but its task fields fill the row"


async def test_host_lost_is_overridden_by_the_runner(ledger):
    await ledger.ingest(heartbeats=[Heartbeat(node="node1", cores_total=4, cores_free=4, memory_total=8,
                                              memory_free=8)], now=100.0)
    await ledger.ingest([event(12, "pending", 0, with_task=True), event(12, "running", 2),
                         event(13, "pending", 0, with_task=True), event(13, "running", 2),
                         event(14, "pending", 0, with_task=True), event(14, "queued", 1)])
    assert await ledger.mark_offline(offline_after=5.0, now=104.0) == []
    lost = await ledger.mark_offline(offline_after=5.0, now=106.0)
    assert sorted((ev.task_id, ev.state, ev.seq, ev.node) for ev in lost) == [
        (12, "lost", 2, "node1"), (13, "lost", 2, "node1")]
    assert all(ev.message == "node node1 went offline" for ev in lost)
    (node,) = await ledger.list_nodes()
    assert node["online"] is False
    assert (await state_of(ledger, 14))["state"] == "queued", "queued tasks wait in the runner's store"
    task = await state_of(ledger, 12)
    assert task["state"] == "lost" and task["finished_at"] == 106.0

    # The host's own lost event comes back through the queue: same seq, no change.
    await ledger.ingest(lost)
    # The runner finishes 12 (a later seq) and says in a heartbeat that it still runs 13.
    await ledger.ingest([event(12, "completed", 3, exit_code=0)],
                        heartbeats=[Heartbeat(node="node1", cores_total=4, cores_free=3, memory_total=8,
                                              memory_free=8, running=[13])], now=110.0)
    task12, task13 = await ledger.get_tasks([12, 13])
    assert task12["state"] == "completed" and task12["exit_code"] == 0 and task12["finished_at"] == 1003.0
    assert task13["state"] == "running" and task13["finished_at"] is None and task13["message"] == ""
    (node,) = await ledger.list_nodes()
    assert node["online"] is True and node["last_seen"] == 110.0 and node["running"] == [13]


async def test_runner_reported_lost_is_final(ledger):
    await ledger.ingest([event(15, "pending", 0, with_task=True), event(15, "lost", 3, message="runner died")])
    await ledger.ingest([event(15, "completed", 4, exit_code=0)])
    assert (await state_of(ledger, 15))["state"] == "lost"


async def test_stopping_heartbeat_takes_node_offline(ledger):
    beat = dict(cores_total=8, cores_free=6, memory_total=1 << 33, memory_free=1 << 32, version="0.1.0",
                executors=["process"], numa={0: {"cpus": [0, 1], "memory": 1024}})
    await ledger.ingest(heartbeats=[Heartbeat(node="n1", **beat), Heartbeat(node="n2", **beat)])
    await ledger.ingest([event(17, "pending", 0, with_task=True), event(17, "running", 2, node="n2")])
    await ledger.ingest(heartbeats=[Heartbeat(node="n2", stopping=True, **beat)], now=200.0)
    assert await ledger.mark_offline(offline_after=5.0, now=201.0) == [], "a restarting runner gets its grace"
    assert [ev.task_id for ev in await ledger.mark_offline(offline_after=5.0, now=206.0)] == [17]
    n1, n2 = await ledger.list_nodes()
    assert (n1["name"], n1["online"], n2["name"], n2["online"]) == ("n1", True, "n2", False)
    assert n1["cores_free"] == 6 and n1["executors"] == ["process"] and n1["numa"]["0"]["cpus"] == [0, 1]
    assert "v" not in n1 and "stopping" not in n1


async def test_output_is_byte_exact_with_duplicates_and_disorder(ledger):
    payload = os.urandom(200_000) + bytes(range(256)) * 4
    pieces = [(offset, payload[offset:offset + 65536]) for offset in range(0, len(payload), 65536)]
    deliveries = pieces + pieces[:2]  # two chunks arrive twice
    random.Random(1).shuffle(deliveries)
    for offset, data in deliveries:
        await ledger.ingest(chunks=[(OutputChunk(task_id=16, stream="stdout", offset=offset), data)])
    await ledger.ingest(chunks=[(OutputChunk(task_id=16, stream="stderr", offset=0), b"warn\n")])
    whole = await ledger.read_output(16, "stdout", 0, 4 << 20)
    assert whole.data == payload and whole.size == len(payload) and not whole.terminal
    middle = await ledger.read_output(16, "stdout", 1000, 10)
    assert middle.data == payload[1000:1010] and middle.offset == 1000
    assert (await ledger.read_output(16, "stdout", len(payload), 100)).data == b""
    assert (await ledger.read_output(16, "stderr")).data == b"warn\n"
    task = await state_of(ledger, 16)
    assert task["stdout_bytes"] == len(payload) and task["stderr_bytes"] == 5
    with pytest.raises(UnknownTask):
        await ledger.read_output(999, "stdout")


async def test_output_file_pruned_under_the_ledger_is_an_error_not_an_empty_read(ledger, tmp_path):
    await ledger.ingest(chunks=[(OutputChunk(task_id=17, stream="stdout", offset=0), b"x" * 5000)])
    stored = tmp_path / "logs" / "17.stdout"
    with open(stored, "r+b") as f:
        f.truncate(1000)  # an admin cut old logs short
    assert (await ledger.read_output(17, "stdout", 0, 1000)).data == b"x" * 1000  # what is there still reads
    with pytest.raises(OutputMissing, match="records 5000 bytes"):
        await ledger.read_output(17, "stdout", 0, 5000)
    stored.unlink()
    with pytest.raises(OutputMissing, match="task 17"):
        await ledger.read_output(17, "stdout", 0)


def test_a_list_row_is_a_bounded_summary():
    row = {**make_task(5).model_dump(mode="json"), "args": ["a" * 150, "b" * 150], "state": "running", "node": "n1",
           "exit_code": None, "started_at": None, "finished_at": None, "stdout_bytes": 3, "stderr_bytes": 0,
           "message": "m" * 500}
    summary = task_summary(row)
    assert "env" not in summary and "mounts" not in summary and summary["truncated"] is True
    assert summary["command"] == "python" and summary["args"] == ["a" * 150, "b" * 43]
    assert len(summary["message"]) == 200 and summary["stdout_bytes"] == 3
    short = task_summary({**row, "args": ["-c", "print(1)"], "message": ""})
    assert short["args"] == ["-c", "print(1)"] and short["truncated"] is False


async def test_list_filters_order_and_pagination(ledger):
    events = []
    for task_id in range(100, 160):
        node = f"node{task_id % 3}"
        events.append(StateEvent(task_id=task_id, state=TaskState.PENDING, seq=0, node=None,
                                 task=make_task(task_id, batch_id=task_id // 10, target=node)))
        events.append(event(task_id, "completed" if task_id % 2 else "running", 2, node=node))
    await ledger.ingest(events)
    everything = await ledger.list_tasks(limit=1000)
    assert [t["task_id"] for t in everything] == list(range(159, 99, -1))
    running_node1 = await ledger.list_tasks(state="running", node="node1")
    assert [t["task_id"] for t in running_node1] == [t for t in range(159, 99, -1) if t % 2 == 0 and t % 3 == 1]
    assert [t["task_id"] for t in await ledger.list_tasks(batch=12)] == list(range(129, 119, -1))
    pages, before = [], None
    while page := await ledger.list_tasks(limit=7, before=before):
        pages.extend(t["task_id"] for t in page)
        before = page[-1]["task_id"]
    assert pages == list(range(159, 99, -1))
    with pytest.raises(ValueError):
        await ledger.list_tasks(limit=0)
    with pytest.raises(ValueError):
        await ledger.list_tasks(state="sleeping")


async def test_listing_stays_fast_with_100k_rows(tmp_path):
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", tmp_path / "logs")
    await ledger.open()
    try:
        states = ["completed", "failed", "running", "queued"]
        rows = [{"task_id": i, "batch_id": i // 100, "node": f"node{i % 10}", "numa": None, "target": f"node{i % 10}",
                 "command": "true", "args": [], "env": {}, "cores": 1, "memory": None, "container": None,
                 "privileged": False, "mounts": [], "user": "u", "submit_host": "h", "state": states[i % 4],
                 "seq": 3, "exit_code": 0, "message": "", "submitted_at": 0.0, "queued_at": None,
                 "started_at": None, "finished_at": None, "stdout_bytes": 0, "stderr_bytes": 0,
                 "unenforced": [], "lost_by_host": False} for i in range(1, 100_001)]
        async with ledger.engine.begin() as conn:
            await conn.execute(tasks_table.insert(), rows)
        started = time.perf_counter()
        queued = await ledger.list_tasks(state="queued", node="node3", limit=50)
        newest = await ledger.list_tasks(limit=50, before=50_000)
        batch = await ledger.list_tasks(batch=999, limit=100)
        elapsed = time.perf_counter() - started
        print(f"three list queries over 100,000 rows: {elapsed * 1000:.1f} ms")
        assert [t["task_id"] for t in queued][:2] == [99_983, 99_963]
        assert newest[0]["task_id"] == 49_999 and len(newest) == 50
        assert [t["task_id"] for t in batch] == list(range(99_999, 99_899, -1))
    finally:
        await ledger.close()


async def test_a_write_that_fails_half_way_leaves_nothing_and_the_next_one_works(ledger):
    """Ledger.run is one transaction (on SQLite in a ledger thread, elsewhere on the async engine):
    a body that raises after writing is rolled back, and the connection serves the next write."""
    def ingest_then_fail(conn):
        _ingest_batch(conn, [event(1, "pending", 0, node=None, with_task=True)], [], [], 1000.0)
        raise RuntimeError("the database refused something after the first write")

    with pytest.raises(RuntimeError):
        await ledger.run(ingest_then_fail, write=True)
    assert await ledger.get_tasks([1]) == []
    await ledger.ingest([event(1, "pending", 0, node=None, with_task=True), event(1, "completed", 3, exit_code=0)])
    assert (await state_of(ledger, 1))["state"] == "completed"
    # what the ledger's thread wrote, the async engine (the dashboard's reads) sees
    async with ledger.engine.connect() as conn:
        assert (await conn.execute(tasks_table.select().where(tasks_table.c.task_id == 1))).one().state == "completed"
    assert await finished_by_node(ledger) == [("node1", "completed", 1)]


async def test_metrics_count_of_ended_tasks_walks_an_index_not_the_table(tmp_path):
    ledger = Ledger(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", tmp_path / "logs")
    await ledger.open()
    try:
        def plan(conn):
            sql = str(finished_by_node_query().compile(conn, compile_kwargs={"literal_binds": True}))
            return " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))

        assert "COVERING INDEX ix_tasks_state_node" in await ledger.run(plan)
    finally:
        await ledger.close()
