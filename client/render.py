"""Tables and lines for people (``--json`` prints the data itself instead).

Plain data in, text out: no message model is imported here, so both command-line paths
(the aio-pika session and the light one of :mod:`client.quick`) render the same way.
"""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, Any

from hakuriver.sizes import format_size

if TYPE_CHECKING:  # pydantic costs start-up time; any object with these attributes will do
    from hakuriver.messages import StateEvent


def outcome_line(event: StateEvent) -> str:
    text = f"task {event.task_id} {event.state}"
    if event.exit_code is not None:
        text += f" (exit {event.exit_code})"
    if event.node:
        text += f" on {event.node}"
    if event.message:
        text += f": {event.message}"
    return text


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _command(task: dict[str, Any], width: int | None = None) -> str:
    text = shlex.join([task["command"], *(task.get("args") or [])])
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def task_table(tasks: list[dict[str, Any]]) -> str:
    rows = [[str(t["task_id"]), t["state"], t.get("node") or t.get("target") or "-",
             "-" if t.get("exit_code") is None else str(t["exit_code"]), _when(t.get("submitted_at")),
             _command(t, 60)] for t in tasks]
    return _table(["TASK", "STATE", "NODE", "EXIT", "SUBMITTED", "COMMAND"], rows)


def status(tasks: list[dict[str, Any]]) -> str:
    blocks = []
    for t in tasks:
        target = t.get("target") or "-"
        if t.get("numa") is not None:
            target += f":{t['numa']}"
        gpus = ",".join(map(str, t.get("gpus") or [])) or (f"any {t['gpu_count']}" if t.get("gpu_count") else "-")
        fields = [
            ("task", str(t["task_id"])), ("batch", str(t.get("batch_id", "-"))), ("state", t["state"]),
            ("owner", t.get("user") or "-"),
            ("node", t.get("node") or "-"), ("target", target),
            ("exit code", "-" if t.get("exit_code") is None else str(t["exit_code"])),
            ("command", _command(t)), ("container", t.get("container") or "NULL (host)"),
            ("cores", f"{t.get('cores') or 0:g}"), ("memory", format_size(t.get("memory"))), ("gpus", gpus),
            ("submitted", _when(t.get("submitted_at"))), ("started", _when(t.get("started_at"))),
            ("finished", _when(t.get("finished_at"))),
            ("output", f"{t.get('stdout_bytes', 0)} bytes stdout, {t.get('stderr_bytes', 0)} bytes stderr"),
        ]
        if t.get("unenforced"):
            fields.append(("not enforced", ", ".join(t["unenforced"])))
        if t.get("after"):
            fields.append(("after", ",".join(map(str, t["after"]))))
        if t.get("retries"):
            fields.append(("retries", f"{t['retries']} (delay {t.get('retry_delay') or 0:g} s)"))
            fields += [(f"attempt {r['attempt']}", _attempt_line(r)) for r in t.get("attempts") or []]
        if t.get("message"):
            fields.append(("message", t["message"]))
        blocks.append("".join(f"{k + ':':<14}{v}\n" for k, v in fields))
    return "\n".join(blocks)


def _attempt_line(record: dict[str, Any]) -> str:
    """One attempt of a retried task: its outcome, node, exit code and output sizes."""
    exit_code = "" if record.get("exit_code") is None else f" (exit {record['exit_code']})"
    return (f"{record['state']}{exit_code} on {record.get('node') or '-'}, started {_when(record.get('started_at'))}, "
            f"{record.get('stdout_bytes', 0)} bytes stdout, {record.get('stderr_bytes', 0)} bytes stderr")


def node_table(nodes: list[dict[str, Any]]) -> str:
    rows = []
    for n in nodes:
        rows.append([
            n["name"], "online" if n["online"] else "offline",
            f"{n.get('cores_free', 0):g}/{n.get('cores_total', 0):g}",
            f"{format_size(n.get('memory_free'))}/{format_size(n.get('memory_total'))}",
            f"{len(n.get('gpus_free') or [])}/{len(n.get('gpus') or [])}" if n.get("gpus") else "-",
            ",".join(str(k) for k in sorted((n.get("numa") or {}), key=int)) or "-",
            str(len(n.get("running") or [])), str(len(n.get("queued") or [])),
            f"{n.get('cpu_percent', 0):.0f}%", ",".join(n.get("executors") or []) or "-",
            ",".join(n.get("unenforced") or []) or "-",
        ])
    return _table(["NODE", "STATUS", "CORES FREE", "MEMORY FREE", "GPUS", "NUMA", "RUNNING", "QUEUED", "CPU",
                   "EXECUTORS", "NOT ENFORCED"], rows)


def health(result: dict[str, Any]) -> str:
    host = result.get("host") or {}
    lines = [f"host: version {host.get('version', '?')}, database {host.get('database', '?')}, "
             f"{host.get('events_applied', 0)} events applied\n"]
    for n in result["nodes"]:
        seen = n.get("last_seen")
        age = f"{time.time() - seen:.1f} s ago" if seen else "never"
        lines.append(f"{n['name']}: {'online' if n['online'] else 'OFFLINE'}, last heartbeat {age}, "
                     f"{len(n.get('running') or [])} running, {len(n.get('queued') or [])} queued, "
                     f"cpu {n.get('cpu_percent', 0):.0f}%, memory {n.get('memory_percent', 0):.0f}%\n")
    return "".join(lines)
