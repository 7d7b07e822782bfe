"""Dashboard figures: ``/api/tasks`` and the tasks page on a 100,000-task SQLite ledger.

Why it exists: the dashboard's tasks table must stay fast however long the ledger's
history grows (issue: p95 ≤ 150 ms server time). The ledger is filled straight through
:meth:`~hakuriver.host.ledger.Ledger.ingest` with tasks of 10 owners on 4 nodes in
several states and batches; then the real host serves the real HTTP API. Each figure is
the request's wall time seen by a keep-alive client on the loopback (an upper bound of
the server time), against ``/api/health`` (the server's floor: routing, one small query,
JSON) measured in the same run.
"""

from __future__ import annotations

import asyncio
import http.client
import time
from pathlib import Path
from urllib.parse import urlsplit

from bench.harness import Cluster, Row, latency, p95, say

LEDGER_TASKS = 100_000
FILL_BATCH = 5_000
RUNS = 40
USERS = [f"user{i}" for i in range(10)]
NODES = [f"node{i}" for i in range(1, 5)]
STATES = ["completed"] * 7 + ["failed", "killed", "running"]


async def _fill(cluster: Cluster, count: int) -> tuple[float, int]:
    """(seconds, a task id in the middle of the ledger, for a deep page)."""
    from hakuriver import ids
    from hakuriver.host.ledger import Ledger
    from hakuriver.messages import StateEvent, Task
    from hakuriver.states import TaskState

    config = cluster.load_config()
    ledger = Ledger(config.database_url, Path(config.paths.state_dir) / "logs")
    await ledger.open()
    start, middle = time.perf_counter(), 0
    try:
        for first in range(0, count, FILL_BATCH):
            batch_id = ids.new_id()
            events = []
            for n in range(first, min(first + FILL_BATCH, count)):
                task_id = ids.new_id()
                middle = task_id if n == count // 2 else middle
                node, state = NODES[n % len(NODES)], TaskState(STATES[n % len(STATES)])
                task = Task(task_id=task_id, batch_id=batch_id, command="python",
                            args=["train.py", "--lr", f"0.{n % 97}"], target=node, user=USERS[n % len(USERS)],
                            submitted_at=time.time() - 60)
                events.append(StateEvent(task_id=task_id, node=node, state=state, seq=3, task=task,
                                         exit_code=None if state is TaskState.RUNNING else 0))
            await ledger.ingest(events)
    finally:
        await ledger.close()
    return time.perf_counter() - start, middle


def _time_get(url: str, paths: list[str], runs: int) -> list[float]:
    """Wall time of GET ``paths`` (in turn) over one keep-alive connection, after a warm-up each."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    samples = []
    try:
        for attempt in range(runs + len(paths)):
            path = paths[attempt % len(paths)]
            start = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            elapsed = time.perf_counter() - start
            if response.status != 200:
                raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
            if attempt >= len(paths):
                samples.append(elapsed)
    finally:
        connection.close()
    return samples


def _page_bytes(url: str, path: str) -> int:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", path)
        return len(connection.getresponse().read())
    finally:
        connection.close()


def _wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _time_get(url, ["/api/health"], 0)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run(root: Path) -> list[Row]:
    rows: list[Row] = []
    with Cluster(root / "web", []) as cluster:
        say(f"filling a SQLite ledger with {LEDGER_TASKS:,} tasks for the dashboard")
        fill_s, middle = asyncio.run(_fill(cluster, LEDGER_TASKS))
        cluster.start_host()
        host, port = cluster.load_config().web.address
        url = f"http://{host}:{port}"
        _wait_ready(url)
        say("timing the dashboard's task listing")
        floor = _time_get(url, ["/api/health"], RUNS)
        figures = {
            "`/api/tasks` newest 50, no filter": ["/api/tasks"],
            "`/api/tasks` by state, owner, node, batch (one each in turn)":
                ["/api/tasks?state=failed", "/api/tasks?user=user3", "/api/tasks?node=node2&state=running",
                 f"/api/tasks?state=completed&before={middle}"],
            "`/api/tasks?q=…` command text (20,000-task window)": ["/api/tasks?q=0.42", "/api/tasks?q=nowhere"],
            "tasks page (HTML), newest and a deep page": ["/tasks", f"/tasks?user=user7&before={middle}"],
        }
        for figure, paths in figures.items():
            samples = _time_get(url, paths, RUNS)
            goal_met = p95(samples) <= 0.150
            rows.append(Row(f"dashboard {figure} on {LEDGER_TASKS:,} tasks (median / p95)",
                            f"{latency(floor)} (`/api/health`)", latency(samples),
                            f"{p95(samples) / p95(floor):.1f}× p95", "p95 ≤ 150 ms", goal_met))
        others = {name: _time_get(url, [path], 10) for name, path in
                  (("overview", "/"), ("nodes", "/nodes"), ("/metrics", "/metrics"))}
        weights = {path: _page_bytes(url, path) for path in ("/", "/tasks", "/nodes", "/static/app.css",
                                                             "/static/app.js")}
        rows[-1].note = ("keep-alive HTTP client on the loopback, so the figure includes the client and HTTP; "
                         f"{RUNS} requests each after a warm-up; filling took {fill_s:.1f} s; other pages (p95): "
                         + ", ".join(f"{name} {p95(s) * 1000:.0f} ms" for name, s in others.items())
                         + "; bytes over the wire: " + ", ".join(f"{p} {n / 1024:.1f} KB" for p, n in weights.items()))
    return rows
