"""Whose Unix account a task runs as on this node: its owner's, never the runner's root.

Why it exists: a task's owner is its broker user (:mod:`hakuriver.identity`); on a node that
person is the Unix account of the same name, or the one ``[users]`` maps the name to (for labs
whose broker names differ from login names). A host task runs with that account's uid, gid
and supplementary groups and with its ``HOME``, ``USER`` and ``LOGNAME``; a container task runs
as its uid:gid unless ``[node] allow_root_containers`` lets containers run as root. So a task
cannot write where its owner cannot, and, not being root, cannot leave its cgroup
(``/sys/fs/cgroup/.../cgroup.procs`` is root's) or raise its own limits.

Refused (the task ends ``rejected`` with the reason): an owner with no account on this node;
an account that is root (uid 0), unless the owner is an admin (``[security] admins``) and the
node allows it (``[node] allow_root``); ``--privileged`` from anyone but an admin.

Host tasks change user through ``setpriv`` (util-linux) in front of the command, after
whatever the executor puts first (the cgroup join runs as root, then the account takes
over), so the fast ``posix_spawn`` start of the process executor stays as it was.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Iterable

SETPRIV = "setpriv"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def lookup(name: str) -> Account | None:
    """The Unix account ``name`` of this machine, with its supplementary groups; None if there is none."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir or "/")


def account_name(owner: str, users: dict[str, str]) -> str:
    """The Unix account of broker user ``owner`` on this node: ``[users]``'s mapping, else the same name."""
    return users.get(owner, owner)


def refusal(owner: str, *, host_task: bool, privileged: bool, node: str, users: dict[str, str],
            admins: Iterable[str], allow_root: bool) -> str | None:
    """Why a task of ``owner`` may not run on ``node`` as its account, in one line; None if it may."""
    admin = owner in set(admins)
    if privileged and not admin:
        return f"--privileged is for admins only ({owner} is none)"
    name = account_name(owner, users)
    account = lookup(name)
    if account is None:
        mapped = "" if name == owner else f" (mapped from {owner} by [users])"
        return f"no Unix account {name!r}{mapped} on node {node}"
    if account.is_root and not (admin and allow_root):
        why = "the owner is no admin" if not admin else f"[node] allow_root is off on node {node}"
        kind = "host tasks" if host_task else "containers"
        return f"{kind} of {owner} would run as root ({name}), and {why}"
    return None


def setpriv_argv(account: Account | None, command: list[str]) -> list[str]:
    """``command`` run as ``account``: prefixed by ``setpriv`` unless it is already who we are."""
    if account is None or (account.uid == os.geteuid() and account.gid == os.getegid()):
        return command
    groups = f"--groups={','.join(map(str, account.groups))}" if account.groups else "--clear-groups"
    return [SETPRIV, f"--reuid={account.uid}", f"--regid={account.gid}", groups, "--", *command]


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
