"""What every benchmark section shares: a private cluster, timing helpers, result rows.

Why it exists: each section starts the real processes it needs (``hakuriver.host``,
``hakuriver.runner``, ``hakuriver.client`` from the same bin dir as this Python) under a
broker prefix of its own, measures, and tears everything down, so sections never see
each other's queues and a crashed section leaves nothing behind on the shared broker.
The cluster is the tests' own :class:`harness.local_cluster.Cluster`, with bench's settings.
"""

from __future__ import annotations

import compileall
import functools
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import local_cluster
from harness.local_cluster import BIN  # noqa: F401  (the sections find the commands through bench.harness)

REPO = Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("HAKURIVER_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
# Slower heartbeats than the tests' (which want offline detection fast): a benchmark
# measures the work, not the bookkeeping. Keep as is, or figures stop being comparable.
TIMING = {"heartbeat_interval": 1.0, "heartbeat_timeout_factor": 5, "kill_grace": 2.0}


# ---- statistics ----------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (with 20 samples: the 19th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(0.95 * len(ordered) + 0.5)) - 1))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def latency(values: list[float]) -> str:
    """``median / p95`` of a list of seconds, in ms."""
    return f"{median(values) * 1000:.1f} / {p95(values) * 1000:.1f} ms"


@dataclass
class Row:
    """One line of the results table. ``met`` is None when there is no goal to meet."""

    figure: str
    baseline: str
    measured: str
    ratio: str
    goal: str
    met: bool | None
    note: str = ""

    def cells(self) -> list[str]:
        met = {True: "yes", False: "**no**", None: "—"}[self.met]
        return [self.figure, self.baseline, self.measured, self.ratio, self.goal, met]


def failed_row(figure: str, goal: str, error: str) -> Row:
    return Row(figure, "—", f"error: {error}", "—", goal, False)


def table(rows: list[Row]) -> str:
    header = ["figure", "baseline", "measured", "ratio", "goal", "met?"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |" for row in rows]
    notes = [f"- {row.figure}: {row.note}" for row in rows if row.note]
    return "\n".join(lines) + ("\n\nNotes:\n" + "\n".join(notes) if notes else "") + "\n"


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- timing real commands ------------------------------------------------------------

def time_command(argv: list[str], env: dict[str, str] | None = None, runs: int = 20,
                 expect_rc: int = 0) -> list[float]:
    """Wall time of ``argv`` run ``runs`` times (after one untimed warm-up run)."""
    samples = []
    for attempt in range(runs + 1):
        start = time.perf_counter()
        result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if result.returncode != expect_rc:
            raise RuntimeError(f"{' '.join(argv[:4])}… exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace')[-300:]}")
        if attempt:
            samples.append(elapsed)
    return samples


async def submit_and_wait(client, tasks: list, timeout: float = 300) -> tuple[float, dict]:
    """Seconds from subscribing to the last terminal event of ``tasks`` (one submission), and their results."""
    start = time.perf_counter()
    waiter = await client.waiter([t.task_id for t in tasks])
    await client.submit(tasks)
    results = await waiter.wait(timeout)
    return time.perf_counter() - start, results


# ---- a private cluster ---------------------------------------------------------------

class Cluster(local_cluster.Cluster):
    """The local cluster under an ``hkb-`` prefix on the bench broker, with bench's timing."""

    def __init__(self, root: Path, nodes: list[str], **sections: dict):
        sections.setdefault("timing", TIMING)
        super().__init__(root, nodes, prefix_stem="hkb", broker_url=BROKER_URL, **sections)
        # Byte code cached, as an installed package has it (pip compiles at install): under
        # PYTHONDONTWRITEBYTECODE every CLI start would compile the project's modules from source
        # again, and start-up figures would measure the compiler.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        _compile_project()


@functools.cache
def _compile_project() -> None:
    """The project's byte code in its ``__pycache__`` folders before any process starts.

    Not in a fresh ``PYTHONPYCACHEPREFIX`` (as from 2026-12-02 to issue 12): Python then looks
    for *every* module's byte code there, the standard library's and the dependencies' too, so
    the first process of each cluster compiled some 320 modules, and what the compiler left in
    its heap stayed: the runner's idle RSS went from 47 to 64 MB (bench ``footprint``), and the
    50 runners of ``fifty`` each compiled at start. The standard library and the dependencies
    already have theirs, next to their sources.
    """
    for package in ("hakuriver", "runner", "client", "hakurun"):
        compileall.compile_dir(REPO / package, quiet=1)
