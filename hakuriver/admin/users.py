"""``hakuriver.init user add|list|remove``: broker accounts, one per person and per service.

Why it exists: a person's identity in HakuRiver is the RabbitMQ user their client logs in as
(:mod:`hakuriver.identity`), so making a user is making a broker user with the right
permissions, and nothing else. This goes through ``rabbitmqctl`` on the broker's machine
(run it there, as root or the rabbitmq user); the management API is not needed.

Permissions are least privilege for one prefix in one vhost (regexes from
:mod:`hakuriver.identity`): a person may publish tasks and kills, use RPC, read node info and
bind exclusive queues of their own to the events exchange, and nothing else; a service
account (``--runner``, ``--host``) may do everything under the prefix and nothing outside it.
Admins are a HakuRiver matter, not a broker one: ``--admin`` makes a person's account and
says which ``[security] admins`` lists to add it to.

A HakuRiver user is tagged ``hakuriver-<prefix>`` (``hakuriver-<prefix>-service`` for service
accounts), so ``user list`` shows only the accounts made here, and ``user remove`` refuses
to delete a broker user it did not make.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass

from hakuriver import identity

RABBITMQCTL = "rabbitmqctl"


class UserError(Exception):
    """rabbitmqctl is missing or refused; the message says what it said."""


@dataclass(frozen=True)
class Account:
    name: str
    service: bool


def tag(prefix: str, service: bool) -> str:
    return f"hakuriver-{prefix}-service" if service else f"hakuriver-{prefix}"


def _ctl(*args: str, secret_input: str | None = None) -> str:
    if shutil.which(RABBITMQCTL) is None:
        raise UserError(f"{RABBITMQCTL} not found: run this on the broker's machine (as root)")
    result = subprocess.run([RABBITMQCTL, "-q", *args], capture_output=True, text=True, input=secret_input,
                            timeout=120)
    if result.returncode != 0:
        said = " ".join((result.stderr or result.stdout).split()) or f"exit code {result.returncode}"
        raise UserError(f"{RABBITMQCTL} {args[0]}: {said}")
    return result.stdout


def add(name: str, password: str | None, prefix: str, vhost: str, service: bool) -> str:
    """Make broker user ``name`` with the permissions of a person (or, with ``service``, of a
    runner or the host) for ``prefix`` in ``vhost``; returns the password (made if not given)."""
    if not name or any(c in name for c in " :/@\n"):
        raise UserError(f"invalid user name {name!r}")
    password = password or secrets.token_urlsafe(18)
    # The password goes on stdin, not on a command line other local users could read.
    _ctl("add_user", name, secret_input=password + "\n")
    _ctl("set_user_tags", name, tag(prefix, service))
    regexes = identity.service_permissions(prefix) if service else identity.client_permissions(prefix)
    _ctl("set_permissions", "-p", vhost, name, *regexes)
    return password


def accounts(prefix: str) -> list[Account]:
    """The broker users this command made for ``prefix``."""
    found = []
    for line in _ctl("list_users").splitlines():
        name, _, tags = line.partition("\t")
        tags = tags.strip("[] ").replace(",", " ").split()
        if tag(prefix, True) in tags:
            found.append(Account(name, True))
        elif tag(prefix, False) in tags:
            found.append(Account(name, False))
    return found


def remove(name: str, prefix: str) -> None:
    if name not in {account.name for account in accounts(prefix)}:
        raise UserError(f"{name!r} is no HakuRiver user of prefix {prefix!r} (not removed)")
    _ctl("delete_user", name)
