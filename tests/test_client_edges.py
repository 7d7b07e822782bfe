"""The client at its edges, against a real local cluster: what issue 11 found by trying to break it.

Each test is one repro from the issue: list replies that outgrew the RPC bound, output files
pruned under the host, more than 200 followed tasks, pool tasks no node can hold, readers that
close their pipes, offline nodes, and kills of tasks the host has not recorded yet.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from client.api import Client, TaskSpec
from harness.local_cluster import Cluster
from hakuriver.bounds import LIST_TEXT_CHARS
from hakuriver.config import load_config
from hakuriver.host.queries import list_page


@pytest.fixture(scope="module")
def edge_cluster(tmp_path_factory):
    # a generous heartbeat window: these tests load two cores shared with others, and a node
    # marked offline under load would turn their tasks "lost"
    c = Cluster(tmp_path_factory.mktemp("edges") / "cluster", ["node1", "node2"], node={"cores": 2},
                timing={"heartbeat_timeout_factor": 30})
    try:
        yield c.start()
    finally:
        c.stop()


def shell(c: Cluster, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], env=c.env, capture_output=True, timeout=timeout)


def test_list_of_tasks_with_large_arguments_is_bounded_and_pages_through_everything(edge_cluster):
    c = edge_cluster
    big_args = ["a" * 60_000, "b" * 60_000]          # 120 KB of arguments and 120 KB of environment each

    async def submit_40() -> list[int]:
        async with Client(load_config(str(c.config))) as client:
            spec = TaskSpec(command="true", args=big_args, env={"BIG": "e" * 120_000})
            tasks = [task for _ in range(40) for task in client.make_tasks(spec, ["node1"])]
            waiter = await client.waiter([t.task_id for t in tasks])
            await client.submit(tasks)
            await waiter.wait(120)
            return [t.task_id for t in tasks]
    ids = asyncio.run(submit_40())

    table = c.cli("--list-tasks", "--limit", "40")
    assert table.returncode == 0, table.stderr
    assert all(str(i) in table.stdout.decode() for i in ids)
    # --json carries what the list documents: no environment, the command line cut short
    first = json.loads(c.cli_ok("--list-tasks", "--json", "--limit", "15"))
    row = first["tasks"][0]
    assert "env" not in row and row["truncated"] is True
    assert len(row["command"]) + sum(len(a) for a in row["args"]) <= LIST_TEXT_CHARS
    # page by page with --before until the end: every task once
    seen, before = [], None
    while True:
        page = json.loads(c.cli_ok("--list-tasks", "--json", "--limit", "15",
                                   *(["--before", str(before)] if before else [])))
        seen += [t["task_id"] for t in page["tasks"]]
        before = page["next_before"]
        if before is None:
            break
    assert sorted(set(seen) & set(ids)) == sorted(ids) and len(seen) == len(set(seen))


def test_a_list_page_stops_at_its_byte_bound():
    rows = [{"task_id": i, "command": "x" * 100} for i in range(100, 0, -1)]
    page = list_page(rows, more=False, max_bytes=1000)
    assert 0 < len(page["tasks"]) < 100 and len(json.dumps(page["tasks"])) <= 1000
    assert page["next_before"] == page["tasks"][-1]["task_id"]
    assert list_page(rows, more=False)["next_before"] is None
    assert list_page(rows, more=True)["next_before"] == 1


@pytest.mark.parametrize("damage", ["missing", "shorter"])
def test_stdout_of_a_pruned_output_file_is_a_clear_error(edge_cluster, damage):
    c = edge_cluster
    task_id = c.cli_ok("--wait", "--target", "node2", "--", "sh", "-c", "seq 1 20000").strip()
    # --wait returns on the end event, which the host may still be ingesting with the last output;
    # --stdout --follow reads until the ledger has the task's end, so after it the stored file is whole
    assert c.cli_ok("--stdout", task_id, "--follow").split() == [str(n) for n in range(1, 20001)]
    stored = Path(load_config(str(c.config)).paths.state_dir) / "logs" / f"{task_id}.stdout"
    assert stored.stat().st_size > 1000
    if damage == "missing":
        stored.unlink()
    else:
        with open(stored, "r+b") as f:
            f.truncate(1000)
    for follow in ([], ["--follow"]):
        result = c.cli("--stdout", task_id, *follow, timeout=30)  # it used to spin forever
        err = result.stderr.decode()
        assert result.returncode != 0 and "missing or cut short" in err and task_id in err
        assert len(err.splitlines()) == 1


def test_wait_follow_prints_the_output_of_more_than_200_tasks(edge_cluster):
    c = edge_cluster
    result = c.cli("--wait", "--follow", "--sweep", "--cores", "1", "--target", "node1", "--target", "node2", "--",
                   "sh", "-c", "echo out-$0", "span:{1..201}", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().split()
    assert sorted(line for line in lines if line.startswith("out-")) == sorted(f"out-{n}" for n in range(1, 202))


def test_pool_task_that_no_node_can_hold_is_refused_at_submit(edge_cluster):
    c = edge_cluster
    before = c.query("--list-tasks", "--limit", "1")["tasks"]
    for args, named in [(["--cores", "64"], "--cores 64"), (["--memory", "100T"], "--memory 100.0T"),
                        (["--target", "any", "--cores", "3"], "--cores 3")]:
        result = c.cli(*args, "--", "true")
        err = result.stderr.decode()
        assert result.returncode == 2 and named in err and len(err.splitlines()) == 1, (args, err)
        assert result.stdout == b""
    assert c.query("--list-tasks", "--limit", "1")["tasks"] == before  # nothing reached the ledger
    # one that some node can hold still goes
    assert c.cli_ok("--wait", "--cores", "2", "--", "true").strip().isdigit()


def test_follow_into_a_pipe_that_closes_ends_quietly(edge_cluster):
    c = edge_cluster
    script = ("hakuriver.client --wait --follow --target node1 -- "
              "sh -c 'for i in $(seq 60); do echo tick $i; sleep 0.05; done' | head -1; "
              "echo status ${PIPESTATUS[0]} >&2")
    result = shell(c, script)
    err = result.stderr.decode()
    assert result.stdout.decode().strip().isdigit()  # the id, and head took nothing more
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err.strip().splitlines()[-1] == "status 141"


def test_client_with_its_stderr_pipe_closed_does_not_hang(edge_cluster):
    c = edge_cluster
    result = shell(c, "hakuriver.client --wait --target node1 -- sleep 2 2>&1 | head -1; echo ${PIPESTATUS[0]}",
                   timeout=60)
    task_id, status = result.stdout.decode().split()
    assert task_id.isdigit() and status == "0"
    assert c.task(task_id)["state"] == "completed"


def test_kill_while_the_host_is_paused_reaches_the_task(edge_cluster):
    """The host records nothing while paused; the kill goes to every runner (and the API test
    covers the host that answers before it recorded the task)."""
    c = edge_cluster
    host = c.processes["host"]
    host.send_signal(signal.SIGSTOP)
    try:
        task_id = c.cli_ok("--target", "node1", "--", "sleep", "300").strip()
        killed = c.cli("--kill", task_id)
    finally:
        host.send_signal(signal.SIGCONT)
    assert killed.returncode == 0 and b"every runner" in killed.stderr, killed.stderr
    c.wait_state(task_id, "killed")


def test_submitting_to_an_offline_node_says_so_and_the_task_waits(tmp_path):
    c = Cluster(tmp_path / "cluster", ["node1"])
    try:
        c.start()
        c.kill("node1")
        result = c.cli("--target", "node1", "--", "echo", "waited")
        assert result.returncode == 0
        task_id = result.stdout.decode().strip()
        assert "node 'node1' is offline" in result.stderr.decode()
        c.start_runner("node1")
        c.wait_state(task_id, "completed")
        assert c.cli("--stdout", task_id).stdout == b"waited\n"
        online = c.cli("--target", "node1", "--", "true")
        assert online.returncode == 0 and online.stderr == b""
    finally:
        c.stop()
