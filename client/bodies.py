"""Message bodies of the light command-line path, byte for byte what :mod:`hakuriver.messages` encodes.

Why it exists: :mod:`client.quick` must not import pydantic (~50 ms of start-up), yet what it
sends is the contract (docs/protocol.md, docs/schemas/). The bodies are built here as
``json.dumps`` of dicts in the models' field order with the models' separators, which is what
pydantic writes for the values the command line produces (tests/test_quick.py compares the
bytes with the models' own, and validates them with the models).

Where a value could differ (a float pydantic writes in another notation, text that is not
valid UTF-8) or a task might break a rule of the model (an empty command, a bound), the
model itself decides: :func:`encode_task` then imports pydantic and lets
:class:`hakuriver.messages.Task` encode the task or refuse it in its own words, as the
aio-pika path does. Only bad input pays for the import.
"""

from __future__ import annotations

import json
from typing import Any

from client.errors import BadRequest
from hakuriver.bounds import (MAX_ARG_BYTES, MAX_CORES, MAX_ENV_BYTES, MAX_GPUS, MAX_MEMORY, MAX_NUMA_ID,
                              MAX_TASK_BYTES)

VERSION = 1


def is_env_name(key: str) -> bool:
    """The model's ``EnvKey`` rule, ``[A-Za-z_][A-Za-z0-9_]*``, without ``re`` (an ASCII identifier is exactly that)."""
    return key.isascii() and key.isidentifier()


# The models' field order (hakuriver.messages.Task); pydantic writes fields in this order.
TASK_FIELDS = ("v", "task_id", "batch_id", "command", "args", "env", "cores", "memory", "target", "numa", "gpus",
               "gpu_count", "container", "privileged", "mounts", "retries", "retry_delay", "attempt", "after", "user",
               "submit_host", "submitted_at")


def dumps(value: Any) -> bytes:
    """JSON as pydantic writes it: no spaces, UTF-8 as is, control characters escaped."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_task(fields: dict[str, Any]) -> bytes:
    """The task's body (``fields``: every field of :data:`TASK_FIELDS` but ``v``).
    :class:`BadRequest` in the model's words where the model refuses it."""
    task = {"v": VERSION, **{name: fields[name] for name in TASK_FIELDS[1:]}}
    if _plainly_valid(task):
        body = dumps(task)
        if len(body) <= MAX_TASK_BYTES:
            return body
    return _encode_with_model(fields)


def _encode_with_model(fields: dict[str, Any]) -> bytes:
    from pydantic import ValidationError
    from pydantic_core import PydanticSerializationError

    from hakuriver.messages import MessageTooLarge, Task, one_line

    try:
        return Task(**fields).to_bytes()
    except ValidationError as exc:  # the receivers' own rules, said in one line (as client.api says them)
        raise BadRequest(f"invalid task: {one_line(exc)}") from None
    except MessageTooLarge as exc:
        raise BadRequest(str(exc)) from None
    except PydanticSerializationError:  # a raw argv byte that is not UTF-8: JSON cannot carry it
        raise BadRequest("invalid task: its command line or environment is not valid UTF-8 text") from None


def _utf8_len(text: str) -> int | None:
    """Bytes of ``text`` as UTF-8; None if it is not valid Unicode text (lone surrogates)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return None


def _plain_text(*texts: Any) -> bool:
    return all(isinstance(t, str) and _utf8_len(t) is not None for t in texts)


def _plain_float(value: Any) -> bool:
    # pydantic writes 1e-05 as 0.00001: small numbers in exponent notation go to the model
    return isinstance(value, float) and "e-" not in repr(value) and value == value


def _plainly_valid(t: dict[str, Any]) -> bool:
    """True where the model would accept ``t`` and write exactly ``dumps(t)``; False means: ask the model."""
    command_line = [t["command"], *t["args"]]
    env_texts = [text for pair in t["env"].items() for text in pair]
    mounts = t["mounts"]
    texts = [*command_line, *env_texts, t["target"], t["user"], t["submit_host"],
             *(m[k] for m in mounts for k in ("host_path", "container_path"))]
    if t["container"] is not None:
        texts.append(t["container"])
    if not _plain_text(*texts) or not t["command"]:
        return False
    if sum(map(_utf8_len, command_line)) > MAX_ARG_BYTES or sum(map(_utf8_len, env_texts)) > MAX_ENV_BYTES:
        return False
    if not all(map(is_env_name, t["env"])):
        return False
    if not (_plain_float(t["cores"]) and 0 <= t["cores"] <= MAX_CORES and _plain_float(t["submitted_at"])):
        return False
    if t["memory"] is not None and not (type(t["memory"]) is int and 0 < t["memory"] <= MAX_MEMORY):
        return False
    if t["numa"] is not None and not (type(t["numa"]) is int and 0 <= t["numa"] <= MAX_NUMA_ID):
        return False
    gpus, count = t["gpus"], t["gpu_count"]
    if not (type(count) is int and 0 <= count <= MAX_GPUS):
        return False
    if gpus is not None and not (1 <= len(gpus) <= MAX_GPUS and len(set(gpus)) == len(gpus) == count
                                 and all(type(g) is int and 0 <= g < MAX_GPUS for g in gpus)):
        return False
    if not all(list(m) == ["host_path", "container_path", "read_only"] and m["host_path"].startswith("/")
               and m["container_path"].startswith("/") and isinstance(m["read_only"], bool) for m in mounts):
        return False
    return (type(t["task_id"]) is int and type(t["batch_id"]) is int and isinstance(t["privileged"], bool)
            and t["retries"] == 0)


def encode_kill(task_id: int, user: str, action: str = "kill") -> bytes:
    """:class:`hakuriver.messages.Kill`: a kill, pause or resume of one task."""
    return dumps({"v": VERSION, "task_id": task_id, "user": user, "action": action})


def encode_rpc_request(method: str, params: dict[str, Any]) -> bytes:
    """:class:`hakuriver.messages.RpcRequest`."""
    return dumps({"v": VERSION, "method": method, "params": params})
