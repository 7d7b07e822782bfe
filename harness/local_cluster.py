"""A local cluster of real processes for tests and benchmarks: host and runners under a private broker prefix.

:class:`Cluster` starts ``hakuriver.host`` and ``hakuriver.runner`` processes against the real
RabbitMQ under a prefix of their own, runs the real CLI against them, and deletes everything it
declared on the broker when stopped. Tests and bench import it as ``from harness.local_cluster import ...``
(bench only sets its own prefix stem, broker URL and heartbeat timing).

:func:`wait_until` (and :func:`wait_until_async`, for tests inside an event loop) is the one way
tests wait for something that happens elsewhere: poll, and fail naming what never came.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any, Callable

from hakuriver import identity  # a pure module: nothing heavy is imported

BROKER_URL = os.environ.get("HAKURIVER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
BIN = Path(sys.executable).parent


def unique_prefix(stem: str = "hkt") -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


async def delete_prefix(prefix: str, nodes: list[str], url: str = BROKER_URL, ssl_context=None) -> None:
    """Delete every exchange and queue that a cluster under ``prefix`` declares (``ssl_context``: amqps://)."""
    import aio_pika

    from hakuriver.topology import Topology

    topo = Topology(prefix)
    queues = [topo.ledger, topo.rpc, topo.pipelines, topo.pool, topo.dead]
    for node in nodes:
        queues += [topo.node_queue(node), topo.control_queue(node), topo.nodeinfo_queue(node)]
    connection = await aio_pika.connect(url, ssl_context=ssl_context)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            try:
                await channel.queue_delete(name)
            except Exception:
                pass
        for name in (topo.tasks, topo.control, topo.events, topo.dead):
            channel = await connection.channel()
            try:
                await channel.exchange_delete(name)
            except Exception:
                pass


class _Deadline:
    def __init__(self, timeout: float, what: str):
        self.timeout, self.what = timeout, what
        self.at = time.monotonic() + timeout

    def check(self, last: Any) -> None:
        if time.monotonic() > self.at:
            raise AssertionError(f"timed out after {self.timeout} s waiting for {self.what} (last: {last!r})")


def wait_until(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition", interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy (and return that); fail naming ``what``."""
    deadline = _Deadline(timeout, what)
    while True:
        value = predicate()
        if value:
            return value
        deadline.check(value)
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition",
                           interval: float = 0.02):
    """:func:`wait_until` inside an event loop: sleeps without blocking it; ``predicate`` may be async."""
    deadline = _Deadline(timeout, what)
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        deadline.check(value)
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port nobody listens on right now (parallel clusters must not share the dashboard's 8000)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(path: Path, prefix: str, root: Path, broker_url: str = BROKER_URL, **sections: dict) -> Path:
    """A config file for a test cluster; ``sections`` add or override keys."""
    config = {
        "broker": {"url": broker_url, "prefix": prefix},
        "paths": {"state_dir": str(root / "state"), "shared_dir": str(root / "shared"),
                  "local_temp_dir": str(root / "tmp")},
        "timing": {"heartbeat_interval": 0.5, "heartbeat_timeout_factor": 4, "kill_grace": 2.0},
        "docker": {"default_container": "NULL"},
        "web": {"listen": f"127.0.0.1:{free_port()}"},
        # Everything here connects as the broker URL's user (guest): the host's and runners' own
        # user, so their service account, and the owner of the tests' tasks. It is made an
        # admin whose tasks run as root, as the tests' tasks always did; tests of owners and
        # accounts (test_identity.py) make broker users and Unix accounts of their own.
        "node": {"allow_root": True},
        "security": {"admins": [identity.broker_user(broker_url)]},
        "users": {identity.broker_user(broker_url): "root"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Cluster:
    """A host and runners as real processes, and the real CLI, under one private prefix.

    ``sections`` add to or override the config (see :func:`write_config`); ``prefix_stem``
    and ``broker_url`` let bench keep its queues apart from the tests'.
    """

    def __init__(self, root: Path, nodes: list[str], *, prefix_stem: str = "hkt", broker_url: str = BROKER_URL,
                 **sections: dict):
        self.root = root
        self.nodes = nodes
        self.prefix = unique_prefix(prefix_stem)
        self.broker_url = broker_url
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("shared", "tmp", "state"):
            (root / sub).mkdir(exist_ok=True)
        self.config = write_config(root / "config.toml", self.prefix, root, broker_url=broker_url, **sections)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HAKURIVER_")}
        self.env["HAKURIVER_CONFIG"] = str(self.config)
        self.env["PATH"] = f"{BIN}:{self.env.get('PATH', '/usr/bin:/bin')}"  # tasks find hakurun, python
        self.processes: dict[str, subprocess.Popen] = {}

    def load_config(self):
        """The cluster's config as its processes read it (for an in-process API client)."""
        from hakuriver.config import load_config

        return load_config(str(self.config), environ={})

    @property
    def web_url(self) -> str:
        """The host's dashboard, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        return "http://" + tomllib.loads(self.config.read_text())["web"]["listen"]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a process; ``env`` adds to (overrides) the cluster's environment for it alone."""
        with open(self.root / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
        self.processes[name] = proc
        return proc

    def start_host(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self._spawn("host", [str(BIN / "hakuriver.host")], env)

    def start_runner(self, node: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self._spawn(node, [str(BIN / "hakuriver.runner"), "--node", node], env)

    def start(self, host: bool = True, timeout: float = 30) -> "Cluster":
        """Start the host (unless ``host`` is False) and every runner; with a host, wait until all are online."""
        if host:
            self.start_host()
        for node in self.nodes:
            self.start_runner(node)
        if host:
            self.wait_online(self.nodes, timeout)
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop_process(self, name: str, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
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
            from hakuriver.tls import client_ssl_context

            context = client_ssl_context(self.load_config().broker)
            asyncio.run(delete_prefix(self.prefix, self.nodes, url=self.broker_url, ssl_context=context))
        except Exception as exc:  # never let clean-up hide what the test or benchmark found
            print(f"could not delete broker prefix {self.prefix}: {exc}", file=sys.stderr)
        from runner.cgroups import open_cgroups

        try:
            open_cgroups(parent=self.prefix).remove_parent()
        except OSError:
            pass

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def cli(self, *args: str, timeout: float = 60, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``hakuriver.client ARGS`` and return its result (stdout and stderr as bytes)."""
        return subprocess.run([str(BIN / "hakuriver.client"), *args], env=self.env, capture_output=True,
                              timeout=timeout, input=input)

    def cli_ok(self, *args: str, timeout: float = 60) -> str:
        result = self.cli(*args, timeout=timeout)
        assert result.returncode == 0, (result.returncode, result.stderr.decode())
        return result.stdout.decode()

    def query(self, *args: str):
        return json.loads(self.cli_ok(*args, "--json"))

    def heartbeat_listeners(self) -> int:
        """How many queues are bound to the runners' heartbeat key: runners hearing each other
        (runner/peers.py; the host's ledger binds a wider key). From ``rabbitmqctl list_bindings``."""
        from hakuriver.topology import Topology

        listed = subprocess.run(["rabbitmqctl", "-q", "list_bindings", "source_name", "routing_key",
                                 "--no-table-headers"], capture_output=True, text=True, timeout=120, check=True).stdout
        wanted = [Topology(self.prefix).events, Topology.heartbeat_key("*")]
        return sum(1 for line in listed.splitlines() if line.split("\t") == wanted)

    def node_states(self) -> dict[str, bool]:
        result = self.cli("--list-nodes", "--json", timeout=20)
        if result.returncode != 0:
            return {}
        return {n["name"]: n["online"] for n in json.loads(result.stdout)["nodes"]}

    def wait_online(self, nodes: list[str], timeout: float = 30) -> None:
        try:
            wait_until(lambda: all(self.node_states().get(n) for n in nodes), timeout, f"nodes {nodes} online")
        except AssertionError as exc:
            logs = "".join((self.root / f"{n}.log").read_text(errors="replace")[-500:] for n in ["host", *nodes]
                           if (self.root / f"{n}.log").exists())
            raise AssertionError(f"{exc}; logs: {logs}") from None

    def task(self, task_id: str | int) -> dict:
        return self.query("--status", str(task_id))

    def wait_state(self, task_id, states: set[str] | str, timeout: float = 30) -> dict:
        states = {states} if isinstance(states, str) else states

        def reached():
            result = self.cli("--status", str(task_id), "--json")
            if result.returncode == 0:
                task = json.loads(result.stdout)
                return task if task["state"] in states else None
        return wait_until(reached, timeout, f"task {task_id} in {states}")
