"""The dashboard's HTTP server: routes for the pages, the JSON API and ``/metrics``.

Why aiohttp.web: it runs in the host's own asyncio loop beside the consumers (no second
service, no thread), it is already installed (aiodocker depends on it), and it streams
server-sent events with a plain ``StreamResponse``. Handlers only read the ledger and
publish control messages on the host's connection; nothing here writes the ledger.
The API is documented in docs/web.md.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from aio_pika.abc import AbstractExchange
from aiohttp import hdrs, web

from hakuriver import __version__
from hakuriver.broker import BrokerUnreachable
from hakuriver.config import Config
from hakuriver.bounds import INT64
from hakuriver.bounds import MAX_READ_BYTES
from hakuriver.host.ledger import STREAMS, Ledger, UnknownTask
from hakuriver.host.queries import LedgerChanges
from hakuriver.host.web import data, metrics, pages
from hakuriver.host.web.actions import ACTIONS, available
from hakuriver.host.web.auth import COOKIE, SESSION_SECONDS, Sessions, action_refusal, broker_accepts
from hakuriver.states import TaskState
from hakuriver.topology import Topology

log = logging.getLogger("hakuriver.host.web")

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0          # an SSE comment this often keeps proxies from closing a quiet tail
SSE_READ = 256 * 1024       # bytes of a stream per event


@dataclass
class WebContext:
    """What the dashboard needs from the host."""

    config: Config
    ledger: Ledger
    changes: LedgerChanges
    counters: Callable[[], dict[str, int]]
    connection: Any                  # the host's robust broker connection (queue figures)
    control: AbstractExchange        # the control exchange, on a channel with publisher confirms


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(value), status=status, content_type="application/json")


def _api_error(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
           409: web.HTTPConflict, 503: web.HTTPServiceUnavailable}[status]
    return cls(text=json.dumps({"error": message}), content_type="application/json")


def _page(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _task_id(request: web.Request) -> int:
    task_id = int(request.match_info["task_id"])
    if task_id >= INT64:
        raise _api_error(404, f"unknown task {task_id}")
    return task_id


def _local_path(target: str | None) -> str:
    """Where to send a browser after sign-in: a path on this site, never elsewhere."""
    if target and target.startswith("/") and not target.startswith("//") and not urlsplit(target).netloc:
        return target
    return "/"


class Dashboard:
    """The request handlers, sharing the host's context and the session signer."""

    def __init__(self, ctx: WebContext):
        self.ctx = ctx
        self.sessions = Sessions(ctx.config.web.secret)
        self.topo = Topology(ctx.config.broker.prefix)
        self.tails: set[asyncio.Task] = set()

    # -- who is asking ------------------------------------------------------------------

    def viewer(self, request: web.Request) -> str | None:
        return self.sessions.user(request.cookies.get(COOKIE))

    async def actor(self, request: web.Request) -> str | None:
        """The signed-in user (cookie), or for scripts HTTP basic auth checked with the broker."""
        user = self.viewer(request)
        header = request.headers.get(hdrs.AUTHORIZATION, "")
        if user is None and header.startswith("Basic "):
            try:
                login, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
            except ValueError:
                raise _api_error(400, "bad Authorization header (Basic base64(user:password) expected)")
            if not await self._broker_accepts(login, password):
                raise _api_error(401, f"the broker refused the credentials of {login!r}")
            user = login
        return user

    async def _broker_accepts(self, user: str, password: str) -> bool:
        try:
            return await broker_accepts(self.ctx.config.broker, user, password)
        except BrokerUnreachable as exc:
            raise _api_error(503, str(exc))

    def _same_origin(self, request: web.Request) -> None:
        # Form posts come from our own pages; a browser names the page's origin.
        origin = request.headers.get(hdrs.ORIGIN)
        if origin and origin != "null" and urlsplit(origin).netloc != request.host:
            raise _api_error(403, f"cross-site request from {origin} refused")

    async def _task(self, task_id: int) -> dict[str, Any]:
        task = await data.task_row(self.ctx.ledger, task_id)
        if task is None:
            raise _api_error(404, f"unknown task {task_id}")
        return task

    def _refusal(self, user: str | None, task: dict[str, Any]) -> str | None:
        web_config = self.ctx.config.web
        return action_refusal(user, task, self.ctx.config.security.admins, web_config.allow_actions_without_login)

    async def _act(self, action_name: str, task_id: int, user: str | None) -> tuple[int, dict[str, Any]]:
        """Perform an action: (HTTP status, JSON body)."""
        action = ACTIONS.get(action_name)
        if action is None:
            return 404, {"error": f"unknown action {action_name!r} (one of {', '.join(ACTIONS)})"}
        task = await self._task(task_id)
        refusal = self._refusal(user, task)
        if refusal:
            return (401 if user is None else 403), {"error": refusal}
        if not action.applies(task):
            return 409, {"error": f"task {task_id} is {task['state']}: {action_name} does not apply"}
        result = await action.perform(self.ctx.control, task, user or "web")
        log.info("%s of task %d asked from the dashboard by %s", action_name, task_id, user or "anonymous")
        return 202, {"task_id": task_id, "action": action_name, **result}

    # -- pages --------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.Response:
        ledger = self.ctx.ledger
        return _page(pages.overview(await data.nodes(ledger), await data.counts_by_state(ledger),
                                    await data.latest_failures(ledger), self.viewer(request)))

    async def tasks(self, request: web.Request) -> web.Response:
        try:
            where = data.TaskFilter.parse(dict(request.query))
        except ValueError as exc:
            return _page(pages.not_found(str(exc), self.viewer(request)), 400)
        return _page(pages.tasks(await data.task_page(self.ctx.ledger, where), where, self.viewer(request)))

    async def task(self, request: web.Request) -> web.Response:
        user = self.viewer(request)
        task = await data.task_row(self.ctx.ledger, _task_id(request))
        if task is None:
            return _page(pages.not_found(f"unknown task {request.match_info['task_id']}", user), 404)
        outputs = {}
        for stream in STREAMS:
            size = task[f"{stream}_bytes"]
            start = max(0, size - pages.TAIL_BYTES)
            piece = await self.ctx.ledger.read_output(task["task_id"], stream, start, size - start)
            outputs[stream] = (piece.data.decode("utf-8", "replace"), start + len(piece.data))
        return _page(pages.task(task, outputs, user, available(task), self._refusal(user, task)))

    async def confirm(self, request: web.Request) -> web.Response:
        user = self.viewer(request)
        task = await data.task_row(self.ctx.ledger, _task_id(request))
        action = request.match_info["action"]
        if task is None or action not in ACTIONS:
            return _page(pages.not_found(f"no {action} for task {request.match_info['task_id']}", user), 404)
        return _page(pages.confirm_action(task, action, user, self._refusal(user, task)))

    async def act_form(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        user = self.viewer(request)
        task_id = _task_id(request)
        status, body = await self._act(request.match_info["action"], task_id, user)
        if status == 202 or status == 409:
            raise web.HTTPSeeOther(f"/tasks/{task_id}")
        return _page(pages.not_found(body["error"], user), status)

    async def nodes(self, request: web.Request) -> web.Response:
        return _page(pages.nodes(await data.nodes(self.ctx.ledger), self.viewer(request)))

    async def login_page(self, request: web.Request) -> web.Response:
        return _page(pages.login(self.viewer(request), _local_path(request.query.get("next"))))

    async def login_form(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        form = await request.post()
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        target = _local_path(str(form.get("next", "")))
        try:
            accepted = await broker_accepts(self.ctx.config.broker, user, password)
        except BrokerUnreachable as exc:
            return _page(pages.login(None, target, str(exc)), 503)
        if not accepted:
            return _page(pages.login(None, target, f"the broker refused the sign-in of {user!r}"), 401)
        response = web.HTTPSeeOther(target)
        self._set_session(response, user)
        raise response

    def _set_session(self, response: web.StreamResponse, user: str) -> None:
        response.set_cookie(COOKIE, self.sessions.make(user), max_age=SESSION_SECONDS, httponly=True,
                            samesite="Strict", path="/")

    async def logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/")
        response.del_cookie(COOKIE, path="/")
        raise response

    # -- the JSON API -------------------------------------------------------------------

    async def api_tasks(self, request: web.Request) -> web.Response:
        try:
            where = data.TaskFilter.parse(dict(request.query))
        except ValueError as exc:
            raise _api_error(400, str(exc))
        page = await data.task_page(self.ctx.ledger, where)
        return _json(page.model_dump())

    async def api_task(self, request: web.Request) -> web.Response:
        task = await self._task(_task_id(request))
        return _json({**task, "waiting_reason": pages.waiting_reason(task), "actions": available(task)})

    async def api_output(self, request: web.Request) -> web.StreamResponse:
        task_id, stream = _task_id(request), request.match_info["stream"]
        try:
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            raise _api_error(400, f"offset must be a number, not {request.query['offset']!r}")
        if offset < 0:
            raise _api_error(400, f"offset must be >= 0, not {offset}")
        try:
            first = await self.ctx.ledger.read_output(task_id, stream, offset)
        except UnknownTask as exc:
            raise _api_error(404, str(exc))
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                               "X-Task-State": first.state,
                                               "Content-Length": str(max(0, first.size - offset))})
        if request.query.get("download"):
            response.headers["Content-Disposition"] = f'attachment; filename="task-{task_id}.{stream}"'
        await response.prepare(request)
        piece = first
        while piece.data:
            await response.write(piece.data)
            offset += len(piece.data)
            if offset >= first.size:
                break
            piece = await self.ctx.ledger.read_output(task_id, stream, offset,
                                                      min(MAX_READ_BYTES, first.size - offset))
        await response.write_eof()
        return response

    async def api_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events following a task: ``stdout``/``stderr`` (``{"text"}``) as the
        ledger stores output, ``state`` on a change, ``end`` once it ended and all is sent."""
        task_id = _task_id(request)
        task = await self._task(task_id)
        offsets = self._event_offsets(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        me = asyncio.current_task()
        self.tails.add(me)
        try:
            await self._follow(response, task, offsets)
        except (ConnectionResetError, asyncio.CancelledError):
            pass   # the browser went away, or the host stops
        finally:
            self.tails.discard(me)
        return response

    def _event_offsets(self, request: web.Request) -> dict[str, int]:
        # A reconnecting EventSource names the last event it got: resume after it.
        resumed = dict(part.split("=", 1) for part in request.headers.get("Last-Event-ID", "").split(";")
                       if "=" in part)
        offsets = {}
        for stream in STREAMS:
            value = resumed.get(stream, request.query.get(stream, "0"))
            if not value.isdigit():
                raise _api_error(400, f"{stream} offset must be a number ≥ 0, not {value!r}")
            offsets[stream] = int(value)
        return offsets

    async def _follow(self, response: web.StreamResponse, task: dict[str, Any], offsets: dict[str, int]) -> None:
        ledger, changes = self.ctx.ledger, self.ctx.changes
        decoders = {stream: codecs.getincrementaldecoder("utf-8")("replace") for stream in STREAMS}
        shown = None

        async def send(event: str, body: dict[str, Any]) -> None:
            event_id = ";".join(f"{stream}={offsets[stream]}" for stream in STREAMS)
            await response.write(f"event: {event}\nid: {event_id}\ndata: {json.dumps(body)}\n\n".encode())

        while True:
            generation = changes.generation
            drained = True
            for stream in STREAMS:
                piece = await ledger.read_output(task["task_id"], stream, offsets[stream], SSE_READ)
                offsets[stream] += len(piece.data)
                text = decoders[stream].decode(piece.data)
                if text:
                    await send(stream, {"text": text})
                drained &= offsets[stream] >= piece.size
            task = await data.task_row(ledger, task["task_id"]) or task
            now = {key: task.get(key) for key in ("state", "exit_code", "message", "finished_at")}
            if now != shown:
                shown = now
                await send("state", now)
            if TaskState(task["state"]).terminal and drained:
                await send("end", now)
                return
            if drained:
                before = changes.generation
                await changes.wait_past(generation, KEEPALIVE_S)
                if changes.generation == before:
                    await response.write(b": keepalive\n\n")

    async def api_act(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        status, body = await self._act(request.match_info["action"], _task_id(request), await self.actor(request))
        return _json(body, status)

    async def api_nodes(self, request: web.Request) -> web.Response:
        nodes = await data.nodes(self.ctx.ledger)
        return _json({"nodes": [{**node, **data.allocation(node)} for node in nodes]})

    async def api_health(self, request: web.Request) -> web.Response:
        nodes = await data.nodes(self.ctx.ledger)
        return _json({"ok": True, "version": __version__, "database": self.ctx.ledger.dialect,
                      "nodes_online": sum(1 for node in nodes if node["online"]), "nodes": len(nodes),
                      **self.ctx.counters()})

    async def api_login(self, request: web.Request) -> web.Response:
        self._same_origin(request)
        try:
            body = await request.json()
            user, password = str(body["user"]), str(body["password"])
        except (ValueError, KeyError, TypeError):
            raise _api_error(400, 'send {"user": ..., "password": ...} as JSON')
        if not await self._broker_accepts(user, password):
            raise _api_error(401, f"the broker refused the sign-in of {user!r}")
        response = _json({"user": user})
        self._set_session(response, user)
        return response

    async def api_whoami(self, request: web.Request) -> web.Response:
        return _json({"user": self.viewer(request)})

    async def metrics(self, request: web.Request) -> web.Response:
        body = await metrics.exposition(self.ctx.ledger, self.topo, self.ctx.connection)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def make_app(dashboard: Dashboard) -> web.Application:
    app = web.Application()
    d, task = dashboard, r"/{task_id:\d{1,20}}"
    app.router.add_get("/", d.overview)
    app.router.add_get("/tasks", d.tasks)
    app.router.add_get("/tasks" + task, d.task)
    app.router.add_get("/tasks" + task + "/{action}", d.confirm)
    app.router.add_post("/tasks" + task + "/{action}", d.act_form)
    app.router.add_get("/nodes", d.nodes)
    app.router.add_get("/login", d.login_page)
    app.router.add_post("/login", d.login_form)
    app.router.add_post("/logout", d.logout)
    app.router.add_static("/static", STATIC)
    app.router.add_get("/api/tasks", d.api_tasks)
    app.router.add_get("/api/tasks" + task, d.api_task)
    app.router.add_get("/api/tasks" + task + "/{stream:stdout|stderr}", d.api_output)
    app.router.add_get("/api/tasks" + task + "/events", d.api_events)
    app.router.add_post("/api/tasks" + task + "/{action}", d.api_act)
    app.router.add_get("/api/nodes", d.api_nodes)
    app.router.add_get("/api/health", d.api_health)
    app.router.add_post("/api/login", d.api_login)
    app.router.add_get("/api/whoami", d.api_whoami)
    app.router.add_get("/metrics", d.metrics)
    return app


class WebServer:
    """The dashboard's listening socket in the host's loop: ``await start()`` ... ``await stop()``."""

    def __init__(self, ctx: WebContext):
        self.ctx = ctx
        self.dashboard = Dashboard(ctx)
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    async def start(self) -> None:
        host, port = self.ctx.config.web.address
        await data.ensure_indexes(self.ctx.ledger)
        self._runner = web.AppRunner(make_app(self.dashboard), access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0][1] if self._runner.addresses else port
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/"
        log.info("web dashboard at %s", self.url)

    async def stop(self) -> None:
        for tail in list(self.dashboard.tails):   # live tails would otherwise hold the shutdown
            tail.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
