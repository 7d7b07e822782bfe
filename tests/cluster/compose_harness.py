"""Drive the docker-compose test cluster from a test: build, bring up, fault, query, tear down.

Everything goes through the real tools a person would use: ``deploy/build-images.sh``,
``docker compose`` (or Debian's ``docker-compose`` v1), ``docker network`` and
``hakuriver.client`` run inside the ``host`` container. The cluster is a compose project of
its own (a unique name, its own network, volumes and shared folder), so its broker and
nodes never meet anything else on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, TypeVar

from harness.local_cluster import wait_until

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("rabbitmq", "host", "runner1", "runner2")
T = TypeVar("T")


class ClusterError(AssertionError):
    """The cluster did something other than what the test waited for."""


def compose_command() -> list[str]:
    """``docker compose`` where the plugin is installed, else Debian's ``docker-compose``."""
    plugin = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if plugin.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ClusterError("neither `docker compose` nor `docker-compose` is installed "
                       "(deploy/build-images.sh installs Debian's docker-compose)")


def build_images() -> tuple[dict[str, str], float]:
    """Run deploy/build-images.sh; returns the compose variables it prints and its seconds."""
    started = time.monotonic()
    # The wheels come from the pip of the interpreter running the tests (CI's virtual environment).
    done = subprocess.run([str(REPO / "deploy" / "build-images.sh"), "--print-env"], capture_output=True,
                          text=True, timeout=900, env=os.environ | {"PYTHON": sys.executable})
    if done.returncode != 0:
        raise ClusterError(f"deploy/build-images.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    images = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return images, time.monotonic() - started


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    try:
        return wait_until(check, timeout, what, interval)
    except AssertionError as exc:
        raise ClusterError(str(exc)) from None


class ComposeCluster:
    """One compose project of the repository's docker-compose.yml."""

    def __init__(self, images: dict[str, str], workdir: Path) -> None:
        self.project = f"hkcluster{uuid.uuid4().hex[:8]}"
        self.compose = compose_command()
        # The shared folder is bound at its own path into every container (see the
        # compose file), so this test can put scripts there and read results back.
        self.dir = workdir
        self.shared = workdir / "shared"
        self.env = os.environ | images | {"HAKURIVER_COMPOSE_DIR": str(workdir)}
        # Whatever the caller's shell sets for HakuRiver must not leak into the cluster.
        for name in list(self.env):
            if name.startswith("HAKURIVER_") and name not in images and name != "HAKURIVER_COMPOSE_DIR":
                del self.env[name]

    # -- compose ---------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.compose, "-p", self.project, "-f", str(REPO / "docker-compose.yml"), *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env, cwd=REPO)
        if check and done.returncode != 0:
            raise ClusterError(f"compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def up(self) -> None:
        self.shared.mkdir(parents=True, exist_ok=True)
        self.run("up", "-d", "--no-build", timeout=300)
        for service in SERVICES:
            wait_for(f"{service} to be healthy", lambda s=service: self.health(s) == "healthy", timeout=120)

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "80", check=False).stdout

    def container(self, service: str) -> str:
        container_id = self.run("ps", "-q", service).stdout.strip()
        if not container_id:
            raise ClusterError(f"no container for service {service}")
        return container_id

    def health(self, service: str) -> str:
        inspected = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{if .State.Health}}"
                                    "{{.State.Health.Status}}{{end}}", self.container(service)],
                                   capture_output=True, text=True)
        status, _, health = inspected.stdout.strip().partition(" ")
        return health if status == "running" else status

    # -- faults ----------------------------------------------------------------------
    def kill(self, service: str) -> None:
        self.run("kill", service)

    def start(self, service: str) -> None:
        self.run("start", service)

    @property
    def network(self) -> str:
        return f"{self.project}_default"

    def disconnect(self, service: str) -> None:
        subprocess.run(["docker", "network", "disconnect", self.network, self.container(service)], check=True)

    def connect(self, service: str) -> None:
        # Back under its service name, as compose attached it, so the others find it again.
        subprocess.run(["docker", "network", "connect", "--alias", service, self.network, self.container(service)],
                       check=True)

    # -- hakuriver.client inside the host container ---------------------------------------
    def exec(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("exec", "-T", "host", *argv, timeout=timeout, check=False)

    def client(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.exec("hakuriver.client", *args, timeout=timeout)

    def submit(self, *args: str) -> list[str]:
        """Submit (without --wait); the task ids it printed."""
        done = self.client(*args)
        if done.returncode != 0:
            raise ClusterError(f"submit {args} failed ({done.returncode}): {done.stderr}")
        return done.stdout.split()

    def task(self, task_id: str) -> dict:
        done = self.client("--status", task_id, "--json")
        if done.returncode != 0:
            raise ClusterError(f"--status {task_id} failed ({done.returncode}): {done.stderr}")
        answer = json.loads(done.stdout)
        return answer["tasks"][0] if "tasks" in answer else answer

    def state(self, task_id: str) -> str:
        return self.task(task_id)["state"]

    def wait_state(self, task_id: str, states: set[str], timeout: float) -> str:
        """Wait until the ledger has the task in one of ``states``; returns that state."""
        seen: list[str] = []

        def reached() -> str | None:
            try:
                seen.append(self.state(task_id))
            except ClusterError:  # not in the ledger yet
                return None
            return seen[-1] if seen[-1] in states else None

        try:
            return wait_for(f"task {task_id} to be {'/'.join(sorted(states))}", reached, timeout=timeout, interval=1)
        except ClusterError as exc:
            raise ClusterError(f"{exc}; states seen: {list(dict.fromkeys(seen))}") from None

    def node_online(self, node: str) -> bool:
        done = self.client("--list-nodes", "--json")
        nodes = json.loads(done.stdout)["nodes"] if done.returncode == 0 else []
        return any(n["name"] == node and n["online"] for n in nodes)

    def stdout(self, task_id: str) -> str:
        done = self.client("--stdout", task_id)
        if done.returncode != 0:
            raise ClusterError(f"--stdout {task_id} failed ({done.returncode}): {done.stderr}")
        return done.stdout
