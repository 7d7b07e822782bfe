"""``HOST:CONTAINER[:ro]``, the client's ``--mount`` text, parsed without pydantic.

Why it exists: the command line checks a mount before anything heavy is imported (a bad one
is a usage error that must stay fast), and the light command-line path builds the task's
JSON without the message models; :meth:`hakuriver.messages.Mount.parse` uses this same
function, so both read a mount the same way.
"""

from __future__ import annotations

from typing import NamedTuple


class MountSpec(NamedTuple):
    host_path: str
    container_path: str
    read_only: bool


def parse_mount(text: str) -> MountSpec:
    """``HOST:CONTAINER[:ro|:rw]`` with both paths absolute; ValueError naming the bad part."""
    parts = text.split(":")
    read_only = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        read_only = parts.pop() == "ro"
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError(f"invalid mount {text!r} (use HOST:CONTAINER[:ro])")
    for path in parts:  # said here in one line, before the field validators' longer report
        if not path.startswith("/"):
            raise ValueError(f"invalid mount {text!r}: {path!r} is not an absolute path")
    return MountSpec(parts[0], parts[1], read_only)
