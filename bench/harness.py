"""What every benchmark section shares: a private cluster, timing helpers, result rows.

Why it exists: each section starts the real processes it needs (``hakuriver.host``,
``hakuriver.runner``, ``hakuriver.client`` from the same bin dir as this Python) under a
broker prefix of its own, measures, and tears everything down, so sections never see
each other's queues and a crashed section leaves nothing behind on the shared broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BROKER_URL = os.environ.get("HAKURIVER_BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")

from harness.local_cluster import delete_prefix, write_config  # noqa: E402


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


# ---- a private cluster ---------------------------------------------------------------

class Cluster:
    """A host and runners as real processes under one private broker prefix."""

    def __init__(self, root: Path, nodes: list[str], **sections: dict):
        self.root = root
        self.nodes = nodes
        self.prefix = f"hkb-{uuid.uuid4().hex[:8]}"
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("shared", "tmp", "state"):
            (root / sub).mkdir(exist_ok=True)
        sections.setdefault("timing", {"heartbeat_interval": 1.0, "heartbeat_timeout_factor": 5, "kill_grace": 2.0})
        self.config_path = write_config(root / "config.toml", self.prefix, root, broker_url=BROKER_URL, **sections)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HAKURIVER_")}
        self.env["HAKURIVER_CONFIG"] = str(self.config_path)
        self.env["PATH"] = f"{BIN}:{self.env.get('PATH', '/usr/bin:/bin')}"
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def config(self):
        from hakuriver.config import load_config

        return load_config(str(self.config_path), environ={})

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=self.root)
        self.processes[name] = proc
        return proc

    def start_host(self) -> subprocess.Popen:
        return self._spawn("host", [str(BIN / "hakuriver.host")])

    def start_runner(self, node: str) -> subprocess.Popen:
        return self._spawn(node, [str(BIN / "hakuriver.runner"), "--node", node])

    def start(self, host: bool = True, timeout: float = 30) -> "Cluster":
        if host:
            self.start_host()
        for node in self.nodes:
            self.start_runner(node)
        if host:
            self.wait_online(self.nodes, timeout)
        return self

    def stop_process(self, name: str, timeout: float = 15) -> None:
        proc = self.processes.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for name in list(self.processes):
            self.stop_process(name)
        try:
            asyncio.run(delete_prefix(self.prefix, self.nodes, url=BROKER_URL))
        except Exception as exc:  # never let clean-up hide a section's figures
            say(f"could not delete broker prefix {self.prefix}: {exc}")
        try:
            from runner.cgroups import open_cgroups

            open_cgroups(parent=self.prefix).remove_parent()
        except Exception:
            pass

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "hakuriver.client"), *args], env=self.env, capture_output=True,
                              timeout=timeout)

    def node_states(self) -> dict[str, bool]:
        result = self.cli("--list-nodes", "--json", timeout=20)
        if result.returncode != 0:
            return {}
        return {n["name"]: n["online"] for n in json.loads(result.stdout)["nodes"]}

    def wait_online(self, nodes: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.node_states().get(n) for n in nodes):
            if time.monotonic() > deadline:
                logs = "".join((self.root / f"{n}.log").read_text()[-500:] for n in ["host", *nodes]
                               if (self.root / f"{n}.log").exists())
                raise RuntimeError(f"nodes {nodes} not online after {timeout} s; logs: {logs}")
            time.sleep(0.1)
