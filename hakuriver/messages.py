"""The message contract (docs/protocol.md): every message that crosses the broker.

Every process imports these models and nothing else defines a wire format.
Each message is JSON with ``"v": 1``; a message of another version, with unknown
fields, or over the size bounds (:mod:`hakuriver.bounds`, which the client checks before
sending) fails validation and goes to the dead-letter queue.
Binary output travels as the raw message body; its metadata rides in headers
(see :class:`OutputChunk`), so a 64 KiB chunk is not inflated by base64.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from hakuriver.bounds import (COMBINED_EVENTS_BYTES, DEFAULT_RETRY_DELAY_S, MAX_AFTER, MAX_ARG_BYTES,
                              MAX_CHUNK_BYTES, MAX_CORES, MAX_ENV_BYTES, MAX_EVENTS_PER_MESSAGE, MAX_GPUS, MAX_MEMORY,
                              MAX_MESSAGE_BYTES, MAX_NUMA_ID, MAX_RETRIES, MAX_RETRY_DELAY_S, MAX_RPC_REPLY_BYTES,
                              MAX_TASK_BYTES)
from hakuriver.mounts import parse_mount
from hakuriver.states import TaskState
from hakuriver.topology import target_key

if TYPE_CHECKING:   # the outbox's row type; importing the outbox itself would add asyncio and sqlite3 here
    from hakuriver.outbox import Row

VERSION = 1

EnvKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    v: Literal[1] = VERSION
    max_bytes: ClassVar[int] = MAX_MESSAGE_BYTES

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, body: bytes):
        if len(body) > cls.max_bytes:
            raise ValueError(f"message of {len(body)} bytes is over the {cls.max_bytes} byte bound")
        return cls.model_validate_json(body)


class MessageTooLarge(ValueError):
    """A message that its receivers would refuse for its encoded size; nothing was sent."""


class Mount(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    host_path: str
    container_path: str
    read_only: bool = False

    @field_validator("host_path", "container_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"mount path {value!r} must be absolute")
        return value

    @classmethod
    def parse(cls, text: str) -> "Mount":
        """``HOST:CONTAINER[:ro]`` as the client takes it (:func:`hakuriver.mounts.parse_mount`)."""
        return cls(**parse_mount(text)._asdict())

    def __str__(self) -> str:
        return f"{self.host_path}:{self.container_path}" + (":ro" if self.read_only else "")


class Task(Message):
    """What to run, where, and with which limits."""

    max_bytes: ClassVar[int] = MAX_TASK_BYTES       # room left for the state event that carries it

    task_id: int
    batch_id: int
    command: str = Field(min_length=1)
    args: list[str] = []
    env: dict[EnvKey, str] = {}
    cores: float = Field(default=0, ge=0, le=MAX_CORES)                  # 0 = no CPU limit
    memory: int | None = Field(default=None, gt=0, le=MAX_MEMORY)        # bytes
    target: str                                                          # node name, or "any" for the pool
    numa: int | None = Field(default=None, ge=0, le=MAX_NUMA_ID)
    # GPUs: exactly these ids (``node::0,1``), or any ``gpu_count`` free ones; with ids, gpu_count == len(gpus)
    gpus: list[Annotated[int, Field(ge=0, lt=MAX_GPUS)]] | None = Field(default=None, min_length=1, max_length=MAX_GPUS)
    gpu_count: int = Field(default=0, ge=0, le=MAX_GPUS)
    container: str | None = None                    # None = host execution
    privileged: bool = False
    mounts: list[Mount] = []
    # Retries (runner/retries.py): ``failed`` or ``lost`` attempts run again, up to ``retries`` more times,
    # ``retry_delay`` seconds apart; ``attempt`` is which run this message asks for (1: the first).
    retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    retry_delay: float = Field(default=DEFAULT_RETRY_DELAY_S, ge=0, le=MAX_RETRY_DELAY_S)
    attempt: int = Field(default=1, ge=1, le=MAX_RETRIES + 1)
    # Pipelines (hakuriver/host/pipelines.py): held by the host until every one of these tasks completed.
    after: list[int] = Field(default=[], max_length=MAX_AFTER)
    user: str = ""
    submit_host: str = ""
    submitted_at: float = Field(default_factory=time.time)

    @field_validator("args")
    @classmethod
    def _bounded_command_line(cls, value: list[str], info: ValidationInfo) -> list[str]:
        size = sum(_utf8_len(text) for text in (info.data.get("command", ""), *value))
        if size > MAX_ARG_BYTES:
            raise ValueError(f"command and arguments are {size} bytes, over the {MAX_ARG_BYTES} byte bound")
        return value

    @field_validator("env")
    @classmethod
    def _bounded_env(cls, value: dict[str, str]) -> dict[str, str]:
        size = sum(_utf8_len(k) + _utf8_len(v) for k, v in value.items())
        if size > MAX_ENV_BYTES:
            raise ValueError(f"environment is {size} bytes, over the {MAX_ENV_BYTES} byte bound")
        return value

    @model_validator(mode="after")
    def _attempt_within_retries(self) -> "Task":
        if self.attempt > self.retries + 1:
            raise ValueError(f"attempt {self.attempt} is past the {self.retries + 1} its retries allow")
        if self.task_id in self.after:
            raise ValueError(f"task {self.task_id} cannot wait for itself")
        return self

    @model_validator(mode="after")
    def _gpus_agree(self) -> "Task":
        if self.gpus is not None:
            if len(set(self.gpus)) != len(self.gpus):
                raise ValueError(f"GPU ids {self.gpus} repeat one")
            if self.gpu_count != len(self.gpus):
                raise ValueError(f"gpu_count {self.gpu_count} disagrees with the {len(self.gpus)} GPU ids {self.gpus}")
        return self

    def to_bytes(self) -> bytes:
        """The encoded task; :class:`MessageTooLarge` if receivers would refuse it for its size
        (JSON escapes a control character as six bytes, so this can bite below the other bounds)."""
        body = super().to_bytes()
        if len(body) > self.max_bytes:
            raise MessageTooLarge(f"task of {len(body)} bytes encoded (command, arguments and environment "
                                  f"as JSON) is over the {self.max_bytes} byte bound")
        return body

    @property
    def routing_key(self) -> str:
        return target_key(self.target, self.numa)


class StateEvent(Message):
    """A task changed state. ``seq`` grows by one per change of one task, so the
    ledger can drop a duplicate or out-of-order event. ``pending`` and ``queued``
    events carry the task itself, so the ledger learns every field from them."""

    task_id: int
    node: str | None = None
    state: TaskState
    seq: int = Field(ge=0)
    time: float = Field(default_factory=time.time)
    exit_code: int | None = None
    message: str = ""
    task: Task | None = None
    unenforced: list[str] = []   # limits the executor could not enforce (e.g. ["memory"])
    gpus: list[int] | None = None  # ``running``: the GPU ids the task holds (None: none)
    attempt: int = Field(default=1, ge=1, le=MAX_RETRIES + 1)  # which run of the task (retries) it is about
    ended: TaskState | None = None  # ``retrying``: how the attempt ended (``failed`` or ``lost``)

    @classmethod
    def all_from_bytes(cls, body: bytes) -> list["StateEvent"]:
        """The events of one state-event message, in order: one (a JSON object, as
        :meth:`from_bytes` reads it) or several (a JSON array of them, as
        :func:`combine_state_events` makes); ValueError for anything else, an empty array included."""
        if body.lstrip(b" \t\r\n")[:1] != b"[":
            return [cls.from_bytes(body)]
        if len(body) > cls.max_bytes:
            raise ValueError(f"message of {len(body)} bytes is over the {cls.max_bytes} byte bound")
        return _state_event_array().validate_json(body)


# -- several state events in one message ---------------------------------------------------

BCC_HEADER = "BCC"   # RabbitMQ's sender-selected distribution: more routing keys, stripped before delivery

def combine_state_events(rows: list[Row], events_exchange: str) -> list[Row]:
    """``rows`` with each run of consecutive state events made into one message: the outbox's
    ``combine`` (the runner's and the host's). Every other row stays as it is, and in its place.

    Why: each message costs the publisher, the broker, the host and every waiting client about
    as much as the event in it, and a busy runner's outbox holds several events at a time. The
    combined message's body is the JSON array of the events' bodies, its routing key the first
    event's, and its ``BCC`` header the other events' keys: RabbitMQ routes it on all of them and
    puts it into each bound queue once (the host's ledger queue, a client bound to any one of the
    tasks), then strips the header. A run stops at MAX_EVENTS_PER_MESSAGE events or before the
    array reaches COMBINED_EVENTS_BYTES; a run of one stays the plain object it always was.
    A state event is a row on ``events_exchange`` with a ``task.<id>.state`` key and no headers.
    """
    out: list[Row] = []
    run: list[Row] = []
    size = 1   # the array's bytes so far: "[", then each body with the "," or "]" after it
    for row in rows:
        exchange, key, body, headers = row
        if not (exchange == events_exchange and headers is None and key.startswith("task.")
                and key.endswith(".state")):
            if run:
                out.append(_one_message(run))
                run = []
            out.append(row)
            continue
        if run and (len(run) >= MAX_EVENTS_PER_MESSAGE or size + len(body) + 1 > COMBINED_EVENTS_BYTES):
            out.append(_one_message(run))
            run = []
        if not run:
            size = 1
        run.append(row)
        size += len(body) + 1
    if run:
        out.append(_one_message(run))
    return out


def state_event_combiner(events_exchange: str):
    """:func:`combine_state_events` for the outbox of a process that publishes to ``events_exchange``."""
    return functools.partial(combine_state_events, events_exchange=events_exchange)


def _one_message(run: list[Row]) -> Row:
    if len(run) == 1:
        return run[0]
    exchange, key = run[0][0], run[0][1]
    others = list(dict.fromkeys(row[1] for row in run[1:] if row[1] != key))
    return exchange, key, b"[" + b",".join(row[2] for row in run) + b"]", {BCC_HEADER: others} if others else None


@functools.cache
def _state_event_array() -> TypeAdapter:
    # Built on first use, as the models are (defer_build): a runner never reads one.
    return TypeAdapter(Annotated[list[StateEvent], Field(min_length=1, max_length=MAX_EVENTS_PER_MESSAGE)])


class OutputChunk(BaseModel):
    """Metadata of one chunk of a task's output; the bytes are the message body.

    Travels as AMQP headers ``task_id``, ``stream``, ``offset``, ``v``. A chunk
    delivered twice writes the same bytes at the same offset, so the stored log
    stays byte-identical to what the task wrote.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    v: Literal[1] = VERSION
    task_id: int
    stream: Literal["stdout", "stderr"]
    offset: int = Field(ge=0)
    attempt: int = Field(default=1, ge=1, le=MAX_RETRIES + 1)  # each attempt of a retried task has its own output

    def headers(self) -> dict[str, Any]:
        headers = {"v": self.v, "task_id": str(self.task_id), "stream": self.stream, "offset": self.offset}
        if self.attempt != 1:  # the first attempt's chunks read as they always did
            headers["attempt"] = self.attempt
        return headers

    @classmethod
    def from_headers(cls, headers: dict[str, Any], body: bytes) -> "OutputChunk":
        if len(body) > MAX_CHUNK_BYTES:
            raise ValueError(f"output chunk of {len(body)} bytes is over the {MAX_CHUNK_BYTES} byte bound")
        fields = {k: headers.get(k) for k in ("v", "task_id", "stream", "offset")}
        if headers.get("attempt") is not None:
            fields["attempt"] = headers["attempt"]
        return cls.model_validate(fields)


ControlAction = Literal["kill", "pause", "resume"]


class Kill(Message):
    """A control message for one task, to its node's control queue. ``action`` is ``kill``
    unless said otherwise, so a kill reads as it always did; ``pause`` and ``resume``
    travel the same way and pass the same checks on the runner."""

    task_id: int
    user: str = ""
    action: ControlAction = "kill"


class NumaNode(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    cpus: list[int]
    memory: int  # bytes


class Gpu(BaseModel):
    """One GPU of a node. Declared by hand (``[node] gpus = "0,1"``) only ``index`` is known;
    read through NVML, the rest too. ``index`` is NVML's (PCI bus) order."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    index: int = Field(ge=0, lt=MAX_GPUS)
    uuid: str = ""
    name: str = ""
    memory_total: int = 0      # bytes
    memory_used: int = 0       # bytes
    utilization: float = 0.0   # percent, GPU busy over NVML's last sample
    numa: int | None = None    # the NUMA node it hangs off, when known


class Heartbeat(Message):
    node: str
    time: float = Field(default_factory=time.time)
    cores_total: float
    cores_free: float
    memory_total: int
    memory_free: int
    numa: dict[int, NumaNode] = {}
    numa_cores_free: dict[int, float] = {}
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    running: list[int] = []
    queued: list[int] = []
    version: str = ""
    executors: list[str] = []
    unenforced: list[str] = []   # limits this node cannot enforce for host tasks
    stopping: bool = False       # sent once when a runner shuts down politely
    gpus: list[Gpu] = []         # the node's GPUs
    gpus_free: list[int] = []    # indices of the GPUs no task holds


class NodeInfo(Message):
    """A runner's retained self-description (docs/protocol.md, "Node info"): the client reads it
    from the node's info queue to refuse unknown nodes and NUMA ids before publishing."""

    node: str
    numa: list[int] = []
    cores: float = 0
    memory: int = 0
    gpus: list[int] = []   # GPU indices


class RpcRequest(Message):
    method: Literal["status", "list_tasks", "list_nodes", "output", "health"]
    params: dict[str, Any] = {}


class RpcReply(Message):
    max_bytes: ClassVar[int] = MAX_RPC_REPLY_BYTES
    ok: bool
    result: Any = None
    error: str = ""


def _utf8_len(text: str) -> int:
    # surrogatepass: a command line may carry bytes that are not UTF-8 (Python keeps them as surrogates)
    return len(text.encode("utf-8", "surrogatepass"))


def one_line(exc: Exception) -> str:
    """An exception as one line for people: a pydantic error names the field, what is wrong,
    and the value when it is short enough to read."""
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "message"
        value = error.get("input")
        shown = f" (got {value!r})" if isinstance(value, (int, float, str)) and len(repr(value)) <= 60 else ""
        return f"{where}: {error['msg'].removeprefix('Value error, ')}{shown}"
    return " ".join(str(exc).split())
