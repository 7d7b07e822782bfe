"""The real CLI against a real local cluster (host + node1 + node2 on the real broker).

Covers the core issue's promises: every command of the seed guide, exit codes,
the stdout/stderr split, byte-exact large output with flat runner memory, kill of
running and waiting tasks, and bad input that never reaches the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import threading
import time

import psutil
import pytest

from harness.local_cluster import BIN, BROKER_URL, Cluster


@pytest.fixture(scope="module")
def seed_cluster(tmp_path_factory):
    """One cluster for the seed-guide walk-through: runners offer 8 cores (the guide asks for 4)."""
    root = tmp_path_factory.mktemp("seed")
    c = Cluster(root / "cluster", ["node1", "node2"], node={"cores": 8, "allow_privileged": True})
    try:
        yield c.start()
    finally:
        c.stop()


def shared(c: Cluster) -> str:
    path = c.root / "shared"
    path.mkdir(exist_ok=True)
    return str(path)


def submit_wait(c: Cluster, *args: str) -> tuple[int, str, str]:
    result = c.cli("--wait", *args)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_basic_submission_prints_only_the_id(seed_cluster):
    c = seed_cluster
    out = c.cli_ok("--target", "node1", "--", "echo", "Hello, HakuRiver!")
    task_id = out.strip()
    assert task_id.isdigit() and out == f"{task_id}\n"
    task = c.wait_state(task_id, "completed")
    assert task["node"] == "node1" and task["exit_code"] == 0
    assert c.cli("--stdout", task_id).stdout == b"Hello, HakuRiver!\n"


def test_wait_returns_the_tasks_exit_code_and_id(seed_cluster):
    c = seed_cluster
    script = f"TASK=$({BIN}/hakuriver.client --wait --target node1 -- sh -c 'exit 3'); echo $?; echo $TASK"
    result = subprocess.run(["bash", "-c", script], env=c.env, capture_output=True, timeout=60)
    code, task_id = result.stdout.decode().split()
    assert code == "3"
    assert c.task(task_id)["state"] == "failed" and c.task(task_id)["exit_code"] == 3


def test_multi_node_targets_one_batch(seed_cluster):
    c = seed_cluster
    code, out, _ = submit_wait(c, "--target", "node1", "--target", "node2", "--", "hostname")
    assert code == 0
    ids = out.split()
    tasks = [c.task(i) for i in ids]
    assert [t["node"] for t in tasks] == ["node1", "node2"]
    assert tasks[0]["batch_id"] == tasks[1]["batch_id"]
    assert {c.cli("--stdout", i).stdout for i in ids} == {subprocess.check_output(["hostname"])}


def test_numa_target_runs_on_that_numa_node(seed_cluster):
    c = seed_cluster
    code, out, err = submit_wait(c, "--target", "node1:0", "--container", "NULL", "--", "numactl", "--hardware")
    assert code == 0, err
    assert b"available:" in c.cli("--stdout", out.strip()).stdout
    code, out, _ = submit_wait(c, "--target", "node1:0", "--", "sh", "-c", "echo $HAKURIVER_NUMA_NODE")
    assert c.cli("--stdout", out.strip()).stdout == b"0\n"


def test_host_execution_and_resources(seed_cluster):
    c = seed_cluster
    script = os.path.join(shared(c), "compute_heavy.py")
    with open(script, "w") as f:
        f.write("import os\nprint('cores', os.environ['HAKURIVER_CORES'])\n")
    for args, expected in [(["--cores", "4"], b"cores 4\n"), (["--memory", "8G"], b"cores 0\n"),
                           (["--cores", "4", "--memory", "8G"], b"cores 4\n")]:
        code, out, err = submit_wait(c, "--target", "node1", *args, "--", "python3", script)
        assert code == 0, err
        task = c.task(out.strip())
        assert c.cli("--stdout", out.strip()).stdout == expected
        assert task["cores"] == (4 if b"4" in expected else 0)
        assert task["memory"] == (8 * 2**30 if "--memory" in args else None)
    code, out, _ = submit_wait(c, "--target", "node1", "--container", "NULL", "--", "df", "-h")
    assert code == 0 and b"Filesystem" in c.cli("--stdout", out.strip()).stdout


def test_environment_variables_arrive(seed_cluster):
    c = seed_cluster
    code, out, err = submit_wait(c, "--target", "node1", "--env", "MODEL_TYPE=large", "--env", "DEBUG=1", "--",
                               "sh", "-c", "echo $MODEL_TYPE $DEBUG $HAKURIVER_NODE $HAKURIVER_TASK_ID")
    task_id = out.strip()
    assert code == 0
    assert err == f"task {task_id} completed (exit 0) on node1\n"  # and nothing else for a person
    assert c.cli("--stdout", task_id).stdout.decode() == f"large 1 node1 {task_id}\n"


def test_stdout_and_stderr_are_kept_apart_and_each_is_the_answer_on_stdout(seed_cluster, tmp_path):
    c = seed_cluster
    code, out, _ = submit_wait(c, "--target", "node2", "--", "sh", "-c", "echo out; echo err >&2; printf x")
    task_id = out.strip()
    assert c.cli("--stdout", task_id).stdout == b"out\nx"
    for follow in ([], ["--follow"]):
        result = c.cli("--stderr", task_id, *follow)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"err\n", b"")
    # the guide's way to keep it: a redirect of our stdout
    saved = tmp_path / "err.log"
    subprocess.run(["bash", "-c", f"hakuriver.client --stderr {task_id} > {saved}"], env=c.env, check=True, timeout=60)
    assert saved.read_bytes() == b"err\n"


def test_status_list_and_json(seed_cluster):
    c = seed_cluster
    task_id = c.cli_ok("--wait", "--target", "node1", "--", "true").strip()
    table = c.cli_ok("--status", task_id)
    assert "completed" in table and task_id in table
    task = c.task(task_id)
    for key in ("task_id", "state", "node", "exit_code", "command", "args", "submitted_at", "started_at",
                "finished_at", "message"):
        assert key in task
    listing = c.cli_ok("--list-tasks")
    assert listing.splitlines()[0].split()[:3] == ["TASK", "STATE", "NODE"] and task_id in listing
    tasks = c.query("--list-tasks", "--state", "completed", "--node", "node1", "--limit", "5")["tasks"]
    assert 0 < len(tasks) <= 5 and all(t["state"] == "completed" and t["node"] == "node1" for t in tasks)
    assert [t["task_id"] for t in tasks] == sorted((t["task_id"] for t in tasks), reverse=True)
    nodes = c.query("--list-nodes")["nodes"]
    assert {n["name"] for n in nodes} >= {"node1", "node2"} and all(n["online"] for n in nodes)
    assert nodes[0]["numa"] and nodes[0]["cores_total"] == 8
    health = c.query("--health", "node1")
    assert health["nodes"][0]["name"] == "node1" and health["host"]["database"] == "sqlite"


def test_kill_running_task_takes_the_whole_tree(seed_cluster):
    c = seed_cluster
    marker = f"{time.time() % 1000:.6f}"
    task_id = c.cli_ok("--target", "node1", "--", "sh", "-c", f"sleep 300.{marker[-4:]} & sleep 300; wait").strip()
    c.wait_state(task_id, "running")
    c.cli_ok("--kill", task_id)
    task = c.wait_state(task_id, "killed")
    assert task["message"] == "killed by request"
    leftover = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", f"300.{marker[-4:]}"]]
    assert leftover == []


def test_kill_of_a_waiting_task_never_runs_it(seed_cluster):
    c = seed_cluster
    flag = os.path.join(shared(c), f"ran-{time.time()}")
    blocker = c.cli_ok("--target", "node2", "--cores", "8", "--", "sleep", "30").strip()
    c.wait_state(blocker, "running")
    waiting = c.cli_ok("--target", "node2", "--cores", "1", "--", "touch", flag).strip()
    c.wait_state(waiting, "queued")
    c.cli_ok("--kill", waiting)
    assert c.wait_state(waiting, "killed")["started_at"] is None
    c.cli_ok("--kill", blocker)
    c.wait_state(blocker, "killed")
    assert not os.path.exists(flag)


def test_container_environment_that_does_not_exist_is_rejected(seed_cluster):
    c = seed_cluster
    code, out, err = submit_wait(c, "--target", "node1", "--container", "my-python-env", "--", "python", "x.py")
    task = c.task(out.strip())
    assert code == 1 and task["state"] == "rejected"
    assert "my-python-env" in task["message"]


def test_policy_refusals(seed_cluster):
    c = seed_cluster
    code, out, _ = submit_wait(c, "--target", "node1", "--mount", "/data:/container/data", "--", "ls")
    task = c.task(out.strip())
    assert code == 1 and task["state"] == "rejected" and "/data" in task["message"]


def test_custom_config_and_pipeline(seed_cluster, tmp_path):
    c = seed_cluster
    custom = tmp_path / "custom-config.toml"
    custom.write_text(c.config.read_text())
    env = {k: v for k, v in c.env.items() if k != "HAKURIVER_CONFIG"}
    script = f"""
    cd {tmp_path}
    TASK1=$(hakuriver.client --config custom-config.toml --wait --target node1 -- true)
    s1=$?
    if [ "$s1" -eq 0 ]; then
      TASK2=$(hakuriver.client --config custom-config.toml --wait --target node2 -- sh -c 'exit 5')
      echo "$TASK1 $s1 $TASK2 $?"
    fi
    """
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, timeout=60)
    task1, s1, task2, s2 = result.stdout.decode().split()
    assert (s1, s2) == ("0", "5")
    assert c.task(task1)["node"] == "node1" and c.task(task2)["node"] == "node2"


def test_hakurun_methods_from_the_guide(seed_cluster):
    c = seed_cluster
    script = os.path.join(shared(c), "script.py")
    with open(script, "w") as f:
        f.write("import sys\nprint('args', *sys.argv[1:])\n")
    # Method 1: hakurun writes the submissions, bash runs them
    result = subprocess.run(
        f"hakurun echo hakuriver.client --target node1 -- python3 {script} 'span:{{1..3}}' 'span:[A,B]' | bash",
        shell=True, env=c.env, capture_output=True, timeout=120)
    ids = result.stdout.decode().split()
    assert len(ids) == 6, result.stderr.decode()
    for task_id in ids:
        c.wait_state(task_id, "completed")
    outputs = sorted(c.cli("--stdout", task_id).stdout for task_id in ids)
    assert outputs == sorted(f"args {n} {x}\n".encode() for n in (1, 2, 3) for x in "AB")
    # Method 2: one task runs hakurun inside
    code, out, err = submit_wait(c, "--target", "node1", "--container", "NULL", "--", "hakurun", "--parallel",
                                 "python3", script, "span:{1..3}", "span:[A,B]")
    assert code == 0, err
    lines = c.cli("--stdout", out.strip()).stdout.decode().splitlines()
    assert sorted(lines) == sorted(f"args {n} {x}" for n in (1, 2, 3) for x in "AB")


def test_large_output_is_byte_identical_and_runner_memory_flat(seed_cluster, tmp_path):
    c = seed_cluster
    size = 64 * 2**20
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:
        f.write(os.urandom(size))
    runner = psutil.Process(c.processes["node2"].pid)
    peak = [runner.memory_info().rss]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], runner.memory_info().rss)
            time.sleep(0.05)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        code, out, err = submit_wait(c, "--target", "node2", "--", "cat", str(source))
    finally:
        done.set()
        sampler.join()
    assert code == 0, err
    result = c.cli("--stdout", out.strip(), timeout=120)
    assert len(result.stdout) == size
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(source.read_bytes()).digest()
    print(f"runner peak RSS while streaming 64 MiB: {peak[0] / 2**20:.1f} MiB")
    assert peak[0] < 150 * 2**20


BAD_INPUTS = [
    (["--target", "node9", "--", "true"], "node9"),
    (["--target", "node1:7", "--", "true"], "7"),
    (["--target", "node1", "--cores", "-1", "--", "true"], "-1"),
    (["--target", "node1", "--memory", "8X", "--", "true"], "8X"),
    (["--target", "node1", "--env", "=x", "--", "true"], "=x"),
    (["--target", "node1", "--mount", "data:/data", "--", "true"], "data"),
    (["--target", "node1"], "no command"),
    (["--target", "node1", "--status", "1", "--", "true"], "--status"),
    (["--list-tasks", "--list-nodes"], "--list-tasks"),
    (["--status", "abc"], "abc"),
    (["--target", "node1", "--sweep", "--", "echo", "span:{1..x}"], "span:{1..x}"),
    # bounds, checked by the client exactly as the receivers check them (issue 11.2)
    (["--target", "node1", "--env", "E1=" + "\x01" * 60000, "--", "echo", "\x01" * 60000, "\x01" * 60000],
     "bytes encoded"),
    (["--target", "node1", "--memory", "99999999999999999999999P", "--", "true"], "99999999999999999999999P"),
    (["--target", "node1", "--", "echo", "x" * 100_000, "x" * 100_000], "200004 bytes"),
    (["--target", "node1", "--env", "A=" + "y" * 100_000, "--env", "B=" + "y" * 100_000, "--", "true"],
     "200002 bytes"),
    (["--target", "node1", "--cores", "1e9", "--", "true"], "1e9"),
    (["--list-tasks", "--limit", "100000"], "100000"),
    (["--list-tasks", "--before", "x1"], "x1"),
    # what the node's info says it cannot hold, like an unknown NUMA id (issue 11.9)
    (["--target", "node1", "--cores", "64", "--", "true"], "--cores 64"),
    (["--target", "node1", "--memory", "1000T", "--", "true"], "--memory 1000.0T"),
    (["--target", "node1", "--container", "Bad_Name", "--", "true"], "Bad_Name"),
]


def test_bad_input_is_refused_and_nothing_is_published(tmp_path):
    c = Cluster(tmp_path / "cluster", ["node1"])
    try:
        c.start()
        for name in list(c.processes):  # nobody consumes now: whatever is published stays visible
            c.kill(name)
        asyncio.run(_purge(c, [c.prefix + ".ledger", c.prefix + ".node.node1"]))
        for args, named in BAD_INPUTS:
            result = c.cli(*args)
            err = result.stderr.decode()
            assert result.returncode == 2, (args, err)
            assert named in err and len(err.strip().splitlines()) == 1, (args, err)
            assert result.stdout == b""
        counts = asyncio.run(_purge(c, [c.prefix + ".ledger", c.prefix + ".node.node1", c.prefix + ".pool"]))
        assert counts == [0, 0, 0]
    finally:
        c.stop()


async def _purge(c: Cluster, queues: list[str]) -> list[int]:
    """Message counts of ``queues`` (then emptied)."""
    import aio_pika

    connection = await aio_pika.connect(BROKER_URL)
    counts = []
    async with connection:
        channel = await connection.channel()
        for name in queues:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                channel = await connection.channel()
                counts.append(0)
                continue
            counts.append(queue.declaration_result.message_count)
            await queue.purge()
    return counts


def test_broker_unreachable_is_exit_3(tmp_path):
    c = Cluster(tmp_path / "cluster", ["node1"], broker={"url": "amqp://guest:guest@127.0.0.1:1/"})
    result = c.cli("--target", "node1", "--", "true", timeout=30)
    assert result.returncode == 3 and b"unreachable" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no stray line from the broker library
    assert b"guest:guest" not in result.stderr  # the password is never printed


def test_help_is_fast_and_lists_options():
    start = time.perf_counter()
    result = subprocess.run([str(BIN / "hakuriver.client"), "--help"], capture_output=True)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and b"--target" in result.stdout and b"--list-nodes" in result.stdout
    print(f"hakuriver.client --help: {elapsed * 1000:.0f} ms")


def loaded_after(statement: str, modules: set[str]) -> set[str]:
    """Which of ``modules`` a fresh interpreter has loaded after running ``statement``."""
    probe = f"import sys; {statement}; print(' '.join(sorted({sorted(modules)!r} & sys.modules.keys())))"
    result = subprocess.run([str(BIN / "python"), "-c", probe], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_cli_and_session_do_not_import_each_other_and_help_loads_nothing_heavy():
    assert loaded_after("import client.session", {"client.cli"}) == set()
    assert loaded_after("import client.cli", {"client.session", "client.requests", "pydantic", "aio_pika"}) == set()


def test_follow_streams_output_live(seed_cluster):
    c = seed_cluster
    script = "for i in 1 2 3; do echo tick $i; sleep 0.2; done; echo done >&2; exit 4"
    result = c.cli("--wait", "--follow", "--target", "node1", "--", "sh", "-c", script)
    assert result.returncode == 4
    lines = result.stdout.decode().splitlines()
    task_id = lines[0]
    assert lines[1:] == ["tick 1", "tick 2", "tick 3"]
    assert result.stderr.decode().startswith("done\n")
    follow = c.cli("--stdout", task_id, "--follow")
    assert follow.stdout == b"tick 1\ntick 2\ntick 3\n"
