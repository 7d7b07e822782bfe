"""What one ``hakuriver.client`` invocation asks for: one small typed request per mode.

Why it exists: :mod:`client.cli` turns a command line into exactly one of these (after every
check that needs no broker), and :mod:`client.quick` or :mod:`client.session` carries it out.
One immutable record per mode says which fields each mode has; nothing travels as an untyped
dict. NamedTuples, not pydantic or dataclasses: the command line builds one on every
invocation, and as frozen dataclasses these cost ~10 ms of a submit's start-up (making the
classes, and importing dataclasses and inspect), as NamedTuples ~1 ms. The modes share two
fields, ``config_file`` and ``as_json``, always last. A default is never a list or dict
(it would be one object shared by every request): sequences default to ``()``, ``env`` has none.
"""

# No ``from __future__ import annotations``: typing.NamedTuple would compile every field's
# annotation string into a ForwardRef, half a millisecond more per start for these eight.
from typing import NamedTuple, Sequence


class SubmitRequest(NamedTuple):
    command: list[str]
    env: dict[str, str]
    targets: Sequence[str] = ()           # NODE[:NUMA][::GPUS], already checked; none: the pool
    mounts: Sequence[str] = ()            # HOST:CONTAINER[:ro], already checked
    after: Sequence[int] = ()             # --after: held by the host until these completed
    gpus: int = 0                         # --gpus N (targets may name ids instead: NODE::0,1)
    container: str | None = None          # None: the config's default; "NULL": on the host
    cores: float = 0.0
    memory: int | None = None
    privileged: bool = False
    wait: bool = False
    follow: bool = False
    timeout: float | None = None
    sweep_size: int | None = None         # set when --sweep: the number of combinations
    retries: int = 0                      # --retries N
    retry_delay: float | None = None      # --retry-delay; None: the default (hakuriver.bounds)
    config_file: str | None = None
    as_json: bool = False


class KillRequest(NamedTuple):
    task_id: int
    wait: bool = False
    timeout: float | None = None
    config_file: str | None = None
    as_json: bool = False


class PauseRequest(NamedTuple):
    task_id: int
    resume: bool = False                   # False: --pause, True: --resume
    config_file: str | None = None
    as_json: bool = False


class StatusRequest(NamedTuple):
    task_ids: list[int]
    config_file: str | None = None
    as_json: bool = False


class OutputRequest(NamedTuple):
    task_id: int
    stream: str                            # "stdout" or "stderr"
    follow: bool = False
    attempt: int | None = None             # --attempt K: that attempt of a retried task; None: the last
    config_file: str | None = None
    as_json: bool = False


class ListTasksRequest(NamedTuple):
    state: str | None = None
    node: str | None = None
    batch: int | None = None
    user: str | None = None                # only this owner's tasks
    mine: bool = False                     # only ours (the owner is our broker user)
    limit: int = 50
    before: int | None = None              # only tasks older than this id (the next page)
    config_file: str | None = None
    as_json: bool = False


class ListNodesRequest(NamedTuple):
    config_file: str | None = None
    as_json: bool = False


class HealthRequest(NamedTuple):
    node: str | None = None                # None: every node
    config_file: str | None = None
    as_json: bool = False


Request = (SubmitRequest | KillRequest | PauseRequest | StatusRequest | OutputRequest | ListTasksRequest
           | ListNodesRequest | HealthRequest)
