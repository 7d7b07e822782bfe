"""Which modules the client's command line loads: a behaviour check of its start-up, not a timing.

Why it exists: start-up time is mostly imports, and one careless module-level import (a
message model in a table renderer, say) brings pydantic back into ``--help`` without any
test noticing. Each case runs the real ``hakuriver.client`` entry point in a fresh
interpreter and reads ``sys.modules`` when it exits, so the answer is what really loaded.
(How long start-up takes is measured by ``bench/run --only latency``.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

# Each costs tens of milliseconds to import (bench/README.md, "Finding where the time goes");
# click ~30 ms: hakuriver.client parses its options with client.options instead.
HEAVY = ("pydantic", "pydantic_core", "aio_pika", "aiormq", "asyncio", "yarl", "hakuriver.messages",
         "hakuriver.config", "client.api", "client.session", "click")

PROBE = """
import atexit, json, sys
def report():
    loaded = sorted(m for m in {heavy!r} if m in sys.modules)
    sys.__stderr__.write("LOADED " + json.dumps(loaded) + "\\n")
atexit.register(report)
sys.argv = ["hakuriver.client", *{argv!r}]
from client.cli import main
main()
"""


def loaded_modules(*argv: str, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    """Run the CLI with ``argv``; its exit code, which HEAVY modules it had loaded at exit, its stderr."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, argv=list(argv))],
                            capture_output=True, text=True, timeout=60, env=env)
    lines = [line for line in result.stderr.splitlines() if line.startswith("LOADED ")]
    assert lines, f"the probe did not report (exit {result.returncode}): {result.stderr[-2000:]}"
    return result.returncode, json.loads(lines[-1][len("LOADED "):]), result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["-h"]])
def test_help_imports_nothing_heavy(argv):
    code, loaded, _ = loaded_modules(*argv)
    assert code == 0
    assert loaded == []


@pytest.mark.parametrize("argv", [
    ["--cores", "many", "--", "true"],               # a bad value
    ["--status", "12", "--kill", "13"],               # conflicting options
    ["--list-tasks", "--limit", "100000"],            # over a bound
    ["--target", "node1", "--mount", "relative:/x", "--", "true"],
])
def test_usage_errors_import_nothing_heavy(argv):
    code, loaded, stderr = loaded_modules(*argv)
    assert code == 2, stderr
    assert loaded == []


@pytest.mark.parametrize("argv", [
    ["--bogus", "--", "true"],                        # an option nobody knows
    ["--target"],                                     # a value missing
    ["--wait", "--timeout", "soon", "--", "true"],    # not a number
])
def test_parser_errors_import_nothing_heavy(argv):
    code, loaded, stderr = loaded_modules(*argv)
    assert code == 2 and len(stderr.splitlines()) == 2, stderr  # the one line, and the probe's
    assert loaded == []


def test_a_submit_imports_nothing_heavy(tmp_path):
    """The whole light submit path up to the broker (here one that cannot be reached: exit 3).
    tests/test_quick.py runs submit, --wait and the queries against a real cluster with the same probe."""
    with socket.socket() as closed:   # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = tmp_path / "config.toml"
    config.write_text(f'[broker]\nurl = "amqp://guest:guest@127.0.0.1:{port}/"\n')
    env = {**os.environ, "HAKURIVER_CONFIG": str(config)}
    code, loaded, stderr = loaded_modules("--target", "node1", "--cores", "1", "--", "true", env=env)
    assert code == 3 and "unreachable" in stderr, stderr
    assert loaded == []
