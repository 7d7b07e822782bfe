"""A 3-node private RabbitMQ cluster for failover tests, through deploy/rabbitmq-cluster.

Why it exists: failover can only be shown with several broker nodes, and the tests start
them with the same script an operator uses (one code path). The machine's own broker
is left alone. One cluster serves every test of the session; a test that kills a node
starts it again (``start``) before it ends, so the next test finds the cluster whole.

    cluster = BrokerCluster(tmp_dir); cluster.start()
    cluster.urls          # ["amqp://...:p1/", ...] in node order
    cluster.kill(1)       # SIGKILL node 1
    cluster.start()       # restart what is stopped; it rejoins
    cluster.members()     # (members, running members) as the cluster sees itself

HAKURIVER_TEST_BROKER_CLUSTER_DIR=DIR reuses the cluster in DIR (started if needed) and
leaves it running afterwards: a minute or two saved per run while working on these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "rabbitmq-cluster"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


class BrokerCluster:
    def __init__(self, root: Path):
        self.root = root

    def _run(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"rabbitmq-cluster {' '.join(args)}: {result.stderr or result.stdout}"
        return result.stdout

    def start(self) -> None:
        self._run("start", str(self.root))

    def stop(self) -> None:
        self._run("stop", str(self.root))

    def kill(self, node: int) -> None:
        self._run("kill", str(self.root), str(node))

    @property
    def urls(self) -> list[str]:
        return self._run("urls", str(self.root)).strip().split(",")

    def url_list(self, *order: int) -> str:
        """``[broker] url`` with the nodes in this order (1-based): the first is the one used."""
        return ",".join(self.urls[i - 1] for i in order)

    def members(self) -> tuple[int, int]:
        """(members, running members), from the status line of the script."""
        result = subprocess.run([str(SCRIPT), "status", str(self.root)], capture_output=True, text=True, timeout=120)
        line = result.stdout.strip().splitlines()[-1]
        members, running = (int(part.split(":")[1]) for part in line.split(","))
        return members, running

    def nodes(self) -> list[dict]:
        return json.loads((self.root / "cluster.json").read_text())["nodes"]


@pytest.fixture(scope="session")
def broker_cluster(tmp_path_factory):
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.fail(f"RabbitMQ is not installed ({RABBIT_BIN}/rabbitmq-server missing); run .ci/ensure-services")
    kept = os.environ.get("HAKURIVER_TEST_BROKER_CLUSTER_DIR")  # reuse (and leave running) one cluster
    cluster = BrokerCluster(Path(kept) if kept else tmp_path_factory.mktemp("rabbit-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        if not kept:
            cluster.stop()
