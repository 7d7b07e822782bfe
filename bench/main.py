"""``bench/run``: every benchmark section in turn, then one table (stdout and bench/last-results.md).

Why it exists: one command that measures the whole fabric against same-run baselines and
never fails on a missed goal (benchmarks report; tests judge). A section that breaks or
overruns its time budget becomes an ``error`` row and the run goes on to the next one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import (broker_memory, celery_baseline, docker_tasks, executor, fifty, footprint, latency, ledger,
                   throughput, web)
from bench.harness import Row, failed_row, say, table

# name → (module, seconds it may take, the rows it makes when it fails: figure, goal)
SECTIONS = {
    "latency": (latency, 120, [("`--wait` round trip / API round trip / start-up", "see goals")]),
    "throughput": (throughput, 150, [("1,000 tasks / 10,000-task sweep", "≥ 0.55 / ≥ 0.5")]),
    "celery": (celery_baseline, 200, [("1,000 tasks / one task against Celery", "≥ 1.0 / median ≤ Celery's")]),
    "docker": (docker_tasks, 120, [("Docker `echo hi` / 50 Docker tasks", "≤ +30 ms / ≥ 0.85")]),
    "ledger": (ledger, 150, [("ledger ingestion / `--list-tasks` on 100,000 tasks", "≥ 2,000/s / p95 ≤ 150 ms")]),
    "footprint": (footprint, 200, [("runner RSS / hakurun overhead", "≤ 60 MB, flat / ≤ 2 ms")]),
    "executor": (executor, 90, [("host task overhead through the process executor", "—")]),
    "web": (web, 240, [("dashboard `/api/tasks` and tasks page on 100,000 tasks", "p95 ≤ 150 ms")]),
    "fifty": (fifty, 900, [("50 runners: online / `--list-nodes` / pool sweep / idle", "≤ 30 s / p95 ≤ 300 ms")]),
    "broker-memory": (broker_memory, 900, [("broker memory per runner, 3-node cluster, quorum queues", "—")]),
}

# Sections run only when named in --only: 50 runner processes take minutes and most of the machine.
OPT_IN = {"fifty", "broker-memory"}

# The order of the table, by a word each figure starts with or contains.
ORDER = ["`--wait", "warm Python API", "one task against Celery", "trivial host tasks", "tasks against Celery", "`--sweep`", "Docker `echo hi`", "Docker tasks, 2",
         "ledger ingestion", "`--list-tasks`", "`--help` start-up", "submit start-up", "runner idle",
         "runner RSS while", "hakurun", "host task overhead", "dashboard", "runners online", "idle with",
         "`--list-nodes` with", "pool sweep over", "broker memory per runner"]


class Overran(Exception):
    pass


def _on_alarm(signum, frame):
    raise Overran()


def _rank(row: Row) -> int:
    return next((i for i, key in enumerate(ORDER) if key in row.figure), len(ORDER))


def _docker_ready() -> str | None:
    """None if a Docker engine answers; else why not."""
    try:
        import aiodocker  # noqa: F401
    except ImportError:
        return "aiodocker is not installed"
    if not (os.path.exists("/var/run/docker.sock") or os.environ.get("DOCKER_HOST")):
        return "no Docker engine (run `bash .ci/setup-docker.sh`)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", metavar="SECTION[,SECTION]",
                        help=f"run only these sections ({', '.join(SECTIONS)})")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, ledgers)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "last-results.md"),
                        help="where to write the table (default bench/last-results.md)")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else [name for name in SECTIONS if name not in OPT_IN]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (one of {', '.join(SECTIONS)})")

    work = Path(tempfile.mkdtemp(prefix="hakuriver-bench-"))
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    started = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        for name in chosen:
            module, budget, fallback = SECTIONS[name]
            if name == "docker" and (why := _docker_ready()):
                rows += [failed_row(figure, goal, f"skipped: {why}") for figure, goal in fallback]
                continue
            say(f"section {name} (budget {budget} s)")
            section_start = time.monotonic()
            signal.alarm(budget)
            try:
                rows += module.run(work / name)
            except Overran:
                rows += [failed_row(figure, goal, f"section over its {budget} s budget") for figure, goal in fallback]
            except Exception as exc:
                traceback.print_exc()
                rows += [failed_row(figure, goal, f"{type(exc).__name__}: {exc}"[:200]) for figure, goal in fallback]
            finally:
                signal.alarm(0)
            say(f"section {name} took {time.monotonic() - section_start:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            say(f"work directory kept: {work}")
    rows.sort(key=_rank)
    total = time.monotonic() - started
    heading = (f"# HakuRiver benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M:%S')} · {platform.node()} · "
               f"{os.cpu_count()} cores · Python {platform.python_version()} · took {total:.0f} s · "
               f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
               + (" (above the core count: neighbours were busy; read ratios rather than absolute times)"
                  if max(load_before, os.getloadavg()[0]) > (os.cpu_count() or 1) else "") + "\n\n")
    text = heading + table(rows)
    print(text)
    Path(args.out).write_text(text)
    say(f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
