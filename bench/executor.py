"""Task overhead through the process executor, and what tracking every task in its own cgroup costs.

Why it exists: every host task is tracked in a cgroup of its own, limits or not, so that
nothing it starts outlives it (README "Host tasks"). A task without limits therefore pays
a mkdir, the cgroup-joining shell in front of its command, and an rmdir, besides the
working directory made and removed for it. This measures one ``true`` task through
:class:`~runner.executors.process.ProcessExecutor` (start → wait → destroy, in this
process, no broker) against a bare asyncio spawn + wait of ``true`` in the same run, and
the same executor with no cgroup to write (the untracked path: direct spawn), so the
tracking's own share is visible. The three take turns task by task, so a busy
neighbour hits them alike.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from pathlib import Path

from bench.harness import Row, latency, median, say

RUNS = 240
_ids = itertools.count(1)


async def _bare(root: Path) -> float:
    with open(root / "bare.out", "ab") as out:
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("true", stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                    stderr=out, start_new_session=True)
        await proc.wait()
        return time.perf_counter() - start


async def _through(executor, root: Path) -> float:
    from hakuriver.messages import Task
    from runner.executors.base import RunSpec

    task = Task(task_id=next(_ids), batch_id=1, command="true", args=[], target="bench")
    spec = RunSpec(env={"HAKURIVER_TASK_ID": str(task.task_id)}, stdout_path=root / "task.out",
                   stderr_path=root / "task.err", local_temp_dir=str(root / "local"))
    start = time.perf_counter()
    handle = await executor.start(task, spec)
    outcome = await executor.wait(handle)
    await executor.destroy(handle)
    elapsed = time.perf_counter() - start
    if outcome.exit_code != 0:
        raise RuntimeError(f"`true` through the executor exited {outcome.exit_code}")
    return elapsed


async def _measure(root: Path) -> tuple[dict[str, list[float]], bool]:
    from runner.executors.process import ProcessExecutor

    tracked = ProcessExecutor(cgroup_parent=f"hkb-{uuid.uuid4().hex[:8]}")
    (root / "no-cgroups").mkdir()
    untracked = ProcessExecutor(cgroup_root=str(root / "no-cgroups"))
    kinds = {"bare": lambda: _bare(root), "tracked": lambda: _through(tracked, root),
             "untracked": lambda: _through(untracked, root)}
    samples: dict[str, list[float]] = {name: [] for name in kinds}
    try:
        for measure in kinds.values():  # warm-up: imports, command lookups, the cgroup parents
            for _ in range(5):
                await measure()
        for _ in range(RUNS):  # one of each in turn: a busy moment hits all three
            for name, measure in kinds.items():
                samples[name].append(await measure())
        return samples, tracked.cgroups.tracks()
    finally:
        tracked.cgroups.remove_parent()


def run(root: Path) -> list[Row]:
    root.mkdir(parents=True, exist_ok=True)
    say("host task overhead through the process executor")
    samples, tracks = asyncio.run(_measure(root))
    bare, tracked, untracked = (median(samples[name]) for name in ("bare", "tracked", "untracked"))
    note = (f"`true` per task, {RUNS} of each, taken in turn: start → wait → destroy through "
            "ProcessExecutor in one process (no broker), working directory made and removed; tracked = its own "
            f"cgroup and the joining shell; untracked = the direct spawn (no cgroup writable) at "
            f"{latency(samples['untracked'])}, so tracking itself costs {(tracked - untracked) * 1000:+.2f} ms")
    if not tracks:
        note += "; NO cgroup was writable here, so the tracked figure is the untracked path"
    return [Row("host task overhead through the process executor, tracked in its own cgroup (median / p95)",
                f"{latency(samples['bare'])} (asyncio spawn + wait of `true`)",
                f"{latency(samples['tracked'])} (+{(tracked - bare) * 1000:.2f} ms)", f"{tracked / bare:.2f}×",
                "—", None, note=note)]
