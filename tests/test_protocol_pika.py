"""docs/protocol.md holds for a client that is not this project: its pika examples, run as written.

The examples (docs/examples/*.py) import nothing of HakuRiver; they follow the document. Here
they run against a real host and runner under a private prefix, and what they say is checked
against what the project's own client and ledger say.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.local_cluster import BROKER_URL, Cluster

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
PROTOCOL = EXAMPLES.parent / "protocol.md"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("pika") / "cluster", ["node1"])
    try:
        yield c.start()
    finally:
        c.stop()


def example(cluster: Cluster, name: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), "--url", BROKER_URL, "--prefix", cluster.prefix,
                           *args], capture_output=True, timeout=timeout)


def test_protocol_md_quotes_the_examples_verbatim():
    text = PROTOCOL.read_text()
    for name in ("submit_with_pika.py", "query_with_pika.py"):
        assert (EXAMPLES / name).read_text() in text, f"docs/protocol.md no longer quotes {name} as it is"


def test_submit_and_wait_from_pika(cluster):
    script = 'printf "%s from pika\\n" "$GREETING"; printf "to stderr\\n" >&2; head -c 70000 /dev/zero | tr "\\0" x'
    result = example(cluster, "submit_with_pika.py", "--target", "node1", "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr.decode()
    first, _, output = result.stdout.partition(b"\n")
    task_id = int(first)
    expected = b"hello from pika\n" + b"x" * 70000  # more than one 64 KiB chunk
    assert output == expected
    assert result.stderr.startswith(b"to stderr\n")
    event = json.loads(result.stderr.splitlines()[-1])
    assert (event["task_id"], event["state"], event["exit_code"], event["node"]) == (task_id, "completed", 0, "node1")

    # The project's own client and ledger agree: the task as pika sent it, and every byte.
    task = cluster.wait_state(task_id, "completed")
    assert (task["command"], task["args"][0], task["target"], task["cores"]) == ("sh", "-c", "node1", 1)
    assert cluster.cli("--stdout", str(task_id)).stdout == expected

    # ... and so does the RPC example.
    status = example(cluster, "query_with_pika.py", "status", str(task_id))
    assert status.returncode == 0, status.stderr.decode()
    assert json.loads(status.stdout)["tasks"][0]["state"] == "completed"
    stdout = example(cluster, "query_with_pika.py", "stdout", str(task_id))
    assert (stdout.returncode, stdout.stdout) == (0, expected)


def test_failure_exit_code_and_unknown_node_from_pika(cluster):
    failed = example(cluster, "submit_with_pika.py", "--target", "node1", "--", "sh", "-c", "exit 7")
    assert failed.returncode == 1, failed.stderr.decode()
    event = json.loads(failed.stderr.splitlines()[-1])
    assert (event["state"], event["exit_code"]) == ("failed", 7)

    unknown = example(cluster, "submit_with_pika.py", "--target", "node9", "--", "true")
    assert unknown.returncode == 2
    assert b"unknown node 'node9'" in unknown.stderr
    assert unknown.stdout == b""  # returned by the broker: no id, nothing submitted

    refused = example(cluster, "query_with_pika.py", "stdout", "1")  # the host answers ok=false
    assert (refused.returncode, refused.stdout) == (1, b"")
    assert b"the host says: unknown task 1" in refused.stderr
