"""The dashboard's HTML: one function per page, plain strings with every value escaped.

Why no template engine: five small pages do not pay for a dependency, and f-strings with
:func:`html.escape` at each value keep what a page shows next to where it comes from. The
pages work without JavaScript (filters are a GET form, kill is a confirmation page and a
POST form); ``static/app.js`` only adds the live tail of a task's output.
"""

from __future__ import annotations

import html
import shlex
import time
from typing import Any
from urllib.parse import urlencode

from hakuriver.host.web.data import TaskFilter, TaskPage, allocation
from hakuriver.sizes import format_size
from hakuriver.states import TaskState

# Of each stream, rendered into the task page (the rest: download). Escaped, a byte becomes
# at most 5 ("&amp;"): two tails stay within the 300 KB a page may weigh.
TAIL_BYTES = 24 * 1024


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC" if ts else "—"


def age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def command_text(task: dict[str, Any], width: int | None = None) -> str:
    text = shlex.join([task.get("command") or "", *(task.get("args") or [])])
    return text if width is None or len(text) <= width else text[:width - 1] + "…"


def state_badge(state: str, element_id: str = "") -> str:
    ident = f' id="{element_id}"' if element_id else ""
    return f'<span{ident} class="state s-{e(state)}">{e(state)}</span>'


def waiting_reason(task: dict[str, Any]) -> str | None:
    """Why a task has not started yet, in a sentence (None once it has)."""
    state = task["state"]
    want = f"{task.get('cores') or 0:g} cores, {format_size(task.get('memory')) if task.get('memory') else 'any memory'}"
    if state == TaskState.PENDING:
        where = task.get("target") or "any"
        return (f"no runner has taken it yet (target {where}): the node may be offline, busy with its queue, "
                f"or no node of the pool has room for {want}")
    if state == TaskState.QUEUED:
        reason = f"accepted by {task.get('node') or 'a node'}, waiting there for {want} to be free"
        return reason + (f": {task['message']}" if task.get("message") else "")
    return None


def layout(title: str, body: str, user: str | None, active: str = "") -> str:
    def tab(href: str, name: str) -> str:
        current = ' aria-current="page"' if name == active else ""
        return f'<a href="{href}"{current}>{name}</a>'

    if user:
        who = (f'<form method="post" action="/logout" class="inline"><span id="whoami">{e(user)}</span> '
               f'<button type="submit" class="link">sign out</button></form>')
    else:
        who = '<a href="/login" id="signin">sign in</a>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · HakuRiver</title><link rel="stylesheet" href="/static/app.css"></head>
<body><header><strong>HakuRiver</strong><nav>{tab("/", "Overview")}{tab("/tasks", "Tasks")}{tab("/nodes", "Nodes")}</nav>
<div class="who">{who}</div></header>
<main>{body}</main><script src="/static/app.js" defer></script></body></html>"""


def _table(headers: list[str], rows: list[str], table_id: str, empty: str) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    if not rows:
        return f'<p class="empty" id="{table_id}-empty">{e(empty)}</p>'
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _task_rows(tasks: list[dict[str, Any]]) -> list[str]:
    rows = []
    for task in tasks:
        ended = task.get("exit_code") if task.get("exit_code") is not None else ""
        rows.append(
            f'<tr data-task-id="{task["task_id"]}"><td><a href="/tasks/{task["task_id"]}">{task["task_id"]}</a></td>'
            f'<td>{state_badge(task["state"])}</td><td>{e(task.get("user"))}</td>'
            f'<td>{e(task.get("node") or task.get("target"))}</td>'
            f'<td class="cmd">{e(command_text(task, 80))}</td><td>{when(task.get("submitted_at"))}</td>'
            f'<td>{e(ended)}</td></tr>')
    return rows


TASK_HEADERS = ["id", "state", "owner", "node", "command", "submitted", "exit"]


def _usage(used: float | int, total: float | int, fmt=lambda v: f"{v:g}") -> str:
    if not total:
        return "—"
    share = min(100, round(100 * used / total))
    return f'{e(fmt(used))} / {e(fmt(total))} <meter min="0" max="100" value="{share}"></meter>'


def overview(nodes: list[dict[str, Any]], by_state: dict[str, int], failures: list[dict[str, Any]],
             user: str | None) -> str:
    online = [node for node in nodes if node["online"]]
    held = [allocation(node) for node in online]
    cores = _usage(sum(h["cores_allocated"] for h in held), sum(h["cores_total"] for h in held))
    memory = _usage(sum(h["memory_allocated"] for h in held), sum(h["memory_total"] for h in held), format_size)
    gpu_nodes = [h for h in held if h["gpus_total"] is not None]
    gpus = (_usage(sum(h["gpus_allocated"] for h in gpu_nodes), sum(h["gpus_total"] for h in gpu_nodes))
            if gpu_nodes else "—")
    state_rows = [f'<tr><td><a href="/tasks?state={e(state)}">{state_badge(state)}</a></td>'
                  f'<td class="num" data-state="{e(state)}">{count:,}</td></tr>' for state, count in by_state.items()]
    node_rows = [f'<tr data-node="{e(node["name"])}"><td><a href="/tasks?node={e(node["name"])}">{e(node["name"])}</a></td>'
                 f'<td>{"online" if node["online"] else "offline"}</td>'
                 f'<td>{len(node.get("running") or [])}</td><td>{len(node.get("queued") or [])}</td>'
                 f'<td>{age(node.get("heartbeat_age"))}</td></tr>' for node in nodes]
    failure_rows = [
        f'<tr><td><a href="/tasks/{t["task_id"]}">{t["task_id"]}</a></td><td>{state_badge(t["state"])}</td>'
        f'<td>{e(t.get("user"))}</td><td>{e(t.get("node"))}</td><td class="cmd">{e(command_text(t, 60))}</td>'
        f'<td>{e(t.get("message") or t.get("exit_code"))}</td><td>{when(t.get("finished_at"))}</td></tr>'
        for t in failures]
    body = f"""<h1>Overview</h1>
<section class="cards">
<div class="card"><h2>Nodes</h2><p class="big"><span id="nodes-online">{len(online)}</span> online ·
<span id="nodes-offline">{len(nodes) - len(online)}</span> offline</p></div>
<div class="card"><h2>Allocated on online nodes</h2><table class="plain">
<tr><th>cores</th><td>{cores}</td></tr><tr><th>memory</th><td>{memory}</td></tr>
<tr><th>GPUs</th><td>{gpus}</td></tr></table></div>
<div class="card"><h2>Tasks by state</h2><table class="plain" id="by-state">{"".join(state_rows)}</table></div>
</section>
<h2>Nodes</h2>{_table(["node", "status", "running", "queued", "heartbeat"], node_rows, "overview-nodes",
                        "No runner has sent a heartbeat yet.")}
<h2>Latest failures</h2>{_table(["id", "state", "owner", "node", "command", "why", "ended"], failure_rows,
                                 "failures", "No failed, lost or rejected task.")}"""
    return layout("Overview", body, user, "Overview")


def tasks(page: TaskPage, where: TaskFilter, user: str | None) -> str:
    options = "".join(f'<option value="{s.value}"{" selected" if where.state == s else ""}>{s.value}</option>'
                      for s in TaskState)

    def field(name: str, label: str, value: Any, size: int = 12) -> str:
        return (f'<label>{label} <input name="{name}" value="{e(value if value is not None else "")}" '
                f'size="{size}"></label>')

    form = (f'<form method="get" action="/tasks" class="filters" id="filters">'
            f'<label>state <select name="state"><option value="">any</option>{options}</select></label>'
            f'{field("node", "node", where.node)}{field("user", "owner", where.user)}'
            f'{field("batch", "batch", where.batch, 20)}{field("q", "command contains", where.q, 20)}'
            f'<button type="submit">Filter</button> <a href="/tasks">clear</a></form>')
    links = []
    if where.before is not None:
        links.append(f'<a href="/tasks?{e(urlencode(where.url_params(before=None)))}">« newest</a>')
    if page.next_before is not None:
        links.append(f'<a id="older" href="/tasks?{e(urlencode(where.url_params(before=page.next_before)))}">'
                     f'older »</a>')
    note = ""
    if page.scanned_to is not None:
        note = (f'<p class="note">The command text was searched in the {e(f"{len(page.tasks)}")} matches among '
                f'tasks down to id {page.scanned_to}; “older” searches further.</p>')
    body = (f"<h1>Tasks</h1>{form}"
            + _table(TASK_HEADERS, _task_rows(page.tasks), "tasks", "No task matches.")
            + note + f'<p class="pager">{" · ".join(links)}</p>'
            + f'<p class="note">JSON: <a href="/api/tasks?{e(urlencode(where.url_params()))}">/api/tasks</a></p>')
    return layout("Tasks", body, user, "Tasks")


def _output_block(task_id: int, stream: str, text: str, size: int, live: bool) -> str:
    shown = "" if size <= TAIL_BYTES else f" (last {TAIL_BYTES // 1024} KB of {format_size(size)} shown)"
    return (f'<section class="output"><h2>{stream}<small>{e(shown)}</small> '
            f'<a href="/api/tasks/{task_id}/{stream}?download=1" download>download</a></h2>'
            f'<pre id="{stream}" data-offset="{size}">{html.escape(text, quote=False)}</pre></section>')


def task(t: dict[str, Any], outputs: dict[str, tuple[str, int]], user: str | None, actions: list[str],
         refusal: str | None) -> str:
    terminal = TaskState(t["state"]).terminal
    live = not terminal
    cores = f"{t['cores']:g} cores" if t.get("cores") else "no CPU limit"
    resources = f"{cores}, {'memory ' + format_size(t['memory']) if t.get('memory') else 'no memory limit'}"
    place = t.get("container") or "host"
    facts = [("command", f'<code>{e(command_text(t))}</code>'), ("owner", e(t.get("user") or "—")),
             ("submitted from", e(t.get("submit_host") or "—")),
             ("target", e(t.get("target") or "any")),
             ("node", e((t.get("node") or "—") + (f":{t['numa']}" if t.get("numa") is not None else ""))),
             ("batch", f'<a href="/tasks?batch={t["batch_id"]}">{t["batch_id"]}</a>' if t.get("batch_id") else "—"),
             ("resources", e(resources)), ("runs in", e(place + (" (privileged)" if t.get("privileged") else ""))),
             ("mounts", e(", ".join(t.get("mounts") or []) or "—")),
             ("GPUs", e(", ".join(str(g) for g in t.get("gpus") or []) or "—")),
             ("submitted", when(t.get("submitted_at"))), ("queued", when(t.get("queued_at"))),
             ("started", when(t.get("started_at"))), ("finished", f'<span id="finished">{when(t.get("finished_at"))}</span>'),
             ("exit code", f'<span id="exit-code">{e(t["exit_code"]) if t.get("exit_code") is not None else "—"}</span>'),
             ("message", f'<span id="message">{e(t.get("message") or "—")}</span>')]
    if t.get("unenforced"):
        facts.append(("not enforced", e(", ".join(t["unenforced"]))))
    if t.get("after"):  # a pipeline stage: the tasks it waits (waited) for
        facts.append(("after", ", ".join(f'<a href="/tasks/{d}">{d}</a>' for d in t["after"])))
    for record in t.get("attempts") or []:  # a retried task: each attempt's outcome
        exit_code = "" if record.get("exit_code") is None else f" (exit {record['exit_code']})"
        facts.append((f"attempt {record['attempt']}",
                      e(f"{record['state']}{exit_code} on {record.get('node') or '—'}") +
                      f", started {when(record.get('started_at'))}"))
    reason = waiting_reason(t)
    if reason:
        facts.insert(0, ("waiting", f'<span id="waiting">{e(reason)}</span>'))
    rows = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    buttons = ""
    if actions and not terminal:
        title = f' title="{e(refusal)}"' if refusal else ""
        buttons = "".join(f'<a class="button danger" id="action-{a}" href="/tasks/{t["task_id"]}/{a}"{title}>'
                          f'{a.capitalize()}…</a>' for a in actions)
    follow = f' data-follow="/api/tasks/{t["task_id"]}/events"' if live else ""
    body = (f'<h1>Task <span id="task-id">{t["task_id"]}</span> {state_badge(t["state"], "state")}</h1>'
            f'<div class="actions">{buttons}</div><div class="task-grid"><table class="facts">{rows}</table>'
            f'<div id="live"{follow}>'
            + "".join(_output_block(t["task_id"], stream, text, size, live) for stream, (text, size) in outputs.items())
            + "</div></div>")
    return layout(f"Task {t['task_id']}", body, user, "Tasks")


def confirm_action(t: dict[str, Any], action: str, user: str | None, refusal: str | None) -> str:
    what = f"{action} task {t['task_id']} ({e(command_text(t, 80))}, {e(t['state'])} on {e(t.get('node') or 'no node yet')})"
    if refusal:
        inner = (f'<p class="error" id="refused">You cannot {what}: {e(refusal)}.</p>'
                 f'<p><a href="/login?next=/tasks/{t["task_id"]}/{action}">Sign in</a> · '
                 f'<a href="/tasks/{t["task_id"]}">back to the task</a></p>')
    else:
        inner = (f'<p>Really {what}?</p><form method="post" action="/tasks/{t["task_id"]}/{action}">'
                 f'<button type="submit" class="danger" id="confirm">Yes, {e(action)} it</button> '
                 f'<a href="/tasks/{t["task_id"]}" id="cancel">cancel</a></form>')
    return layout(f"{action.capitalize()} task {t['task_id']}", f"<h1>{e(action.capitalize())} task?</h1>{inner}",
                  user, "Tasks")


def nodes(rows: list[dict[str, Any]], user: str | None) -> str:
    body_rows = []
    for node in rows:
        held = allocation(node)
        numa = node.get("numa") or {}
        numa_text = ", ".join(f"{nid}: {len(info.get('cpus') or [])} cpus, {format_size(info.get('memory'))}"
                              for nid, info in sorted(numa.items(), key=lambda kv: int(kv[0]))) or "—"
        gpus = "—" if held["gpus_total"] is None else f"{held['gpus_allocated']} / {held['gpus_total']}"
        name = e(node["name"])
        body_rows.append(
            f'<tr data-node="{name}"><td>{name}</td><td>{"online" if node["online"] else "offline"}</td>'
            f'<td>{_usage(held["cores_allocated"], held["cores_total"])}</td>'
            f'<td>{_usage(held["memory_allocated"], held["memory_total"], format_size)}</td>'
            f'<td>{e(numa_text)}</td><td>{gpus}</td>'
            f'<td><a href="/tasks?node={name}&amp;state=running">{len(node.get("running") or [])}</a></td>'
            f'<td><a href="/tasks?node={name}&amp;state=queued">{len(node.get("queued") or [])}</a></td>'
            f'<td>{age(node.get("heartbeat_age"))}</td><td>{e(node.get("version") or "—")}</td>'
            f'<td>{e(", ".join(node.get("unenforced") or []) or "—")}</td></tr>')
    body = "<h1>Nodes</h1>" + _table(
        ["node", "status", "cores", "memory", "NUMA nodes", "GPUs", "running", "queued", "heartbeat", "version",
         "not enforced"], body_rows, "nodes", "No runner has sent a heartbeat yet.")
    return layout("Nodes", body, user, "Nodes")


def login(user: str | None, next_url: str, error: str | None = None) -> str:
    message = f'<p class="error" id="login-error">{e(error)}</p>' if error else ""
    current = f"<p>Signed in as {e(user)}.</p>" if user else ""
    body = (f"<h1>Sign in</h1>{current}<p>Use your broker (RabbitMQ) account; the host asks the broker.</p>"
            f'{message}<form method="post" action="/login" class="login"><input type="hidden" name="next" '
            f'value="{e(next_url)}"><label>user <input name="user" id="user" autocomplete="username"></label>'
            f'<label>password <input name="password" id="password" type="password" '
            f'autocomplete="current-password"></label><button type="submit" id="signin-submit">Sign in</button>'
            f"</form>")
    return layout("Sign in", body, user)


def not_found(what: str, user: str | None) -> str:
    return layout("Not found", f'<h1>Not found</h1><p class="error">{e(what)}</p>', user)
