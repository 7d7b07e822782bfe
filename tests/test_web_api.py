"""The host's HTTP API and pages (hakuriver.host.web), against an in-process host, the real
broker and a real SQLite ledger: every endpoint, the filters and paging, the live event
stream, kill with each refusal, sign-in checked by the broker, and /metrics parsed by
prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import uuid

import aio_pika
import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hakuriver import broker
from hakuriver.config import (BrokerConfig, Config, ConfigError, HostConfig, PathsConfig, SecurityConfig, TimingConfig,
                              WebConfig, load_config)
from hakuriver.host.ledger import metadata
from hakuriver.host.service import Host
from hakuriver.host.web.auth import Sessions, action_refusal, may_control
from hakuriver.messages import Heartbeat, Kill, NumaNode, OutputChunk, StateEvent, Task
from hakuriver.states import TaskState
from hakuriver.topology import Topology
from test_ledger import postgres_url  # noqa: F401  (a fixture: a private PostgreSQL database)

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
PAGE_LIMIT = 300 * 1024


class Web:
    """An in-process host with its dashboard on a free port, and an HTTP session to it."""

    def __init__(self, host: Host, http: aiohttp.ClientSession):
        self.host, self.http = host, http
        self.url = host.web.url.rstrip("/")

    async def get(self, path: str, **kwargs) -> tuple[int, bytes, aiohttp.ClientResponse]:
        async with self.http.get(self.url + path, **kwargs) as response:
            return response.status, await response.read(), response

    async def get_json(self, path: str, status: int = 200):
        code, body, _ = await self.get(path)
        assert code == status, (code, body)
        return json.loads(body)

    async def post(self, path: str, **kwargs) -> tuple[int, dict]:
        async with self.http.post(self.url + path, **kwargs) as response:
            body = await response.read()
            return response.status, (json.loads(body) if response.content_type == "application/json" else {})

    async def add(self, task: Task, state: TaskState = TaskState.RUNNING, node: str | None = "node1",
                  exit_code: int | None = None, output: bytes = b"") -> int:
        seq = {TaskState.PENDING: 0, TaskState.QUEUED: 1, TaskState.RUNNING: 2}.get(state, 3)
        chunks = [(OutputChunk(task_id=task.task_id, stream="stdout", offset=0), output)] if output else []
        await self.host.ledger.ingest([StateEvent(task_id=task.task_id, state=state, seq=seq, node=node, task=task,
                                                  exit_code=exit_code, time=time.time())], chunks)
        await self.host.changes.notify()
        return task.task_id


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def task(task_id: int, user: str = "guest", command: str = "python", args=("train.py",), batch: int | None = None,
         target: str = "node1") -> Task:
    return Task(task_id=task_id, batch_id=batch or task_id, command=command, args=list(args), target=target,
                user=user, cores=1, memory=1 << 30)


@pytest.fixture
async def start_web(tmp_path):
    """``await start_web(web=..., security=...)`` → a :class:`Web`; everything is stopped after the test."""
    prefix = f"hk-web-{uuid.uuid4().hex[:8]}"
    started: list[tuple[Host, aiohttp.ClientSession]] = []

    async def start(web: dict | None = None, security: dict | None = None, database_url: str = "") -> Web:
        config = Config(broker=BrokerConfig(url=BROKER_URL, prefix=prefix), host=HostConfig(database_url=database_url),
                        paths=PathsConfig(state_dir=str(tmp_path / f"state{len(started)}"),
                                          shared_dir=str(tmp_path / "shared")),
                        timing=TimingConfig(),   # nodes stay online through a slow test: 15 s of silence
                        web=WebConfig(**{"listen": "127.0.0.1:0", **(web or {})}),
                        security=SecurityConfig(**(security or {})))
        host = Host(config)
        await host.start()
        http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # unsafe: cookies from an IP
        started.append((host, http))
        return Web(host, http)

    yield start
    for host, http in started:
        await http.close()
        if host.ledger.dialect != "sqlite":   # a shared database: leave it empty for the next test
            async with host.ledger.engine.begin() as conn:
                await conn.run_sync(metadata.drop_all)
        await host.stop()
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        topo = Topology(prefix)
        for queue in (topo.ledger, topo.rpc, topo.pipelines, topo.dead):
            await (await connection.channel()).queue_delete(queue)
        for exchange in (topo.tasks, topo.control, topo.events, topo.dead):
            await (await connection.channel()).exchange_delete(exchange)


# -- listing -------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """"" (SQLite in the state directory) or a private PostgreSQL database."""
    return "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


async def test_task_list_filters_and_pages_by_key(start_web, database_url):
    web = await start_web(database_url=database_url)
    await web.add(task(101, user="ana", command="python", batch=7), TaskState.COMPLETED, exit_code=0)
    await web.add(task(102, user="ben", command="make", batch=7), TaskState.FAILED, exit_code=2)
    await web.add(task(103, user="ana", command="python", target="node2"), TaskState.RUNNING, node="node2")
    await web.add(task(104, user="ana", command="50%_done"), TaskState.PENDING, node=None)
    await web.add(task(105, user="ben", command="python"), TaskState.RUNNING)

    first = await web.get_json("/api/tasks?limit=2")
    assert [t["task_id"] for t in first["tasks"]] == [105, 104]
    second = await web.get_json(f"/api/tasks?limit=2&before={first['next_before']}")
    assert [t["task_id"] for t in second["tasks"]] == [103, 102]
    last = await web.get_json(f"/api/tasks?limit=2&before={second['next_before']}")
    assert [t["task_id"] for t in last["tasks"]] == [101] and last["next_before"] is None

    def ids(page):
        return [t["task_id"] for t in page["tasks"]]

    assert ids(await web.get_json("/api/tasks?state=running")) == [105, 103]
    assert ids(await web.get_json("/api/tasks?node=node2")) == [103]
    assert ids(await web.get_json("/api/tasks?user=ana")) == [104, 103, 101]
    assert ids(await web.get_json("/api/tasks?batch=7")) == [102, 101]
    assert ids(await web.get_json("/api/tasks?q=pyth&user=ana")) == [103, 101]
    assert ids(await web.get_json("/api/tasks?q=50%25_")) == [104]     # % and _ are literal
    assert ids(await web.get_json("/api/tasks?state=&node=")) == [105, 104, 103, 102, 101]   # empty form fields
    bad = await web.get_json("/api/tasks?state=sleeping", status=400)
    assert "sleeping" in bad["error"]
    assert "limit" in (await web.get_json("/api/tasks?limit=0", status=400))["error"]

    status, body, _ = await web.get("/tasks?state=failed")
    assert status == 200 and b'data-task-id="102"' in body and b'data-task-id="101"' not in body


async def test_text_search_scans_a_bounded_window_and_continues_below_it(start_web, database_url, monkeypatch):
    from hakuriver.host.web import data

    monkeypatch.setattr(data, "TEXT_SCAN_ROWS", 3)
    web = await start_web(database_url=database_url)
    for task_id, command in [(1, "rare"), (2, "common"), (3, "common"), (4, "common"), (5, "rare"), (6, "common")]:
        await web.add(task(task_id, command=command), TaskState.COMPLETED, exit_code=0)
    page = await web.get_json("/api/tasks?q=rare")
    assert [t["task_id"] for t in page["tasks"]] == [5]            # ids 6, 5, 4 looked at
    assert page["scanned_to"] == 4 and page["next_before"] == 4
    page = await web.get_json("/api/tasks?q=rare&before=4")
    assert [t["task_id"] for t in page["tasks"]] == [1] and page["next_before"] is None


# -- one task ------------------------------------------------------------------------------

async def test_task_detail_output_and_download(start_web):
    web = await start_web()
    payload = "héllo\n".encode() + bytes(range(256))
    task_id = await web.add(task(201), TaskState.COMPLETED, exit_code=0, output=payload)
    await web.add(task(202, target="any"), TaskState.PENDING, node=None)

    detail = await web.get_json(f"/api/tasks/{task_id}")
    assert detail["state"] == "completed" and detail["user"] == "guest" and detail["actions"] == []
    assert detail["stdout_bytes"] == len(payload) and detail["waiting_reason"] is None
    waiting = await web.get_json("/api/tasks/202")
    assert waiting["actions"] == ["kill"] and "no runner has taken it yet" in waiting["waiting_reason"]

    status, body, response = await web.get(f"/api/tasks/{task_id}/stdout")
    assert status == 200 and body == payload and response.headers["X-Task-State"] == "completed"
    status, body, _ = await web.get(f"/api/tasks/{task_id}/stdout?offset=3")
    assert body == payload[3:]
    status, body, response = await web.get(f"/api/tasks/{task_id}/stdout?download=1")
    assert body == payload and "attachment" in response.headers["Content-Disposition"]
    status, body, _ = await web.get(f"/api/tasks/{task_id}/stderr")
    assert status == 200 and body == b""
    assert "unknown task 999" in (await web.get_json("/api/tasks/999", status=404))["error"]
    assert (await web.get("/api/tasks/999/stdout"))[0] == 404
    assert (await web.get(f"/api/tasks/{task_id}/stdout?offset=-1"))[0] == 400

    status, page, _ = await web.get(f"/tasks/{task_id}")
    assert status == 200 and b"h\xc3\xa9llo" in page and b'id="action-kill"' not in page
    assert (await web.get("/tasks/999"))[0] == 404


async def test_event_stream_follows_output_until_the_task_ends(start_web):
    web = await start_web()
    task_id = await web.add(task(301), TaskState.RUNNING, output=b"one\n")
    events: asyncio.Queue = asyncio.Queue()

    async def read_events():
        async with web.http.get(f"{web.url}/api/tasks/{task_id}/events?stdout=0&stderr=0") as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            event = {}
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if not line:
                    if event:
                        events.put_nowait(event)
                    event = {}
                elif not line.startswith(":"):
                    key, _, value = line.partition(": ")
                    event[key] = value

    reader = asyncio.create_task(read_events())
    try:
        async def next_event(kind: str) -> dict:
            while True:
                event = await asyncio.wait_for(events.get(), 10)
                if event["event"] == kind:
                    return {**json.loads(event["data"]), "id": event["id"]}

        assert (await next_event("stdout"))["text"] == "one\n"
        assert (await next_event("state"))["state"] == "running"
        await web.host.ledger.ingest(chunks=[(OutputChunk(task_id=task_id, stream="stdout", offset=4), b"tw\xc3")])
        await web.host.changes.notify()
        assert (await next_event("stdout"))["text"] == "tw"      # half a character waits for its end
        await web.host.ledger.ingest(chunks=[(OutputChunk(task_id=task_id, stream="stdout", offset=7), b"\xa9\n")])
        await web.host.changes.notify()
        got = await next_event("stdout")
        assert got["text"] == "é\n" and got["id"] == "stdout=9;stderr=0"
        await web.add(task(301), TaskState.COMPLETED, exit_code=0)
        assert (await next_event("end"))["state"] == "completed"
        await asyncio.wait_for(reader, 10)     # the server closes the stream at the end
    finally:
        reader.cancel()
    resumed = await web.http.get(f"{web.url}/api/tasks/{task_id}/events", headers={"Last-Event-ID": "stdout=4;stderr=0"})
    text = (await resumed.read()).decode()
    assert '"text": "tw\\u00e9\\n"' in text and '"text": "one' not in text


# -- actions -------------------------------------------------------------------------------

async def _control_queue(web: Web):
    """A queue of our own on the control exchange, bound like the runner of node1 is."""
    connection = await aio_pika.connect(BROKER_URL)
    channel = await connection.channel()
    topo = Topology(web.host.config.broker.prefix)
    exchanges = await broker.declare_exchanges(channel, topo)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchanges.control, "node1")
    await queue.bind(exchanges.control, "all")
    return connection, queue


async def _next_kill(queue, timeout: float = 5.0) -> tuple[str, Kill]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return message.routing_key, Kill.model_validate_json(message.body)
        await asyncio.sleep(0.02)
    raise AssertionError("no kill arrived")


async def test_kill_needs_the_owner_signed_in_with_the_broker(start_web):
    web = await start_web()
    connection, queue = await _control_queue(web)
    async with connection:
        mine = await web.add(task(401, user="guest"))
        theirs = await web.add(task(402, user="alice"))
        waiting = await web.add(task(403, user="guest", target="any"), TaskState.PENDING, node=None)
        done = await web.add(task(404, user="guest"), TaskState.COMPLETED, exit_code=0)

        status, body = await web.post(f"/api/tasks/{mine}/kill")
        assert status == 401 and "sign in" in body["error"]
        status, page, _ = await web.get(f"/tasks/{mine}/kill")
        assert status == 200 and b'id="refused"' in page and b'id="confirm"' not in page

        status, body = await web.post("/api/login", json={"user": "guest", "password": "wrong"})
        assert status == 401 and "refused" in body["error"]
        assert (await web.post("/api/login", data="nonsense"))[0] == 400
        status, body = await web.post("/api/login", json={"user": "guest", "password": "guest"})
        assert status == 200 and body == {"user": "guest"}
        assert (await web.get_json("/api/whoami")) == {"user": "guest"}

        status, body = await web.post(f"/api/tasks/{theirs}/kill")
        assert status == 403 and "neither the owner" in body["error"]
        assert await queue.get(fail=False) is None                   # nothing was sent for the refusals

        status, body = await web.post(f"/api/tasks/{mine}/kill")
        assert status == 202 and body["sent_to"] == "node1"
        key, kill = await _next_kill(queue)
        assert (key, kill.task_id, kill.user) == ("node1", mine, "guest")
        status, body = await web.post(f"/api/tasks/{waiting}/kill")
        assert status == 202 and body["sent_to"] == "all"
        assert (await _next_kill(queue))[0] == "all"
        status, body = await web.post(f"/api/tasks/{done}/kill")
        assert status == 409 and "completed" in body["error"]
        assert (await web.post("/api/tasks/999/kill"))[0] == 404
        status, body = await web.post(f"/api/tasks/{mine}/explode")
        assert status == 404 and "unknown action" in body["error"]

        status, page, _ = await web.get(f"/tasks/{mine}/kill")      # the page's confirmation step
        assert b'id="confirm"' in page
        async with web.http.post(f"{web.url}/tasks/{mine}/kill", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == f"/tasks/{mine}"
        assert (await _next_kill(queue))[1].task_id == mine
        async with web.http.post(f"{web.url}/tasks/{mine}/kill", headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403

        async with web.http.post(f"{web.url}/logout", allow_redirects=False) as response:
            assert response.status == 303
        assert (await web.get_json("/api/whoami")) == {"user": None}
        # Scripts: HTTP basic auth, checked with the broker on each call.
        status, _ = await web.post(f"/api/tasks/{mine}/kill", headers=basic("guest", "guest"))
        assert status == 202
        status, body = await web.post(f"/api/tasks/{mine}/kill", headers=basic("guest", "nope"))
        assert status == 401
        # A forged session cookie is nobody.
        web.http.cookie_jar.update_cookies({"hakuriver_session": f"guest|{int(time.time()) + 99}|0000"})
        assert (await web.get_json("/api/whoami")) == {"user": None}


async def test_admins_act_on_every_task_and_the_no_login_switch(start_web):
    admin = await start_web(security={"admins": ["guest"]})
    theirs = await admin.add(task(501, user="alice"))
    assert (await admin.post("/api/login", json={"user": "guest", "password": "guest"}))[0] == 200
    assert (await admin.post(f"/api/tasks/{theirs}/kill"))[0] == 202

    open_web = await start_web(web={"allow_actions_without_login": True})
    theirs = await open_web.add(task(502, user="alice"))
    status, body = await open_web.post(f"/api/tasks/{theirs}/kill")
    assert status == 202 and body["sent_to"] == "all"     # no runner of node1 listens here: every node is told


async def test_pause_and_resume_apply_to_running_and_paused_tasks_and_send_the_control_message(start_web):
    web = await start_web(security={"admins": ["guest"]})
    connection, queue = await _control_queue(web)
    async with connection:
        running = await web.add(task(601, user="alice"))
        paused = await web.add(task(602, user="alice"), TaskState.PAUSED)
        assert (await web.post("/api/login", json={"user": "guest", "password": "guest"}))[0] == 200
        assert (await web.get_json(f"/api/tasks/{running}"))["actions"] == ["kill", "pause"]
        assert (await web.get_json(f"/api/tasks/{paused}"))["actions"] == ["kill", "resume"]
        status, body = await web.post(f"/api/tasks/{running}/resume")
        assert status == 409 and "running" in body["error"]
        assert await queue.get(fail=False) is None
        status, body = await web.post(f"/api/tasks/{running}/pause")
        assert status == 202 and body["sent_to"] == "node1"
        key, control = await _next_kill(queue)
        assert (key, control.task_id, control.action, control.user) == ("node1", running, "pause", "guest")
        assert (await web.post(f"/api/tasks/{paused}/resume"))[0] == 202
        assert (await _next_kill(queue))[1].action == "resume"


def test_the_action_rule():
    running = {"task_id": 1, "user": "ana", "state": "running"}
    assert may_control("ana", running, [])
    assert not may_control("ben", running, [])
    assert may_control("ben", running, ["ben"])
    assert not may_control(None, running, ["ben"])
    assert not may_control("", {"task_id": 2, "user": "", "state": "running"}, [])   # no owner: admins only
    assert action_refusal(None, running, [], without_login=True) is None
    assert "sign in" in action_refusal(None, running, [], without_login=False)
    assert "neither the owner" in action_refusal("ben", running, [], without_login=True)


def test_sessions_are_signed_and_expire():
    sessions = Sessions("s3cret")
    cookie = sessions.make("ana", now=1000.0)
    assert sessions.user(cookie, now=1001.0) == "ana"
    assert sessions.user(cookie, now=1000.0 + 13 * 3600) is None                # expired
    assert sessions.user(cookie.replace("ana", "bob"), now=1001.0) is None      # forged
    assert Sessions("other").user(cookie, now=1001.0) is None                    # another host's secret
    assert sessions.user(None) is None and sessions.user("garbage") is None


# -- nodes, health, metrics, pages ---------------------------------------------------------

async def _with_a_node(web: Web) -> None:
    beat = Heartbeat(node="node1", cores_total=4, cores_free=1, memory_total=8 << 30, memory_free=6 << 30,
                     numa={0: NumaNode(cpus=[0, 1], memory=4 << 30), 1: NumaNode(cpus=[2, 3], memory=4 << 30)},
                     running=[601], queued=[602], version="0.1.0")
    await web.host.ledger.ingest(heartbeats=[beat])


async def test_nodes_and_health(start_web):
    web = await start_web()
    await _with_a_node(web)
    nodes = (await web.get_json("/api/nodes"))["nodes"]
    assert len(nodes) == 1
    node = nodes[0]
    assert node["name"] == "node1" and node["online"] and node["cores_allocated"] == 3
    assert node["memory_allocated"] == 2 << 30 and node["gpus_total"] is None and node["heartbeat_age"] >= 0
    health = await web.get_json("/api/health")
    assert health["ok"] and health["nodes_online"] == 1 and health["database"] == "sqlite"
    status, page, _ = await web.get("/nodes")
    assert status == 200 and b'data-node="node1"' in page and b"3 / 4" in page


async def test_metrics_parse_with_prometheus_client(start_web, database_url):
    web = await start_web(database_url=database_url)
    await _with_a_node(web)
    for task_id, state, exit_code in [(701, TaskState.COMPLETED, 0), (702, TaskState.FAILED, 1),
                                      (703, TaskState.RUNNING, None)]:
        await web.add(task(task_id), state, exit_code=exit_code)
    status, body, response = await web.get("/metrics")
    assert status == 200 and response.headers["Content-Type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}

    def value(name: str, **labels) -> float:
        return next(s.value for f in families.values() for s in f.samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("hakuriver_node_up", node="node1") == 1
    assert value("hakuriver_node_cores_allocated", node="node1") == 3
    assert value("hakuriver_node_memory_total_bytes", node="node1") == 8 << 30
    assert value("hakuriver_node_gpus_total", node="node1") == 0
    assert value("hakuriver_node_last_heartbeat_timestamp_seconds", node="node1") > 0
    assert value("hakuriver_tasks", state="running") == 1 and value("hakuriver_tasks", state="lost") == 0
    assert value("hakuriver_tasks_submitted_total") == 3
    assert value("hakuriver_tasks_finished_total", node="node1", outcome="failed") == 1
    assert families["hakuriver_task_duration_seconds"].type == "histogram"
    assert value("hakuriver_task_wait_seconds_count") == 1        # only 703 was seen starting
    assert value("hakuriver_task_wait_seconds_bucket", le="+Inf") == 1
    ledger_queue = web.host.topo.ledger
    assert value("hakuriver_queue_consumers", queue=ledger_queue) >= 1
    assert value("hakuriver_queue_messages", queue=web.host.topo.rpc) >= 0
    labels = {key for f in families.values() for s in f.samples for key in s.labels}
    assert "task_id" not in labels and "task" not in labels


async def test_pages_are_small_escaped_and_self_contained(start_web):
    web = await start_web()
    await _with_a_node(web)
    evil = await web.add(task(801, user="<b>eve</b>", command="<script>alert(1)</script>"))
    await web.add(task(802, user="ana"), TaskState.FAILED, exit_code=3)
    for path in ["/", "/tasks", "/tasks?state=failed", f"/tasks/{evil}", f"/tasks/{evil}/kill", "/nodes", "/login",
                 "/static/app.css", "/static/app.js"]:
        status, body, _ = await web.get(path)
        assert status == 200, path
        assert len(body) <= PAGE_LIMIT, (path, len(body))
        assert b"<script>alert" not in body and b"<b>eve" not in body, path
        assert b"http://" not in body and b"https://" not in body, path          # nothing from elsewhere
    status, body, _ = await web.get(f"/tasks/{evil}")
    assert b"&lt;script&gt;alert(1)&lt;/script&gt;" in body
    loud = await web.add(task(803), output=b"&" * 1_200_000)          # 1.2 MB that escaping makes 5 times larger
    status, body, _ = await web.get(f"/tasks/{loud}")
    assert status == 200 and len(body) <= PAGE_LIMIT and b"download" in body
    status, body, _ = await web.get("/")
    assert b'data-node="node1"' in body and b'data-state="failed">1<' in body
    assert (await web.get("/tasks?batch=abc"))[0] == 400


async def test_a_port_in_use_leaves_the_host_running_without_dashboard(start_web):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AttributeError):   # Web() reads host.web.url: there is none
            await start_web(web={"listen": f"127.0.0.1:{port}"})


def test_web_config_keys(tmp_path):
    assert load_config(environ={"HAKURIVER_WEB_LISTEN": ""}).web.address is None
    assert load_config(environ={"HAKURIVER_WEB_LISTEN": "0.0.0.0:9000"}).web.address == ("0.0.0.0", 9000)
    assert load_config(environ={"HAKURIVER_SECURITY_ADMINS": "ana,ben"}).security.admins == ["ana", "ben"]
    with pytest.raises(ConfigError, match="web.listen.*localhost"):
        load_config(environ={"HAKURIVER_WEB_LISTEN": "localhost"})


async def test_the_host_stops_promptly_with_a_live_tail_open(start_web):
    web = await start_web()
    task_id = await web.add(task(901), TaskState.RUNNING, output=b"still going\n")
    response = await web.http.get(f"{web.url}/api/tasks/{task_id}/events")
    assert (await response.content.readline()).startswith(b"event: stdout")
    assert web.host.web.dashboard.tails                     # the tail waits for the next change
    started = time.monotonic()
    await asyncio.wait_for(web.host.web.stop(), 10)
    web.host.web = None
    assert time.monotonic() - started < 5
    assert await response.content.read() is not None        # the stream was closed, not left hanging
    response.close()
