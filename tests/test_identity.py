"""Who ran what (hakuriver/identity.py): the owner comes from the broker-checked AMQP ``user_id``,
and only the owner or an admin may kill a task or read its output and env values.

Real broker users (``hrtest_<random>``, made with ``hakuriver.init user add``'s code and
deleted afterwards), a real cluster, the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import pwd
import subprocess
import uuid
from pathlib import Path

import aio_pika
import pytest

from hakuriver import identity
from hakuriver.admin import users
from hakuriver.messages import Kill, Task
from hakuriver.topology import Topology
from harness.local_cluster import BIN, BROKER_URL, Cluster, wait_until
from docker_fixtures import docker_engine  # noqa: F401  (fixture)

# -- the rules, as pure functions ---------------------------------------------------------


def test_broker_user_is_the_urls_user():
    assert identity.broker_user("amqp://alice:pw@broker:5672/lab") == "alice"
    assert identity.broker_user("amqps://a%40b:pw@broker/") == "a@b"
    assert identity.broker_user("amqp://broker/") == "guest"  # what AMQP clients log in as by default


def test_only_the_owner_or_an_admin_may_act():
    assert identity.may_act("alice", "alice", [])
    assert identity.may_act("root", "alice", ["root"])
    assert not identity.may_act("bob", "alice", ["root"])
    assert not identity.may_act(None, "alice", [])
    assert not identity.may_act("", "", [])           # no owner known: nobody but admins
    assert identity.refusal("bob", 123, "alice", []) == "task 123 belongs to alice"
    assert identity.is_refusal("task 123 belongs to alice") and not identity.is_refusal("unknown task 5")


def test_env_values_are_hidden_from_others():
    task = {"task_id": 1, "user": "alice", "env": {"TOKEN": "s3cret"}}
    assert identity.hide_env(task, "alice", [])["env"] == {"TOKEN": "s3cret"}
    assert identity.hide_env(task, "root", ["root"])["env"] == {"TOKEN": "s3cret"}
    assert identity.hide_env(task, "bob", [])["env"] == {"TOKEN": identity.HIDDEN}
    assert identity.hide_env(task, None, [])["env"] == {"TOKEN": identity.HIDDEN}


# -- the broker enforces the client's permissions ------------------------------------------


def _url(name: str, password: str) -> str:
    return BROKER_URL.replace("guest:guest@", f"{name}:{password}@")


@pytest.fixture
def make_user():
    """Make broker users for a prefix (``users.add``, as ``hakuriver.init user add`` does), each with
    a Unix account of the same name; delete both afterwards."""
    made = []

    def make(prefix: str, admin_or_client: str = "client") -> tuple[str, str]:
        name = f"hrtest_{uuid.uuid4().hex[:8]}"
        password = users.add(name, None, prefix, "/", service=admin_or_client == "service")
        made.append(name)
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
        return name, _url(name, password)
    yield make
    for name in made:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True)
        subprocess.run(["userdel", name], capture_output=True)


async def _ignore(message) -> None:
    pass


async def _refused(url: str, action) -> str:
    """The broker's error for ``action(channel)`` over a connection to ``url``; '' if it succeeded."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            await action(channel)
        except aio_pika.exceptions.AMQPError as exc:
            return str(exc)
        return ""


def test_user_list_shows_and_remove_deletes_only_hakuriver_users(prefix, make_user):
    name, _ = make_user(prefix)
    assert any(a.name == name and not a.service for a in users.accounts(prefix))
    with pytest.raises(users.UserError, match="no HakuRiver user"):
        users.remove("guest", prefix)   # a broker user this command did not make
    users.remove(name, prefix)
    assert name not in {a.name for a in users.accounts(prefix)}


def test_a_client_user_cannot_forge_events_consume_node_queues_or_forge_user_id(cluster, make_user):
    name, url = make_user(cluster.prefix)
    topo = Topology(cluster.prefix)

    async def publish_event(channel):
        events = await channel.get_exchange(topo.events, ensure=False)
        await events.publish(aio_pika.Message(b"{}", user_id=name), routing_key="task.1.state")

    async def publish_dead(channel):
        dead = await channel.get_exchange(topo.dead, ensure=False)
        await dead.publish(aio_pika.Message(b"{}", user_id=name), routing_key="")

    async def consume_node_queue(channel):
        queue = await channel.declare_queue(topo.node_queue("node1"), passive=True)
        await queue.consume(_ignore)

    async def consume_pool(channel):
        queue = await channel.declare_queue(topo.pool, passive=True)
        await queue.consume(_ignore)

    async def forge_user_id(channel):
        tasks = await channel.get_exchange(topo.tasks, ensure=False)
        await tasks.publish(aio_pika.Message(b"{}", user_id="someone_else"), routing_key="node1")

    async def declare_exchange(channel):  # configure: could delete it too
        await channel.declare_exchange(topo.tasks, aio_pika.ExchangeType.DIRECT, durable=True)

    async def other_prefix(channel):
        await channel.declare_exchange(f"other-{cluster.prefix}.tasks", aio_pika.ExchangeType.DIRECT)

    for action in (publish_event, publish_dead, consume_node_queue, consume_pool, declare_exchange, other_prefix):
        assert "ACCESS_REFUSED" in asyncio.run(_refused(url, action)), action.__name__
    assert "PRECONDITION_FAILED" in asyncio.run(_refused(url, forge_user_id))
    assert "user_id property set to 'someone_else'" in asyncio.run(_refused(url, forge_user_id))


# -- owners and admins on a real cluster ---------------------------------------------------


@pytest.fixture
def owners(tmp_path, make_user):
    """A cluster (host and runners as guest, their service account) with users alice, bob and an admin."""
    c = Cluster(tmp_path / "cluster", ["node1"])
    alice, alice_url = make_user(c.prefix)
    bob, bob_url = make_user(c.prefix)
    admin, admin_url = make_user(c.prefix)
    from harness.local_cluster import write_config

    write_config(c.config, c.prefix, c.root, security={"admins": [admin]})
    for path in (c.root, *c.root.parents):  # pytest's directories are root's alone: let the owners reach theirs
        if path == Path("/tmp"):
            break
        path.chmod(path.stat().st_mode | 0o055)
    (c.root / "shared").chmod(0o1777)
    try:
        c.start()
        yield c, {"alice": (alice, alice_url), "bob": (bob, bob_url), "admin": (admin, admin_url)}
    finally:
        c.stop()


def cli_as(c: Cluster, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hakuriver.client"), *args], env={**c.env, "HAKURIVER_BROKER_URL": url},
                          capture_output=True, timeout=60)


def test_only_the_owner_or_an_admin_kills_and_reads(owners):
    c, people = owners
    (alice, alice_url), (bob, bob_url), (admin, admin_url) = people["alice"], people["bob"], people["admin"]
    gate = c.root / "shared" / "gate"
    submitted = cli_as(c, alice_url, "--target", "node1", "--env", "TOKEN=s3cret", "--", "sh", "-c",
                       f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done")
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.decode().strip()
    c.wait_state(task_id, "running")

    refused = cli_as(c, bob_url, "--kill", task_id)
    assert refused.returncode == 1
    assert refused.stderr.decode() == f"task {task_id} belongs to {alice}\n"
    shown = json.loads(cli_as(c, bob_url, "--status", task_id, "--json").stdout)
    assert shown["user"] == alice and shown["env"] == {"TOKEN": identity.HIDDEN}
    assert f"owner:        {alice}" in cli_as(c, bob_url, "--status", task_id).stdout.decode()
    gate.touch()
    assert c.wait_state(task_id, {"completed", "killed"})["state"] == "completed"  # bob's kill changed nothing

    refused = cli_as(c, bob_url, "--stdout", task_id)
    assert (refused.returncode, refused.stdout) == (1, b"")
    assert refused.stderr.decode() == f"task {task_id} belongs to {alice}\n"
    assert cli_as(c, alice_url, "--stdout", task_id).stdout == b"done\n"
    assert cli_as(c, admin_url, "--stdout", task_id).stdout == b"done\n"
    assert json.loads(cli_as(c, alice_url, "--status", task_id, "--json").stdout)["env"] == {"TOKEN": "s3cret"}

    for killer_url in (alice_url, admin_url):  # the owner's kill works, and an admin's
        task = cli_as(c, alice_url, "--target", "node1", "--", "sleep", "60").stdout.decode().strip()
        c.wait_state(task, "running")
        killed = cli_as(c, killer_url, "--kill", task)
        assert killed.returncode == 0, killed.stderr
        assert c.wait_state(task, {"killed", "completed"})["state"] == "killed"

    mine = json.loads(cli_as(c, bob_url, "--list-tasks", "--mine", "--json").stdout)["tasks"]
    assert mine == []
    theirs = json.loads(cli_as(c, bob_url, "--list-tasks", "--user", alice, "--json").stdout)["tasks"]
    assert len(theirs) == 3 and {t["user"] for t in theirs} == {alice}


def test_a_task_without_user_id_never_runs(owners):
    """A raw publish without user_id (guest may publish: it is the cluster's service account here)."""
    c, _ = owners
    marker = c.root / "shared" / "ran"
    task = Task(task_id=4242, batch_id=4242, command="touch", args=[str(marker)], target="node1", user="alice")

    async def publish():
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            tasks = await channel.get_exchange(Topology(c.prefix).tasks, ensure=False)
            await tasks.publish(aio_pika.Message(task.to_bytes(), delivery_mode=2), routing_key="node1",
                                mandatory=True)
            control = await channel.get_exchange(Topology(c.prefix).control, ensure=False)
            await control.publish(aio_pika.Message(Kill(task_id=1).to_bytes(), delivery_mode=2), routing_key="node1")
    asyncio.run(publish())
    ended = c.wait_state(4242, "rejected")
    assert ended["message"] == identity.NO_USER and ended["user"] == ""
    assert not marker.exists()
    reasons: list[str] = []

    def kill_dead_lettered() -> bool:
        reasons.extend(_dead_reasons(c))
        return any(identity.NO_USER in reason for reason in reasons)
    wait_until(kill_dead_lettered, 20, "the kill without user_id dead-lettered")


def _dead_reasons(c: Cluster) -> list[str]:
    async def read():
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(Topology(c.prefix).dead, passive=True)
            reasons = []
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                reasons.append(message.headers.get("x-hakuriver-reason", ""))
            return reasons
    return asyncio.run(read())


def test_host_tasks_run_as_their_owner_and_cannot_leave_their_cgroup(owners):
    c, people = owners
    alice, alice_url = people["alice"]
    code = cli_as(c, alice_url, "--wait", "--target", "node1", "--container", "NULL", "--memory", "64M", "--",
                  "sh", "-c", "id -un; echo $HOME $USER $LOGNAME; touch .; "
                  "echo $$ > /sys/fs/cgroup/memory/cgroup.procs && echo escaped")
    task_id = code.stdout.decode().strip()
    assert task_id, code.stderr
    out = cli_as(c, alice_url, "--stdout", task_id).stdout.decode().splitlines()
    assert out and out[0] == alice, (code.stderr, c.task(task_id))
    assert out[1].split()[1:] == [alice, alice]
    assert "escaped" not in out
    assert code.returncode != 0   # the write to the root cgroup failed, so did the task
    err = cli_as(c, alice_url, "--stderr", task_id).stdout.decode()
    assert "Permission denied" in err or "denied" in err.lower(), err


def test_a_tasks_output_files_on_the_runner_are_its_owners_alone(owners):
    c, people = owners
    (alice, alice_url), (bob, _) = people["alice"], people["bob"]
    gate = c.root / "shared" / "gate-output"
    submitted = cli_as(c, alice_url, "--target", "node1", "--container", "NULL", "--", "sh", "-c",
                       f"echo secret-out; echo secret-err >&2; while [ ! -e {gate} ]; do sleep 0.05; done")
    task_id = submitted.stdout.decode().strip()
    assert task_id, submitted.stderr
    c.wait_state(task_id, "running")
    files = [c.root / "state" / "runner-node1" / "output" / f"{task_id}.{stream}" for stream in ("stdout", "stderr")]
    wait_until(lambda: all(path.exists() and path.stat().st_size for path in files), 20, "the task's output written")
    alice_uid, bob_uid = pwd.getpwnam(alice).pw_uid, pwd.getpwnam(bob).pw_uid
    for path in files:
        info = path.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (alice_uid, pwd.getpwnam(alice).pw_gid, 0o600)

    def read_as(uid: int, path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={pwd.getpwuid(uid).pw_gid}", "--clear-groups",
                               "cat", str(path)], capture_output=True, text=True, timeout=30)
    assert read_as(alice_uid, files[0]).stdout == "secret-out\n"
    refused = read_as(bob_uid, files[1])
    assert refused.returncode != 0 and "Permission denied" in refused.stderr and refused.stdout == ""
    gate.touch()
    assert c.wait_state(task_id, {"completed", "failed"})["state"] == "completed"
    assert cli_as(c, alice_url, "--stderr", task_id).stdout == b"secret-err\n"


def test_a_task_whose_owner_has_no_account_here_is_rejected(owners):
    c, people = owners
    # guest (the cluster's service account) is no admin in this cluster and has no "guest"
    # account: its [users] mapping to root is only for admins
    result = c.cli("--wait", "--target", "node1", "--", "true")
    task = c.task(result.stdout.decode().strip())
    assert task["state"] == "rejected"
    assert "would run as root" in task["message"] and "no admin" in task["message"]


def test_a_container_task_writes_shared_files_as_its_owner(owners, docker_engine):  # noqa: F811
    c, people = owners
    alice, alice_url = people["alice"]
    done = cli_as(c, alice_url, "--wait", "--target", "node1", "--container", "hakuriver-base", "--",
                  "sh", "-c", "id -u; touch /shared/by-owner")
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.decode().strip()
    uid = pwd.getpwnam(alice).pw_uid
    assert cli_as(c, alice_url, "--stdout", task_id).stdout == f"{uid}\n".encode()
    assert (c.root / "shared" / "by-owner").stat().st_uid == uid


def test_init_user_add_prints_the_config_lines_and_remove_deletes(tmp_path, prefix):
    config = tmp_path / "config.toml"
    config.write_text(f'[broker]\nurl = "{BROKER_URL}"\nprefix = "{prefix}"\n')
    name = f"hrtest_{uuid.uuid4().hex[:8]}"
    init = str(BIN / "hakuriver.init")
    try:
        made = subprocess.run([init, "user", "add", name, "--password", "pw-of-test", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        assert made.stdout == f'[broker]\nurl = "amqp://{name}:pw-of-test@127.0.0.1:5672/"\n'
        listed = subprocess.run([init, "user", "list", "--config", str(config)], capture_output=True, text=True)
        assert f"{name}\tuser" in listed.stdout.splitlines()
        again = subprocess.run([init, "user", "add", name, "--config", str(config)], capture_output=True, text=True)
        assert again.returncode == 1 and "already exists" in again.stderr
    finally:
        removed = subprocess.run([init, "user", "remove", name, "--config", str(config)], capture_output=True,
                                 text=True, timeout=120)
    assert removed.returncode == 0, removed.stderr
    assert name not in {account.name for account in users.accounts(prefix)}
