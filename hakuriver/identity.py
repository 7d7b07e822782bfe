"""Who sent a message, and what that person may do: identity from the broker, not from the body.

Why it exists: a task's ``user`` field is whatever its sender wrote. The AMQP ``user_id``
property is not: RabbitMQ refuses (PRECONDITION_FAILED) a message whose ``user_id`` differs
from the user the publishing connection logged in as. So every client message (task, kill,
RPC request) carries ``user_id``, and every receiver takes the owner from the delivered
message's ``user_id`` and never from the body. A message without one has no owner anyone can
vouch for: a task without one is ``rejected`` ("no authenticated user"), a kill without one
is dead-lettered.

Roles, all decided here:
- a *service account* is a broker user whose state events, output chunks and heartbeats
  are believed: the user of this process's own broker URL, plus ``[security]
  service_accounts`` (the runners' and the host's users when they differ);
- an *admin* (``[security] admins``) may control and read every task;
- everyone else controls and reads their own tasks only.

The broker enforces the rest with permissions (:func:`client_permissions`,
:func:`service_permissions`, set by ``hakuriver.init user add``): a client user cannot
publish to the events or dead-letter exchange, consume a node's or the pool's queue, or
touch another prefix's exchanges and queues.
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import unquote, urlsplit

NO_USER = "no authenticated user"
HIDDEN = "<hidden>"   # an env value shown to someone who is neither its task's owner nor an admin
DEFAULT_AMQP_USER = "guest"  # what AMQP clients log in as when the URL names nobody


def broker_user(url: str) -> str:
    """The user a connection to ``url`` logs in as (what the broker checks ``user_id`` against)."""
    user = urlsplit(url).username
    return unquote(user) if user else DEFAULT_AMQP_USER


def service_accounts(own_url: str, configured: Iterable[str]) -> frozenset[str]:
    """Whose events a runner or the host believes: its own broker user and the configured ones."""
    return frozenset({broker_user(own_url), *configured})


# A task a service passes on (a runner handing a retry back to the pool, the host releasing a held
# task) is published under the service's own user_id; this header names the owner it was first
# submitted by, and is believed from service accounts only.
OWNER_HEADER = "x-hakuriver-owner"


def task_owner(user_id: str | None, headers: dict | None, services: frozenset[str]) -> str:
    """Who owns a delivered task: its ``user_id``, or, from a service account, the owner it passes on."""
    passed_on = (headers or {}).get(OWNER_HEADER)
    if user_id in services and isinstance(passed_on, str) and passed_on:
        return passed_on
    return user_id or ""


def may_act(user: str | None, owner: str | None, admins: Iterable[str]) -> bool:
    """The one rule for kills and for reading output and env values: the owner or an admin."""
    if not user:
        return False
    return user in set(admins) or (bool(owner) and owner == user)


def refusal(user: str | None, task_id: int, owner: str | None, admins: Iterable[str]) -> str | None:
    """Why ``user`` may not act on task ``task_id`` of ``owner``, in one line; None if they may."""
    if may_act(user, owner, admins):
        return None
    return f"task {task_id} belongs to {owner or 'nobody known'}"


def is_refusal(error: str) -> bool:
    """Whether an RPC error is :func:`refusal`'s (the client exits 1 for it, not 2)."""
    return _REFUSAL.match(error) is not None


_REFUSAL = re.compile(r"^task \d+ belongs to ")


def hide_env(task: dict, user: str | None, admins: Iterable[str]) -> dict:
    """``task`` (a ledger row) as ``user`` may see it: env names always, values only for its owner and admins."""
    env = task.get("env")
    if not env or may_act(user, task.get("user"), admins):
        return task
    return {**task, "env": {key: HIDDEN for key in env}}


# -- broker permissions (configure, write, read regexes) ----------------------------------

# A process's own exclusive queues: named by the broker (amq.gen-..., e.g. pika's) or by aio-pika's
# robust channels, which name them amq_<uuid hex> themselves to declare them again after a reconnect.
OWN_QUEUES = r"amq\.gen-.*|amq_[0-9a-f]{32}"


def _names(*names: str) -> str:
    return "^(" + "|".join(names) + ")$"


def client_permissions(prefix: str) -> tuple[str, str, str]:
    """A person's permissions: publish tasks and kills, RPC, own exclusive queues bound to events,
    node info by basic.get. Nothing to configure but its own server-named queues."""
    p = re.escape(prefix)
    own = OWN_QUEUES
    configure = _names(own)
    # amq.default: RPC requests go to the host's queue through the default exchange.
    write = _names(rf"{p}\.tasks", rf"{p}\.control", r"amq\.default", own)
    # basic.get of node info needs read on its queue; binding needs read on the events exchange.
    read = _names(rf"{p}\.events", rf"{p}\.nodeinfo\..*", own)
    return configure, write, read


def service_permissions(prefix: str) -> tuple[str, str, str]:
    """A runner's or the host's permissions: everything under the prefix, nothing outside it."""
    p = re.escape(prefix)
    every = _names(rf"{p}\..*", OWN_QUEUES, r"amq\.default")
    return every, every, every
