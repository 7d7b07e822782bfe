"""The Celery side of the ``celery`` bench section: the Celery app and what is timed on it.

Why it exists: issue 18 measures HakuRiver against Celery on the same machine, so the bench
runs a real Celery worker next to the fabric. Celery is not a dependency of the project: this
file runs under the bench's own virtual environment (``bench/.celery-venv``, made by
:mod:`bench.celery_baseline`) and imports nothing of HakuRiver. It is both the app the worker
loads (``celery -A celery_side worker``) and, run as a script, the client that times it.

Configuration as in the issue: RabbitMQ broker, rpc result backend, a prefork worker of
concurrency 2 (started by the section), the task runs ``subprocess.run(["true"])``. Everything
is under one queue name of the section's own (queue and direct exchange of that name);
remote control and events are off, so the worker declares nothing else on the shared broker.
The rpc backend's reply queue is exclusive to the client and goes with it.

    python celery_side.py TASKS ROUND_TRIPS   prints {"elapsed": s, "round_trips": [s, ...]} as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from celery import Celery

QUEUE = os.environ["HAKURIVER_BENCH_CELERY_QUEUE"]

app = Celery("hakuriver_bench", broker=os.environ["HAKURIVER_BENCH_CELERY_BROKER"], backend="rpc://")
app.conf.update(
    task_default_queue=QUEUE, task_default_exchange=QUEUE, task_default_routing_key=QUEUE,
    worker_enable_remote_control=False, worker_send_task_events=False, task_send_sent_event=False,
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
)


@app.task(name="hakuriver_bench.run_true")
def run_true() -> int:
    return subprocess.run(["true"]).returncode


def measure(tasks: int, round_trips: int) -> dict:
    # The first tasks wait until the worker is up; they are not timed.
    for result in [run_true.delay() for _ in range(20)]:
        result.get(timeout=120)
    start = time.perf_counter()
    results = [run_true.delay() for _ in range(tasks)]
    codes = [result.get(timeout=300) for result in results]
    elapsed = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"{sum(1 for code in codes if code)} Celery tasks failed")
    samples = []
    for attempt in range(round_trips + 5):
        start = time.perf_counter()
        run_true.delay().get(timeout=30)
        if attempt >= 5:
            samples.append(time.perf_counter() - start)
    return {"elapsed": elapsed, "round_trips": samples}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]))))
