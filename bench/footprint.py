"""Runner memory (idle, and while a task prints 1 GiB) and hakurun's per-combination overhead.

Why it exists: the runner lives on every machine next to the work, so it must stay small
and its memory must not grow with a task's output (output is streamed from files in
bounded chunks). hakurun is often used for thousands of tiny runs, so what it adds to
each spawn matters; its baseline is a bare ``os.posix_spawn`` + ``waitpid`` of ``true``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import psutil

from bench.harness import BIN, Cluster, Row, say

GIB = 1 << 30
PRINT_TIMEOUT = 150
HAKURUN_RUNS = 500


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


async def _print_gib(cluster: Cluster, runner_pid: int) -> tuple[list[float], float, str]:
    """RSS samples of the runner while a task writes 1 GiB to stdout; seconds taken; final state."""
    from client.api import Client, TaskSpec

    samples: list[float] = []
    async with Client(cluster.load_config()) as client:
        tasks = client.make_tasks(TaskSpec(command="head", args=["-c", str(GIB), "/dev/zero"]), ["node1"])
        waiter = await client.waiter([tasks[0].task_id])
        start = time.perf_counter()
        await client.submit(tasks)
        done = asyncio.create_task(waiter.wait(PRINT_TIMEOUT))
        while not done.done():
            samples.append(_rss_mb(runner_pid))
            await asyncio.wait({done}, timeout=0.1)
        elapsed = time.perf_counter() - start
        try:
            state = done.result()[tasks[0].task_id].state.value
        except asyncio.TimeoutError:
            state = f"not finished after {PRINT_TIMEOUT} s"
            await client.kill(tasks[0].task_id)
        # the task has ended; the runner may still be streaming its last chunks
        for _ in range(50):
            samples.append(_rss_mb(runner_pid))
            await asyncio.sleep(0.1)
    return samples, elapsed, state


def runner_rows(root: Path) -> list[Row]:
    with Cluster(root / "rss", ["node1"]) as cluster:
        cluster.start()
        runner = cluster.processes["node1"]
        time.sleep(3)  # a few heartbeats: idle means settled
        idle_mb = _rss_mb(runner.pid)
        say("a task printing 1 GiB")
        samples, elapsed, state = asyncio.run(_print_gib(cluster, runner.pid))
        stored = cluster.cli("--list-tasks", "--json", "--limit", "1", timeout=30)
    peak = max(samples)
    growth = peak - idle_mb
    flat = growth <= 20 and state == "completed"
    return [
        Row("runner idle RSS", "—", f"{idle_mb:.1f} MB", "—", "≤ 60 MB", idle_mb <= 60,
            note="the runner process alone (RSS from psutil), 3 s after it came online"),
        Row("runner RSS while a task prints 1 GiB", f"{idle_mb:.1f} MB idle", f"peak {peak:.1f} MB "
            f"(+{growth:.1f} MB; task {state} in {elapsed:.1f} s)", f"{peak / idle_mb:.2f}× idle",
            "flat (≤ +20 MB)", flat,
            note="`head -c 1G /dev/zero` as a host task; RSS sampled every 100 ms until 5 s after it ended"
                 + ("" if stored.returncode == 0 else "; the host could not be asked afterwards")),
    ]


def _direct_spawn(runs: int) -> float:
    true = "/bin/true" if os.path.exists("/bin/true") else "/usr/bin/true"
    start = time.perf_counter()
    for _ in range(runs):
        pid = os.posix_spawn(true, [true], os.environ)
        os.waitpid(pid, 0)
    return (time.perf_counter() - start) / runs


def _hakurun(count: int, env: dict) -> float:
    argv = [str(BIN / "hakurun"), "true", f"span:{{1..{count}}}"]
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        raise RuntimeError(f"hakurun exited {result.returncode}: {result.stderr.decode()[-300:]}")
    return time.perf_counter() - start


def hakurun_row() -> Row:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    _direct_spawn(20)
    # Interleaved rounds, best of each: a busy neighbour then hits both sides alike.
    direct, one, many = [], [], []
    for _ in range(3):
        direct.append(_direct_spawn(HAKURUN_RUNS))
        one.append(min(_hakurun(1, env) for _ in range(2)))
        many.append(_hakurun(HAKURUN_RUNS, env))
    # hakurun's own start-up cancels out: (N runs − 1 run) / (N − 1)
    per_run = (min(many) - min(one)) / (HAKURUN_RUNS - 1)
    overhead = per_run - min(direct)
    return Row("hakurun per-combination overhead (sequential `true`)",
               f"{min(direct) * 1000:.2f} ms per direct spawn (os.posix_spawn + waitpid)",
               f"{overhead * 1000:+.2f} ms ({per_run * 1000:.2f} ms per run)", f"{per_run / min(direct):.2f}×",
               "≤ 2 ms", overhead <= 0.002,
               note=f"`hakurun true 'span:{{1..{HAKURUN_RUNS}}}'` minus a 1-run hakurun, per run; best of 3 "
                    "interleaved rounds (a negative figure is within the noise)")


def run(root: Path) -> list[Row]:
    say("hakurun overhead")
    rows = [hakurun_row()]
    say("runner RSS")
    return runner_rows(root) + rows
