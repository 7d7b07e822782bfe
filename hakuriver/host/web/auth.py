"""Who may do what on the dashboard: sessions, the sign-in check, and the one action rule.

Why it exists: viewing is open to everyone who can reach the dashboard; actions (kill, and
pause/resume once they exist) follow the CLI's rule, *the task's owner or an admin*. There
is no second user database: signing in opens an AMQP connection to the configured broker
with the given name and password, and the broker's answer is the check. A signed-in
session is a cookie ``user|expiry|signature`` (HMAC-SHA256 with ``[web] secret``, or a
secret made at host start, which signs everyone out at every restart).

A task's recorded owner is the broker user that submitted it (its AMQP ``user_id``), so the
name a person signs in with is the name that owns their tasks. ``[web] allow_actions_without_login``
lets anyone act (for a cluster without per-person accounts); without it, actions need a signed-in user.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import TYPE_CHECKING, Any

import aio_pika
from yarl import URL

from hakuriver import broker, identity
from hakuriver.broker_address import split_urls
from hakuriver.tls import client_ssl_context, describe_failure

if TYPE_CHECKING:
    from hakuriver.config import BrokerConfig

COOKIE = "hakuriver_session"
SESSION_SECONDS = 12 * 3600
LOGIN_TIMEOUT = 5.0


def may_control(user: str | None, task: dict[str, Any], admins: list[str] | tuple[str, ...]) -> bool:
    """The action rule, shared by every action: the task's owner (its recorded ``user``, the broker user
    that submitted it: :mod:`hakuriver.identity`) or an admin; the same rule as the CLI's and the runners'."""
    return identity.may_act(user, task.get("user"), admins)


def action_refusal(user: str | None, task: dict[str, Any], admins: list[str], without_login: bool) -> str | None:
    """Why ``user`` (None: not signed in) may not act on ``task``, or None if it may."""
    if user is None:
        if without_login:
            return None
        return "sign in to act on tasks ([web] allow_actions_without_login is off)"
    if may_control(user, task, admins):
        return None
    return f"{user} is neither the owner of task {task['task_id']} ({task.get('user') or 'unknown'}) nor an admin"


class Sessions:
    """Makes and checks signed session cookies."""

    def __init__(self, secret: str = ""):
        self._key = secret.encode() if secret else secrets.token_bytes(32)

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def make(self, user: str, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + SESSION_SECONDS)
        payload = f"{user}|{expiry}"
        return f"{payload}|{self._sign(payload)}"

    def user(self, cookie: str | None, now: float | None = None) -> str | None:
        """The signed-in user of a cookie, or None (absent, forged, or expired)."""
        if not cookie or cookie.count("|") < 2:
            return None
        payload, _, signature = cookie.rpartition("|")
        user, _, expiry = payload.rpartition("|")
        if not hmac.compare_digest(signature, self._sign(payload)) or not expiry.isdigit():
            return None
        if int(expiry) < (time.time() if now is None else now):
            return None
        return user or None


async def broker_accepts(broker_config: BrokerConfig, user: str, password: str) -> bool:
    """Does the broker of ``[broker]`` (its addresses, vhost and TLS settings) take ``user``/``password``?

    The first address that answers decides (a broker cluster shares its users)."""
    if not user or not password or "|" in user:
        return False
    context = client_ssl_context(broker_config)
    urls = split_urls(broker_config.url)
    for url in urls:
        try:
            connection = await aio_pika.connect(str(URL(url).with_user(user).with_password(password)),
                                                timeout=LOGIN_TIMEOUT, ssl_context=context,
                                                client_properties={"connection_name": "hakuriver-web-login"})
        except aio_pika.exceptions.ProbableAuthenticationError:
            return False
        except (OSError, ConnectionError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            if url == urls[-1]:
                raise broker.BrokerUnreachable("cannot check the sign-in with the broker: "
                                               f"{describe_failure(exc) or exc or type(exc).__name__}")
            continue
        await connection.close()
        return True
    return False
