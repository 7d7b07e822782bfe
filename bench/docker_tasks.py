"""Docker figures: one ``echo hi`` container submit → done, and 50 containers two at a time.

Why it exists: container tasks are the default kind, and the fabric's share of their cost
(messages, bookkeeping, log copying) must stay small next to Docker's own. The baseline is
the same containers through aiodocker directly: create, start, wait, remove, in the same run,
against the same image (``hakuriver/hakuriver-base:base``) and the same host networking.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.harness import Cluster, Row, latency, median, ms, say, submit_and_wait

IMAGE = "hakuriver/hakuriver-base:base"
CONTAINER = "hakuriver-base"
SINGLE_RUNS = 10
MANY = 50


async def _raw_container(docker, name_suffix: str) -> None:
    container = await docker.containers.create(
        {"Image": IMAGE, "Cmd": ["echo", "hi"], "HostConfig": {"NetworkMode": "host"}},
        name=f"hk-bench-raw-{name_suffix}")
    try:
        await container.start()
        await container.wait()
    finally:
        await container.delete(force=True)


async def _raw(count: int, at_once: int, tag: str) -> tuple[list[float], float]:
    """Per-container seconds and total seconds for ``count`` containers, ``at_once`` at a time."""
    import aiodocker

    docker = aiodocker.Docker()
    limit = asyncio.Semaphore(at_once)
    samples: list[float] = []

    async def one(i: int) -> None:
        async with limit:
            start = time.perf_counter()
            await _raw_container(docker, f"{tag}-{i}")
            samples.append(time.perf_counter() - start)
    try:
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return samples, time.perf_counter() - start
    finally:
        await docker.close()


async def _single_pairs(cluster: Cluster, runs: int) -> tuple[list[float], list[float]]:
    """``runs`` rounds of one raw container then one fabric task, interleaved so that a
    neighbour's load falls on both alike. Returns (raw seconds, fabric seconds)."""
    import aiodocker

    from client.api import Client, TaskSpec

    raw, fabric = [], []
    docker = aiodocker.Docker()
    try:
        async with Client(cluster.load_config()) as client:
            spec = TaskSpec(command="echo", args=["hi"], container=CONTAINER)
            for attempt in range(runs + 1):
                start = time.perf_counter()
                await _raw_container(docker, f"single-{attempt}")
                raw_elapsed = time.perf_counter() - start
                start = time.perf_counter()
                results = await client.run(spec, ["node1"], timeout=60)
                elapsed = time.perf_counter() - start
                _check(results)
                if attempt:  # the first round warms both paths
                    raw.append(raw_elapsed)
                    fabric.append(elapsed)
    finally:
        await docker.close()
    return raw, fabric


async def _fabric_many(cluster: Cluster, count: int) -> float:
    from client.api import Client, TaskSpec

    async with Client(cluster.load_config()) as client:
        tasks = client.make_tasks(TaskSpec(command="echo", args=["hi"], container=CONTAINER, cores=1),
                                  ["node1"], [["hi"]] * count)
        elapsed, results = await submit_and_wait(client, tasks)
    _check(results)
    return elapsed


def _check(results) -> None:
    bad = [r for r in results.values() if r.state.value != "completed"]
    if bad:
        raise RuntimeError(f"{len(bad)} docker tasks did not complete, e.g. {bad[0].state.value}: {bad[0].message}")


def run(root: Path) -> list[Row]:
    with Cluster(root / "docker", ["node1"], node={"cores": 2}) as cluster:
        cluster.start()
        say("docker: single containers, raw and fabric interleaved")
        raw_single, single = asyncio.run(_single_pairs(cluster, SINGLE_RUNS))
        say(f"docker: {MANY} containers: raw, fabric, raw again")
        _, raw_before = asyncio.run(_raw(MANY, 2, "many-a"))
        many = asyncio.run(_fabric_many(cluster, MANY))
        _, raw_after = asyncio.run(_raw(MANY, 2, "many-b"))
    extra = median(single) - median(raw_single)
    raw_rate, rate = MANY / ((raw_before + raw_after) / 2), MANY / many
    return [
        Row("Docker `echo hi`, submit → done (median / p95)",
            latency(raw_single) + " (aiodocker create+start+wait+remove)", latency(single),
            f"+{ms(extra)}", "≤ +30 ms", extra <= 0.030,
            note="warm Python API client; container `hakuriver-base`, host networking in both; "
                 f"{SINGLE_RUNS} rounds, raw and fabric interleaved"),
        Row(f"{MANY} Docker tasks, 2 at a time (`--cores 1` on 2 cores)",
            f"{raw_rate:.2f} containers/s (aiodocker, 2 at a time)", f"{rate:.2f} tasks/s ({many:.1f} s)",
            f"{rate / raw_rate:.2f}", "≥ 0.85", rate / raw_rate >= 0.85,
            note=f"baseline: mean time of a raw run before and one after ({raw_before:.1f} s, {raw_after:.1f} s)"),
    ]
