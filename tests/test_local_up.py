"""``deploy/local-up``, the README's first set-up command, run for real end to end.

A private prefix, a temporary ``HAKURIVER_HOME``, broker and Unix users named ``hrtest_*``
and a dashboard port of its own, so it runs beside everything else on the shared broker:
the script makes the accounts, starts host and runner, runs the first task as the person and
says so; ``deploy/local-up down`` stops them and removes the accounts it made. Whatever the
test's outcome, it leaves no process, user, queue or cgroup behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from harness.local_cluster import delete_prefix, free_port, unique_prefix, wait_until

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "local-up"


def broker_users() -> set[str]:
    listed = subprocess.run(["rabbitmqctl", "-q", "list_users", "--no-table-headers"], capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def unix_user_exists(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True).returncode == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def local_up_env():
    """The script's settings for a cluster of its own; everything it could leave is removed after."""
    home = Path(tempfile.mkdtemp(prefix="hk-local-up-"))
    home.chmod(0o755)   # the person's tasks work under it (their own directories in local_temp_dir)
    names = {"person": f"hrtest_{uuid.uuid4().hex[:8]}", "service": f"hrtest_{uuid.uuid4().hex[:8]}"}
    prefix = unique_prefix("hkt-local-up")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKURIVER_")}
    env.update({"HAKURIVER_HOME": str(home), "HAKURIVER_BROKER_PREFIX": prefix,
                "HAKURIVER_WEB_LISTEN": f"127.0.0.1:{free_port()}", "HAKURIVER_LOCAL_USER": names["person"],
                "HAKURIVER_LOCAL_SERVICE_USER": names["service"]})
    try:
        yield env, home, prefix, names
    finally:
        for name in ("host", "runner"):
            pid_file = home / f"{name}.pid"
            if pid_file.exists() and alive(pid := int(pid_file.read_text())):
                os.kill(pid, signal.SIGKILL)
        for name in names.values():
            subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60)
            subprocess.run(["userdel", "--remove", name], capture_output=True)
        asyncio.run(delete_prefix(prefix, [socket.gethostname()]))
        from runner.cgroups import open_cgroups

        try:
            open_cgroups(parent=prefix).remove_parent()
        except OSError:
            pass
        shutil.rmtree(home, ignore_errors=True)


def test_local_up_makes_its_accounts_runs_the_first_task_as_the_person_and_down_removes_them(local_up_env):
    env, home, prefix, names = local_up_env
    person, service = names["person"], names["service"]
    up = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=540)
    assert up.returncode == 0, up.stderr[-3000:]
    assert f"made broker users {service} (host and runner) and {person} (you;" in up.stderr
    assert f"owned by broker user {person}, ran as Unix user {person}:" in up.stderr, up.stderr[-3000:]
    assert up.stdout.splitlines()[-1] == f"hello from HakuRiver, as {person}"
    assert {person, service} <= broker_users() and unix_user_exists(person)
    config = (home / "config.toml").read_text()
    assert f'prefix = "{prefix}"' in config and f'state_dir = "{home}/state"' in config
    assert (home / "state" / "ledger.db").exists()           # the host's ledger is in the given home
    pids = [int((home / f"{name}.pid").read_text()) for name in ("host", "runner")]
    assert all(alive(pid) for pid in pids)

    down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert f"removed broker user {service}" in down.stderr and f"removed Unix account {person}" in down.stderr
    wait_until(lambda: not any(alive(pid) for pid in pids), 30, "host and runner stopped")
    assert not {person, service} & broker_users()
    assert not unix_user_exists(person)
    assert not (home / "accounts.env").exists() and not (home / "service.env").exists()


def test_local_up_refuses_an_unknown_command(tmp_path):
    result = subprocess.run([str(SCRIPT), "sotp"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "HAKURIVER_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr == "deploy/local-up: unknown command 'sotp' (use no argument, stop or down)\n"
