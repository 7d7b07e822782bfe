"""Drive the docker-compose test cluster from a test: build, bring up, fault, query, tear down.

Everything goes through the real tools a person would use: ``deploy/build-images.sh``,
``docker compose`` (or Debian's ``docker-compose`` v1), ``docker network`` and
``hakuriver.client`` run inside the ``host`` container. The cluster is a compose project of
its own (a unique name, its own network, volumes and shared folder), so its broker and
nodes never meet anything else on the machine. ``BROKER_CLUSTER`` is the variant with three
RabbitMQ nodes (docker-compose.broker-cluster.yml on top of docker-compose.yml).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from harness.local_cluster import wait_until

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@dataclass(frozen=True)
class Variant:
    """Which compose files make the cluster, and the services that must be healthy."""
    files: tuple[str, ...]
    services: tuple[str, ...]


SINGLE_BROKER = Variant(("docker-compose.yml",), ("rabbitmq", "host", "runner1", "runner2"))
BROKER_CLUSTER = Variant(("docker-compose.yml", "docker-compose.broker-cluster.yml"),
                         ("rabbitmq", "rabbitmq2", "rabbitmq3", "host", "runner1", "runner2"))


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


def erlang_address(term: list[int]) -> str:
    """An address as rabbitmqctl's JSON gives it, the Erlang tuple: 4 bytes, or 8 16-bit words
    (a listener on all interfaces sees IPv4 clients as IPv4-mapped IPv6: ``::ffff:172.20.0.2``)."""
    if len(term) == 4:
        return ".".join(map(str, term))
    address = ipaddress.IPv6Address(b"".join(word.to_bytes(2, "big") for word in term))
    return str(address.ipv4_mapped or address)


class ComposeCluster:
    """One compose project of the repository's docker-compose.yml (and overrides: ``variant``)."""

    def __init__(self, images: dict[str, str], workdir: Path, variant: Variant = SINGLE_BROKER) -> None:
        self.project = f"hkcluster{uuid.uuid4().hex[:8]}"
        self.variant = variant
        self.compose = compose_command()
        self._containers: dict[str, str] = {}
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
    def command(self, *args: str) -> list[str]:
        """The compose command line for this project and its files."""
        files = [arg for name in self.variant.files for arg in ("-f", str(REPO / name))]
        return [*self.compose, "-p", self.project, *files, *args]

    def run(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout, env=self.env,
                              cwd=REPO)
        if check and done.returncode != 0:
            raise ClusterError(f"compose {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return done

    def up(self) -> None:
        self.shared.mkdir(parents=True, exist_ok=True)
        self.run("up", "-d", "--no-build", timeout=300)
        for service in self.variant.services:
            wait_for(f"{service} to be healthy", lambda s=service: self.health(s) == "healthy", timeout=120)

    def down(self) -> None:
        self.run("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "80", check=False).stdout

    def container(self, service: str) -> str:
        # Asked once per service: a container keeps its id across kill and start, and each
        # compose call costs a second or two of CPU (health is polled every half second).
        if service not in self._containers:
            container_id = self.run("ps", "-q", service).stdout.strip()
            if not container_id:
                raise ClusterError(f"no container for service {service}")
            self._containers[service] = container_id
        return self._containers[service]

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

    # -- the broker nodes (the BROKER_CLUSTER variant) -----------------------------------
    def rabbitmqctl(self, service: str, *args: str) -> list | dict:
        """``rabbitmqctl ARGS --formatter json`` in the node ``service``; its answer."""
        done = subprocess.run(["docker", "exec", self.container(service), "rabbitmqctl", *args, "--formatter", "json"],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} on {service} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout)[-1000:]}")
        return json.loads(done.stdout)

    def running_broker_nodes(self, service: str) -> set[str]:
        """The cluster's running nodes as ``service`` sees them (``rabbit@rabbitmq2``, ...)."""
        return set(self.rabbitmqctl(service, "cluster_status")["running_nodes"])

    def address(self, service: str) -> str:
        """The container's address on the cluster's network."""
        inspected = subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                                    self.container(service)], capture_output=True, text=True, check=True)
        return inspected.stdout.strip()

    def broker_nodes_of(self, connection_name: str, ask: str = "rabbitmq") -> set[str]:
        """The broker services that connections whose name starts with ``connection_name``
        are on, asked of node ``ask``: a connection's ``host`` is the address it reached."""
        services = {self.address(node): node for node in self.variant.services if node.startswith("rabbitmq")}
        nodes = set()
        for connection in self.rabbitmqctl(ask, "list_connections", "host", "client_properties"):
            # The JSON formatter gives the AMQP table as [name, type, value] triples.
            properties = {entry[0]: entry[2] for entry in connection["client_properties"]}
            if properties.get("connection_name", "").startswith(connection_name):
                reached = erlang_address(connection["host"])
                if reached not in services:
                    raise ClusterError(f"a connection to {reached}, no broker node's address: {services}")
                nodes.add(services[reached])
        return nodes

    # -- hakuriver.client inside the host container ---------------------------------------
    def exec(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.run("exec", "-T", "host", *argv, timeout=timeout, check=False)

    def client_process(self, *args: str) -> subprocess.Popen:
        """``hakuriver.client ARGS`` in the host container, left running (stdout, stderr: pipes)."""
        return subprocess.Popen(self.command("exec", "-T", "host", "hakuriver.client", *args),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=REPO)

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
