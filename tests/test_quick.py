"""The light command-line path (client/quick.py, light_broker.py, wire.py, bodies.py, light_config.py).

What it must keep: the contract (every body it sends is what hakuriver/messages.py writes and
validates), the config's rules (it reads what load_config reads, or lets load_config decide),
and the broker guarantees of the aio-pika path: confirms, mandatory returns, user_id,
heartbeats, failover over several addresses, one line and exit 3 when the broker is down,
and a --wait that outlives a broker restart. Tests talk to the real broker (a private node
for the restart) and run the real CLI.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import aio_pika
import pytest

from client import bodies, light_broker, light_config, quick, wire
from client.errors import BadRequest
from client.requests import SubmitRequest
from harness.local_cluster import BIN, BROKER_URL, Cluster, delete_prefix, free_port, wait_until, write_config
from hakuriver import broker as hk_broker
from hakuriver.config import SECTIONS, Config, load_config
from hakuriver.messages import Kill, Mount, RpcRequest, StateEvent, Task, combine_state_events
from hakuriver.states import TaskState
from hakuriver.topology import Topology
from private_broker import private_broker  # noqa: F401  (the session fixture)
from test_cli_imports import loaded_modules

# ---- config: the light reader reads what load_config reads ---------------------------


def test_light_config_knows_every_section_and_key():
    assert set(light_config.KEYS) == set(SECTIONS)
    for name, model in SECTIONS.items():
        if name != "users":
            assert light_config.KEYS[name] == set(model.model_fields), name


@pytest.mark.parametrize("text, environ", [
    ("", {}),
    ('[broker]\nurl = "amqp://alice:pw@h1/,amqp://alice:pw@h2:5673/vh"\nprefix = "lab"\nqueue_type = "quorum"\n'
     '[docker]\ndefault_container = "NULL"\n[client]\nmax_sweep = 7\n[node]\ncores = 2\n[users]\nalice = "al"\n', {}),
    ('[docker]\nnetwork = "bridge"\n', {"HAKURIVER_BROKER_PREFIX": "envp", "HAKURIVER_CLIENT_MAX_SWEEP": "12",
                                         "HAKURIVER_TASK_ID": "5"}),
])
def test_light_config_agrees_with_load_config(tmp_path, monkeypatch, text, environ):
    path = tmp_path / "config.toml"
    path.write_text(text)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    light = light_config.read_settings(str(path))
    full = load_config(str(path))
    assert light == light_config.ClientSettings(full.broker.url, full.broker.prefix, full.broker.queue_type,
                                                full.docker.default_container, full.client.max_sweep)


@pytest.mark.parametrize("text, environ", [
    ("[brokr]\nurl = 'amqp://h/'\n", {}),            # unknown section
    ("[broker]\nport = 5\n", {}),                       # unknown key
    ("[client]\nmax_sweep = 'many'\n", {}),             # not a number
    ("[broker]\nqueue_type = 'fast'\n", {}),            # not one of the choices
    ("", {"HAKURIVER_BROKER_PORT": "5"}),               # unknown key by environment
    ("", {"HAKURIVER_USERS_ALICE": "al"}),              # [users] is not set by environment
])
def test_light_config_lets_load_config_refuse(tmp_path, monkeypatch, text, environ):
    path = tmp_path / "config.toml"
    path.write_text(text)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(light_config.NotPlain):
        light_config.read_settings(str(path))
    with pytest.raises(Exception):  # and the authority does refuse it (the CLI prints its words, exit 2)
        load_config(str(path))


def test_cli_config_error_is_the_config_modules_words(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[broker]\nport = 5\n")
    result = subprocess.run([str(BIN / "hakuriver.client"), "--config", str(path), "--list-nodes"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"hakuriver.client: unknown key 'broker.port' in {path}\n"


# ---- bodies: byte for byte the models' ------------------------------------------------

def _fields(**changes) -> dict:
    fields = dict(task_id=386360984018151425, batch_id=386360984018151424, command="python", args=["-c", "print(1)"],
                  env={}, cores=0.0, memory=None, target="node1", numa=None, gpus=None, gpu_count=0,
                  container=None, privileged=False, mounts=[], retries=0, retry_delay=3.0, attempt=1, after=[],
                  user="guest", submit_host="box", submitted_at=1796182831.0710416)
    fields.update(changes)
    return fields


@pytest.mark.parametrize("changes", [
    dict(retries=2, retry_delay=0.5),   # --retries 2 --retry-delay 0.5
    {},
    {"args": ["é ü 漢字 🎉", 'quote " back \\ slash', "ctl \x00\x01\x1f\x7f\u2028 nl\n tab\t"], "cores": 2.5,
     "memory": 8 << 30, "numa": 1, "env": {"A": "1", "B_2": "é\n"}, "container": "ml-env", "privileged": True},
    {"gpus": [0, 3], "gpu_count": 2, "target": "gpu-node", "mounts": [{"host_path": "/data", "container_path": "/d",
                                                                         "read_only": True}]},
    {"gpu_count": 4, "cores": 65536.0, "submitted_at": 1.5, "command": "true", "args": []},
    {"cores": 1e-05},      # pydantic writes 0.00001: the model encodes it
])
def test_task_bodies_are_the_models_bytes(changes):
    fields = _fields(**changes)
    expected = Task(**fields).to_bytes()
    body = bodies.encode_task(fields)
    assert body == expected
    assert Task.model_validate_json(body).to_bytes() == body


@pytest.mark.parametrize("changes, words", [
    ({"memory": 0}, "invalid task: memory: Input should be greater than 0"),
    ({"command": ""}, "invalid task: command: String should have at least 1 character"),
    ({"args": ["x" * (200 << 10)]}, "over the 131072 byte bound"),
    ({"args": ["\x01" * (127 << 10)], "env": {"A": "\x01" * (127 << 10)}},
     "over the 1032192 byte bound"),   # six bytes each in JSON
    ({"args": ["\udcff"]}, "not valid UTF-8"),   # a raw argv byte (a surrogate): JSON cannot carry it
])
def test_task_refusals_are_the_models_words(changes, words):
    with pytest.raises(BadRequest, match=words):
        bodies.encode_task(_fields(**changes))


def test_kill_and_rpc_bodies_are_the_models_bytes():
    for action in ("kill", "pause", "resume"):
        assert bodies.encode_kill(12, "alice", action) == Kill(task_id=12, user="alice", action=action).to_bytes()
    params = {"state": None, "node": "n1", "batch": 3, "user": "é", "limit": 50, "before": None}
    assert bodies.encode_rpc_request("list_tasks", params) == RpcRequest(method="list_tasks", params=params).to_bytes()


def test_state_events_parse_as_the_model_reads_them():
    body = StateEvent(task_id=5, node="n1", state=TaskState.FAILED, seq=3, exit_code=7, message="boom").to_bytes()
    assert light_broker.parse_state_events(body) == [light_broker.Event(5, TaskState.FAILED, "n1", 7, "boom")]
    for junk in (b"", b"[]", b'{"v": 2, "task_id": 5, "state": "failed"}', b'{"v": 1, "task_id": 5, "state": "x"}',
                 b'[{"state": ["failed"]}]', b"[[]]"):
        assert light_broker.parse_state_events(junk) == []


def test_a_combined_state_event_message_gives_each_of_its_events_in_order():
    running = StateEvent(task_id=5, node="n1", state=TaskState.RUNNING, seq=2)
    done = StateEvent(task_id=9, node="n1", state=TaskState.COMPLETED, seq=3, exit_code=0)
    (_, _, body, _), = combine_state_events([("p.events", Topology.state_key(e.task_id), e.to_bytes(), None)
                                            for e in (running, done)], events_exchange="p.events")
    assert light_broker.parse_state_events(body) == [light_broker.Event(5, TaskState.RUNNING, "n1", None, ""),
                                                     light_broker.Event(9, TaskState.COMPLETED, "n1", 0, "")]
    junk_inside = b"[" + running.to_bytes() + b', 7, {"v": 2}]'
    assert light_broker.parse_state_events(junk_inside) == [light_broker.Event(5, TaskState.RUNNING, "n1", None, "")]


def test_task_fields_match_the_api_for_the_same_request():
    """The light path's tasks have the aio-pika API's fields (client.api.Client.make_tasks)."""
    from client.api import Client, TaskSpec

    request = SubmitRequest(command=["echo", "hi"], targets=["node1:1", "gpu::0,2"], cores=1.0, memory=1 << 30,
                            env={"K": "v"}, mounts=["/a:/b:ro"], container="NULL")
    settings = light_config.ClientSettings()
    light = quick.task_fields(request, settings, "guest")
    config = Config()
    api = Client(config).make_tasks(TaskSpec(command="echo", args=["hi"], env={"K": "v"}, cores=1.0,
                                             memory=1 << 30, mounts=[Mount.parse("/a:/b:ro")]), request.targets)
    skip = {"task_id", "batch_id", "submitted_at", "submit_host"}
    for mine, theirs in zip(light, api):
        assert {k: v for k, v in mine.items() if k not in skip} == \
               {k: v for k, v in theirs.model_dump().items() if k not in skip | {"v"}}


# ---- on the real broker ------------------------------------------------------------------

@pytest.fixture
def bare_prefix(tmp_path):
    """A prefix whose exchanges exist (as a runner declares them) with node ``nodeZ`` known (its info and
    control queues) and its task queue bound, ``nodeW`` known but with no task queue (so unroutable),
    and no runner or host at all: what reaches the broker can be read back as it was sent."""
    prefix = f"hkq-{time.time_ns() % 10**10}"
    topo = Topology(prefix)

    async def declare():
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            exchanges = await hk_broker.declare_exchanges(channel, topo)
            queue = await channel.declare_queue(topo.node_queue("nodeZ"), durable=True)
            await queue.bind(exchanges.tasks, "nodeZ")
            for node in ("nodeZ", "nodeW"):
                await channel.declare_queue(topo.nodeinfo_queue(node), durable=True)
                await channel.declare_queue(topo.control_queue(node), durable=True)
    asyncio.run(declare())
    config = write_config(tmp_path / "config.toml", prefix, tmp_path)
    yield prefix, config
    asyncio.run(delete_prefix(prefix, ["nodeZ", "nodeW"]))


def _cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hakuriver.client"), "--config", str(config), *args], capture_output=True,
                          timeout=timeout)


def _take(prefix: str, queue: str) -> aio_pika.abc.AbstractIncomingMessage | None:
    async def get():
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            q = await channel.declare_queue(queue, passive=True)
            message = await q.get(no_ack=True, fail=False)
            return message
    return asyncio.run(get())


def test_submitted_task_is_the_contract_confirmed_persistent_with_user_id(bare_prefix):
    prefix, config = bare_prefix
    result = _cli(config, "--target", "nodeZ", "--env", "GREETING=grüß", "--mount", "/data:/d:ro", "--cores", "1.5",
                  "--", "sh", "-c", 'echo "a\tb"')
    assert result.returncode == 0, result.stderr
    task_id = int(result.stdout)
    message = _take(prefix, f"{prefix}.node.nodeZ")
    assert message is not None
    task = Task.model_validate_json(message.body)       # the contract's own validation
    assert task.to_bytes() == message.body              # and byte for byte what the model writes
    assert (task.task_id, task.env, task.args, task.cores) == (task_id, {"GREETING": "grüß"}, ["-c", 'echo "a\tb"'], 1.5)
    assert task.mounts == [Mount(host_path="/data", container_path="/d", read_only=True)]
    assert message.user_id == "guest" and message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"


def test_unroutable_target_is_refused_and_no_id_printed(bare_prefix):
    _, config = bare_prefix
    result = _cli(config, "--target", "nodeW", "--", "true")
    assert (result.returncode, result.stdout) == (2, b"")
    assert result.stderr == b"hakuriver.client: unknown node 'nodeW'\n"
    result = _cli(config, "--target", "nodeQ", "--", "true")   # not even known: refused before publishing
    assert (result.returncode, result.stderr) == (2, b"hakuriver.client: unknown node 'nodeQ'\n")


def test_kill_goes_to_every_node_with_user_id_when_no_host_knows_the_task(bare_prefix):
    prefix, config = bare_prefix

    async def bind_all():
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(f"{prefix}.control.nodeZ", passive=True)
            await queue.bind(f"{prefix}.control", "all")
    asyncio.run(bind_all())
    result = _cli(config, "--kill", "123")
    assert result.returncode == 0, result.stderr
    assert b"kill sent for task 123 to every runner" in result.stderr
    message = _take(prefix, f"{prefix}.control.nodeZ")
    assert Kill.model_validate_json(message.body) == Kill(task_id=123, user="guest")
    assert message.user_id == "guest"


def test_broker_down_is_one_line_and_exit_3(tmp_path):
    dead = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    config = write_config(tmp_path / "config.toml", "hkq-down", tmp_path, broker_url=dead)
    for args in (["--target", "node1", "--", "true"], ["--wait", "--", "true"], ["--list-tasks"], ["--kill", "5"]):
        result = _cli(config, *args)
        assert result.returncode == 3, result.stderr
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hakuriver.client: broker unreachable at "), lines
        assert "secret" not in lines[0] and result.stdout == b""


def test_failover_tries_each_address_in_turn(bare_prefix, tmp_path):
    prefix, _ = bare_prefix
    urls = f"amqp://guest:guest@127.0.0.1:{free_port()}/,{BROKER_URL}"
    config = write_config(tmp_path / "failover.toml", prefix, tmp_path, broker_url=urls)
    result = _cli(config, "--target", "nodeZ", "--", "true")
    assert result.returncode == 0, result.stderr
    assert Task.model_validate_json(_take(prefix, f"{prefix}.node.nodeZ").body).task_id == int(result.stdout)


def test_heartbeats_keep_an_idle_connection(bare_prefix):
    """With a 1 s heartbeat the broker drops a silent client after ~2-3 s; ours waits 4 s and is still there."""
    prefix, _ = bare_prefix
    connection = wire.connect([BROKER_URL + "?heartbeat=1"], "test-heartbeat")
    try:
        assert connection.heartbeat == 1
        channel = connection.open_channel(confirms=True)
        assert connection.next_delivery(time.monotonic() + 4.0) is None   # idle: only heartbeats flow
        ok = connection.declare_queue(channel, f"{prefix}.node.nodeZ", passive=True)
        assert ok.queue == f"{prefix}.node.nodeZ"
    finally:
        connection.close()


def test_everyday_commands_take_the_light_path(cluster):
    """submit, --wait, --status, --list-tasks, --list-nodes, --kill: no aio-pika, pydantic or asyncio loaded."""
    env = dict(cluster.env)
    code, loaded, stderr = loaded_modules("--wait", "--target", "node1", "--", "sh", "-c", "exit 4", env=env)
    assert (code, loaded) == (4, []), stderr
    task_id = cluster.cli_ok("--target", "node2", "--", "sleep", "30").strip()
    cluster.wait_state(task_id, "running")
    for argv in (["--status", task_id], ["--list-tasks", "--limit", "5"], ["--list-nodes"],
                 ["--kill", task_id, "--wait"]):
        code, loaded, stderr = loaded_modules(*argv, env=env)
        assert (code, loaded) == (0, []), (argv, stderr)
    assert cluster.task(task_id)["state"] == "killed"


def test_wait_outlives_a_broker_restart(tmp_path, private_broker):  # noqa: F811
    c = Cluster(tmp_path / "cluster", ["node1"], broker={"url": private_broker.url},
                timing={"heartbeat_interval": 0.5, "heartbeat_timeout_factor": 4, "kill_grace": 2.0})
    client = None
    try:
        c.start()
        started, go, ended = tmp_path / "started", tmp_path / "go", tmp_path / "ended"
        script = f"touch {started}; while [ ! -e {go} ]; do sleep 0.1; done; touch {ended}"
        client = subprocess.Popen([str(BIN / "hakuriver.client"), "--wait", "--timeout", "120", "--target", "node1",
                                   "--", "sh", "-c", script], env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(started.exists, 60, "the task started")
        private_broker.stop_app()
        try:
            go.touch()      # the task ends while the broker is down: its final event can only come later
            wait_until(ended.exists, 30, "the task ended")
            assert client.poll() is None   # still waiting (reconnecting): nothing could have told it
        finally:
            private_broker.start_app()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err.decode()
        task_id = int(out)
        assert f"task {task_id} completed".encode() in err
        assert c.task(task_id)["state"] == "completed"
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        c.stop()
        asyncio.run(delete_prefix(c.prefix, c.nodes, url=private_broker.url))


def test_a_prefix_nobody_started_is_said_so(tmp_path):
    config = write_config(tmp_path / "config.toml", f"hkq-none-{time.time_ns() % 10**10}", tmp_path)
    result = _cli(config, "--kill", "5")   # no host answers, so the kill goes to every node: no exchange
    assert result.returncode == 3
    assert result.stderr.decode().startswith("hakuriver.client: the broker has no exchanges of prefix 'hkq-none-")
    assert len(result.stderr.splitlines()) == 1
