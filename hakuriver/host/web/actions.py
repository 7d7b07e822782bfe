"""What a dashboard user may do to a task: kill, pause (a running task), resume (a paused one).

Why a registry: the task page, the confirmation page, the form POST and the JSON API all
serve every action the same way (look the task up, check :func:`~hakuriver.host.web.auth.action_refusal`,
perform); a new action is one :class:`Action` in :data:`ACTIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aio_pika.abc import AbstractExchange

from hakuriver import broker
from hakuriver.messages import Kill
from hakuriver.rpc import connection_user
from hakuriver.states import TaskState
from hakuriver.topology import ALL_NODES_KEY


@dataclass(frozen=True)
class Action:
    name: str
    applies: Callable[[dict[str, Any]], bool]   # may it be asked of a task in this state?
    perform: Callable[[AbstractExchange, dict[str, Any], str], Awaitable[dict[str, Any]]]


async def send_kill(control: AbstractExchange, task: dict[str, Any], user: str) -> dict[str, Any]:
    """The same Kill control message the CLI sends, to the task's node; to every node
    (``all``) while it has none, is held (the host's pipelines end it) or between two attempts,
    or if its node's control queue is gone."""
    anywhere = task["state"] in (TaskState.HELD, TaskState.RETRYING)
    node = ALL_NODES_KEY if anywhere else task.get("node") or ALL_NODES_KEY
    # Sent as the host's own (service) account, which runners believe: the dashboard checked
    # ``user`` against the owner-or-admin rule before calling this.
    body = broker.persistent(Kill(task_id=task["task_id"], user=user).to_bytes(),
                             user_id=connection_user(control.channel))
    result = await control.publish(body, routing_key=node, mandatory=True)
    if hasattr(result, "delivery") and node != ALL_NODES_KEY:   # returned: no queue bound to the node
        node = ALL_NODES_KEY
        await control.publish(body, routing_key=node, mandatory=False)
    return {"sent_to": node}


def _sender(action: str) -> Callable[[AbstractExchange, dict[str, Any], str], Awaitable[dict[str, Any]]]:
    """Pause or resume: the same control message as ``--pause``/``--resume``, to the task's node
    (it applies only to a task that runs, so its node is known)."""
    async def send(control: AbstractExchange, task: dict[str, Any], user: str) -> dict[str, Any]:
        body = broker.persistent(Kill(task_id=task["task_id"], user=user, action=action).to_bytes())
        await control.publish(body, routing_key=task["node"], mandatory=False)
        return {"sent_to": task["node"]}
    return send


ACTIONS: dict[str, Action] = {
    "kill": Action("kill", lambda task: not TaskState(task["state"]).terminal, send_kill),
    "pause": Action("pause", lambda task: task["state"] == TaskState.RUNNING and bool(task.get("node")),
                    _sender("pause")),
    "resume": Action("resume", lambda task: task["state"] == TaskState.PAUSED and bool(task.get("node")),
                     _sender("resume")),
}


def available(task: dict[str, Any]) -> list[str]:
    """The actions that apply to ``task`` in its current state."""
    return [name for name, action in ACTIONS.items() if action.applies(task)]
