"""Celery as a same-run baseline: 1,000 trivial tasks and single round trips, Celery then HakuRiver.

Why it exists: issue 18 asks that a lab moving from Celery loses nothing on short tasks, so
the table shows HakuRiver's figure next to Celery's, measured minutes apart on the same
machine. Celery is no dependency of the project: this section makes its own virtual
environment, ``bench/.celery-venv`` (gitignored; ``pip install celery`` from the configured
index the first time, reused after), and runs :mod:`bench.celery_side` there.

Celery's configuration is the issue's: prefork pool, concurrency 2, its task running
``subprocess.run(["true"])``, RabbitMQ broker (the bench's, under a queue and exchange name
of this section's own, deleted afterwards), rpc result backend. HakuRiver's side is the same
work as sections ``throughput`` and ``latency`` (1,000 ``true`` with ``--cores 1`` on a
2-core runner through the Python API; warm API round trips), with the worker stopped first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from bench.harness import BROKER_URL, Cluster, Row, latency, median, say
from bench.latency import api_round_trips
from bench.throughput import run_tasks

TASKS = 1000
ROUND_TRIPS = 200
CELERY = "celery==5.7.*"
VENV = Path(__file__).resolve().parent / ".celery-venv"
SIDE = Path(__file__).resolve().parent / "celery_side.py"


def celery_python() -> Path:
    """The Python of bench/.celery-venv, made (with Celery installed) if it is not there yet."""
    python = VENV / "bin" / "python"
    ready = subprocess.run([str(python), "-c", "import celery"], capture_output=True).returncode == 0 \
        if python.exists() else False
    if not ready:
        say(f"making {VENV} ({CELERY})")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", CELERY], check=True,
                       stdout=subprocess.DEVNULL)
    return python


def _celery_figures(root: Path, python: Path) -> dict:
    queue = f"hkb-celery-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HAKURIVER_BENCH_CELERY_QUEUE": queue, "HAKURIVER_BENCH_CELERY_BROKER": BROKER_URL}
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "celery-worker.log").open("wb")
    worker = subprocess.Popen(
        [str(python), "-m", "celery", "-A", "celery_side", "worker", "--pool", "prefork", "--concurrency", "2",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING", "-Q", queue],
        cwd=SIDE.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        done = subprocess.run([str(python), str(SIDE), str(TASKS), str(ROUND_TRIPS)], cwd=SIDE.parent, env=env,
                              capture_output=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"Celery client exited {done.returncode}: {done.stderr.decode()[-300:]}")
        return json.loads(done.stdout)
    finally:
        _stop(worker)
        log.close()
        asyncio.run(_delete(queue))


def _stop(worker: subprocess.Popen) -> None:
    """Warm shutdown of the worker and its pool; the whole process group if it lingers."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(worker.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    worker.wait()


async def _delete(queue: str) -> None:
    """The queue and the exchange of that name: all the section declared on the shared broker."""
    import aio_pika

    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(queue)


def _fabric_figures(root: Path) -> tuple[float, list[float]]:
    with Cluster(root / "fabric", ["node1"], node={"cores": 2}) as cluster:
        cluster.start()
        elapsed = asyncio.run(run_tasks(cluster, TASKS))
        round_trips = asyncio.run(api_round_trips(cluster, ROUND_TRIPS))
    return elapsed, round_trips


def run(root: Path) -> list[Row]:
    python = celery_python()
    say(f"Celery: {TASKS} tasks, {ROUND_TRIPS} round trips")
    celery = _celery_figures(root, python)
    say(f"HakuRiver: {TASKS} tasks, {ROUND_TRIPS} round trips")
    elapsed, round_trips = _fabric_figures(root)
    celery_rate, rate = TASKS / celery["elapsed"], TASKS / elapsed
    celery_trips = celery["round_trips"]
    return [
        Row(f"{TASKS:,} trivial tasks against Celery, submit → all results",
            f"{celery_rate:,.0f} tasks/s (Celery 5.7, prefork ×2, rpc backend; {celery['elapsed']:.2f} s)",
            f"{rate:,.0f} tasks/s ({elapsed:.2f} s)", f"{rate / celery_rate:.2f}", "≥ 1.0", rate >= celery_rate,
            note="Celery's task runs subprocess.run(['true']); HakuRiver: `true`, `--cores 1` on a 2-core runner, "
                 "one Python API submission, the host ingesting every event meanwhile"),
        Row("one task against Celery, warm client, submit → result (median / p95)",
            f"{latency(celery_trips)} (Celery `delay().get()`)", latency(round_trips),
            f"{median(round_trips) / median(celery_trips):.2f}×", "median ≤ Celery's",
            median(round_trips) <= median(celery_trips),
            note=f"{ROUND_TRIPS} round trips each after 5 untimed; HakuRiver: one connected client.api.Client "
                 "(make_tasks, waiter, submit, wait for `completed`)"),
    ]
