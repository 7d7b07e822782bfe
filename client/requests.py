"""What one ``hakuriver.client`` invocation asks for: one small typed request per mode.

Why it exists: :mod:`client.cli` turns a command line into exactly one of these (after every
check that needs no broker), and :mod:`client.session` carries it out. A frozen dataclass per
mode says which fields each mode has; nothing travels as an untyped dict. Plain dataclasses,
not pydantic: the command line builds them before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Request:
    config_file: str | None = None
    as_json: bool = False


@dataclass(frozen=True, kw_only=True)
class SubmitRequest(Request):
    command: list[str]
    targets: list[str] = field(default_factory=list)
    gpus: int = 0                         # --gpus N (targets may name ids instead: NODE::0,1)
    container: str | None = None          # None: the config's default; "NULL": on the host
    cores: float = 0.0
    memory: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)   # HOST:CONTAINER[:ro], already checked
    privileged: bool = False
    wait: bool = False
    follow: bool = False
    timeout: float | None = None
    sweep_size: int | None = None         # set when --sweep: the number of combinations
    retries: int = 0                      # --retries N
    retry_delay: float | None = None      # --retry-delay; None: the default (hakuriver.bounds)
    after: list[int] = field(default_factory=list)  # --after: held by the host until these completed


@dataclass(frozen=True, kw_only=True)
class KillRequest(Request):
    task_id: int
    wait: bool = False
    timeout: float | None = None


@dataclass(frozen=True, kw_only=True)
class PauseRequest(Request):
    task_id: int
    resume: bool = False                   # False: --pause, True: --resume


@dataclass(frozen=True, kw_only=True)
class StatusRequest(Request):
    task_ids: list[int]


@dataclass(frozen=True, kw_only=True)
class OutputRequest(Request):
    task_id: int
    stream: str                            # "stdout" or "stderr"
    follow: bool = False
    attempt: int | None = None             # --attempt K: that attempt of a retried task; None: the last


@dataclass(frozen=True, kw_only=True)
class ListTasksRequest(Request):
    state: str | None = None
    node: str | None = None
    batch: int | None = None
    user: str | None = None                # only this owner's tasks
    mine: bool = False                     # only ours (the owner is our broker user)
    limit: int = 50
    before: int | None = None              # only tasks older than this id (the next page)


@dataclass(frozen=True, kw_only=True)
class ListNodesRequest(Request):
    pass


@dataclass(frozen=True, kw_only=True)
class HealthRequest(Request):
    node: str | None = None                # None: every node
