"""A private RabbitMQ node for tests that stop and start the broker.

Why it exists: fault tests restart the broker, and the machine's broker at 5672 is
shared by everyone. This starts a second node with its own name, ports, data and
log directories, Erlang cookie (``$HOME/.erlang.cookie`` of a private home) and
config file (a low ``consumer_timeout``, checked every second), none of it touching the shared one.

    broker = PrivateBroker(root)      # free ports chosen at construction
    broker.start()                    # returns once the node accepts AMQP connections
    broker.restart_app()              # rabbitmqctl stop_app + start_app; returns the time it accepts again
    broker.stop()

    PrivateBroker(root, tls=(ca, cert, key))   # also an amqps:// listener (broker.tls_port) that
                                               # demands a client certificate signed by ca

The node runs as the current user (root in CI) through ``/usr/lib/rabbitmq/bin``:
the ``/usr/sbin`` wrappers would switch to the ``rabbitmq`` user, which cannot
read a pytest temporary directory.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

RABBIT_BIN = Path(os.environ.get("HAKURIVER_TEST_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))
CONSUMER_TIMEOUT_MS = 20_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts_connections(port: int) -> bool:
    """True once the AMQP listener answers (a TCP connect is enough: the listener
    opens only after the broker application has booted)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PrivateBroker:
    def __init__(self, root: Path, consumer_timeout_ms: int = CONSUMER_TIMEOUT_MS,
                 tls: tuple[Path, Path, Path] | None = None):
        self.root = root
        self.port = free_port()
        self.tls = tls                                   # (CA, server certificate, server key)
        self.tls_port = free_port() if tls else None
        self.dist_port = free_port()
        self.nodename = f"hk-faults-{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.home = root / "home"
        self.process: subprocess.Popen | None = None
        self.consumer_timeout_ms = consumer_timeout_ms

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update({
            "HOME": str(self.home),                       # where Erlang finds the cookie
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),  # not the system one (its NODENAME)
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    def _write_files(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {self.consumer_timeout_ms}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
            + self._tls_lines())
        # Channels check their consumer timeout on a tick, once a minute by default: a
        # 20 s timeout would then fire anywhere between 20 s and 80 s. Tick each second.
        (self.root / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")

    def _tls_lines(self) -> str:
        if self.tls is None:
            return ""
        ca, cert, key = self.tls
        return (f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {ca}\n"
                f"ssl_options.certfile = {cert}\n"
                f"ssl_options.keyfile = {key}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = true\n")

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.nodename, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 60) -> None:
        self._write_files()
        log = open(self.root / "server.out", "ab")
        self.process = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_accepting(timeout)

    def wait_accepting(self, timeout: float = 60) -> float:
        """Wait until the AMQP port answers; returns that moment (time.monotonic())."""
        deadline = time.monotonic() + timeout
        while not (accepts_connections(self.port) and (self.tls_port is None or accepts_connections(self.tls_port))):
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"private RabbitMQ exited ({self.process.returncode}); see {self.root}/log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"private RabbitMQ did not accept connections in {timeout} s; see {self.root}/log")
            time.sleep(0.05)
        return time.monotonic()

    def stop_app(self) -> None:
        result = self.ctl("stop_app")
        assert result.returncode == 0, result.stderr

    def start_app(self) -> float:
        """Start the broker application again; returns when it accepts connections."""
        result = self.ctl("start_app")
        assert result.returncode == 0, result.stderr
        return self.wait_accepting()

    def list_consumers(self) -> dict[str, int]:
        """Queue name → number of consumers, as the broker itself counts them."""
        result = self.ctl("list_queues", "name", "consumers", "--quiet", "--no-table-headers")
        assert result.returncode == 0, result.stderr
        counts = {}
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
        return counts

    def stop(self) -> None:
        if self.process is None:
            return
        self.ctl("stop", timeout=60)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def private_broker(tmp_path_factory):
    """One private RabbitMQ node for every fault test of the session, stopped at the end."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.fail(f"RabbitMQ is not installed ({RABBIT_BIN}/rabbitmq-server missing); run .ci/ensure-services")
    broker = PrivateBroker(tmp_path_factory.mktemp("private-rabbit"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
