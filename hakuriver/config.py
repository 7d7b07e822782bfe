"""One TOML config for every process, with ``HAKURIVER_<SECTION>_<KEY>`` overrides.

Each process reads the sections it needs. Every key has a default, so an empty or
missing file is a working local set-up. An unknown key or a value of the wrong type
is a :class:`ConfigError` naming the key and where it came from; the command line
turns it into exit code 2.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from hakuriver.sizes import parse_size

ENV_PREFIX = "HAKURIVER_"
HOME = Path(os.path.expanduser("~")) / ".hakuriver"


class ConfigError(Exception):
    """A config file or override that cannot be used; the message names the key and file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BrokerConfig(_Section):
    url: str = "amqp://guest:guest@127.0.0.1:5672/"   # or several, comma-separated: the nodes of a cluster
    prefix: str = "hakuriver"
    queue_type: Literal["classic", "quorum"] = "classic"  # quorum: durable queues replicated over a cluster
    ca_file: str = ""     # amqps://: CA certificate(s) the broker's must chain to; "" = the system's
    cert_file: str = ""   # amqps://: this process's client certificate, for brokers that ask for one
    key_file: str = ""    # its private key ("" = in cert_file)

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable_file(cls, value: str) -> str:
        if value and not os.access(value, os.R_OK):
            why = "no permission" if os.path.exists(value) else "no such file"
            raise ValueError(f"cannot read {value!r} ({why})")
        return value

    @model_validator(mode="after")
    def _key_needs_cert(self) -> "BrokerConfig":
        if self.key_file and not self.cert_file:
            raise ValueError("key_file is set but cert_file is not (the key of which certificate?)")
        return self

    @field_validator("url")
    @classmethod
    def _urls_are_amqp(cls, value: str) -> str:
        from hakuriver.broker_address import split_urls

        split_urls(value)
        return value


class NodeConfig(_Section):
    name: str = ""
    cores: int = 0
    memory: str = ""
    allow_privileged: bool = False
    allow_root: bool = False             # admins' tasks whose account is root may run as root here
    allow_root_containers: bool = False  # containers run as root, not as their owner's uid:gid
    allowed_mount_roots: list[str] = []
    gpus: str = "auto"   # "auto" (NVML), "none", or indices declared by hand: "0,1" (README "GPUs")
    executor: Literal["auto", "process", "systemd"] = "auto"  # host tasks; auto: systemd where it is PID 1

    @field_validator("gpus")
    @classmethod
    def _gpus_setting(cls, value: str) -> str:
        parse_gpu_setting(value)
        return value.strip()

    @field_validator("memory")
    @classmethod
    def _memory_is_a_size(cls, value: str) -> str:
        if value:
            parse_size(value)
        return value

    @field_validator("cores")
    @classmethod
    def _cores_not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must be 0 (all) or more")
        return value

    @property
    def node_name(self) -> str:
        return self.name or socket.gethostname()

    @property
    def memory_bytes(self) -> int | None:
        return parse_size(self.memory) if self.memory else None


def parse_gpu_setting(text: str) -> str | list[int]:
    """``[node] gpus`` as "auto", "none" or a list of GPU indices; ValueError naming a bad value."""
    text = text.strip()
    if text in ("auto", "none"):
        return text
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and part.isascii() for part in parts):
        raise ValueError(f"invalid gpus {text!r} (use \"auto\", \"none\" or indices such as \"0,1\")")
    indices = [int(part) for part in parts]
    if len(set(indices)) != len(indices):
        raise ValueError(f"invalid gpus {text!r}: an index is given twice")
    return indices


class PathsConfig(_Section):
    shared_dir: str = str(HOME / "shared")
    local_temp_dir: str = "/tmp/hakuriver"
    state_dir: str = str(HOME / "state")


class HostConfig(_Section):
    database_url: str = ""  # "" = SQLite in state_dir


class TimingConfig(_Section):
    heartbeat_interval: float = 5.0
    heartbeat_timeout_factor: float = 3
    kill_grace: float = 10.0

    @property
    def offline_after(self) -> float:
        return self.heartbeat_interval * self.heartbeat_timeout_factor


class DockerConfig(_Section):
    default_container: str = "hakuriver-base"
    url: str = ""
    network: str = "host"  # task containers' network mode; "bridge" isolates them


class ClientConfig(_Section):
    max_sweep: int = 100_000


class WebConfig(_Section):
    listen: str = "127.0.0.1:8000"   # HOST:PORT of the dashboard and HTTP API; "" = off
    allow_actions_without_login: bool = False
    secret: str = ""                 # signs session cookies; "" = a new one at every host start

    @field_validator("listen")
    @classmethod
    def _listen_is_host_port(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"must be HOST:PORT (e.g. 127.0.0.1:8000) or empty, not {value!r}")
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class SecurityConfig(_Section):
    admins: list[str] = []           # users who may act on every task (the others: on their own)
    service_accounts: list[str] = []  # broker users whose events are believed (besides this process's own)


class Config(_Section):
    broker: BrokerConfig = BrokerConfig()
    node: NodeConfig = NodeConfig()
    paths: PathsConfig = PathsConfig()
    host: HostConfig = HostConfig()
    timing: TimingConfig = TimingConfig()
    docker: DockerConfig = DockerConfig()
    client: ClientConfig = ClientConfig()
    web: WebConfig = WebConfig()
    security: SecurityConfig = SecurityConfig()
    users: dict[str, str] = {}       # broker user -> Unix account on this node, where the names differ

    @property
    def database_url(self) -> str:
        if self.host.database_url:
            return self.host.database_url
        return f"sqlite+aiosqlite:///{Path(self.paths.state_dir) / 'ledger.db'}"


SECTIONS = {name: field.annotation for name, field in Config.model_fields.items()}


def config_path(explicit: str | None = None) -> Path | None:
    """The file to read: ``explicit``, else ``$HAKURIVER_CONFIG``, else ``~/.hakuriver/config.toml`` if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("HAKURIVER_CONFIG"):
        return Path(os.environ["HAKURIVER_CONFIG"])
    default = HOME / "config.toml"
    return default if default.exists() else None


def load_config(explicit: str | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read the config file (if any), apply environment overrides, validate."""
    path = config_path(explicit)
    data: dict[str, Any] = {}
    source = str(path) if path else "defaults"
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] in {source}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] in {source} must be a table")
    overridden = _environment_overrides(os.environ if environ is None else environ, data)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + key.replace(".", "_").upper()
        where = f"environment variable {env_name}" if key in overridden else source
        if error["type"] == "extra_forbidden":
            raise ConfigError(f"unknown key {key!r} in {where}") from None
        raise ConfigError(f"bad value for {key!r} in {where}: {error['msg']}") from None


def _environment_overrides(environ: dict[str, str], data: dict[str, Any]) -> set[str]:
    """Fold ``HAKURIVER_<SECTION>_<KEY>`` variables into ``data``; returns the dotted keys set.

    Variables whose SECTION is not a config section are left alone: tasks receive
    ``HAKURIVER_TASK_ID`` and friends, and a client run inside a task must still start.
    """
    overridden = set()
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section not in SECTIONS or not key:
            continue
        model = SECTIONS[section]
        if not isinstance(model, type) or not issubclass(model, BaseModel):  # [users]: names are case-sensitive
            raise ConfigError(f"[{section}] cannot be set by environment variables ({name}); set it in the file")
        if key not in model.model_fields:
            raise ConfigError(f"unknown key '{section}.{key}' in environment variable {name}")
        data.setdefault(section, {})[key] = _parse_env_value(value, model.model_fields[key].annotation)
        overridden.add(f"{section}.{key}")
    return overridden


def _parse_env_value(value: str, annotation: Any) -> Any:
    if annotation == list[str]:
        value = value.strip()
        if value.startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


DEFAULT_CONFIG_TEXT = '''\
# HakuRiver configuration. Every key is optional; the values shown are the defaults.
# Any key can be overridden by an environment variable HAKURIVER_<SECTION>_<KEY>,
# e.g. HAKURIVER_BROKER_URL or HAKURIVER_TIMING_HEARTBEAT_INTERVAL.

[broker]
url = "amqp://guest:guest@127.0.0.1:5672/"   # amqps:// for TLS; a cluster: "amqp://a/,amqp://b/,amqp://c/"
prefix = "hakuriver"                          # every exchange and queue name starts with this
queue_type = "classic"                        # "quorum" on a broker cluster (the same on every machine)
ca_file = ""               # amqps://: the CA file the broker's certificate is checked against; "" = system CAs
cert_file = ""             # amqps://: a client certificate, where the broker asks for one
key_file = ""              # its private key; "" = in cert_file

[node]
name = ""                  # this runner's node name; "" = the machine's hostname
cores = 0                  # cores offered to tasks; 0 = all the machine has
memory = ""                # memory offered to tasks, e.g. "16G"; "" = all
allow_privileged = false   # may tasks ask for --privileged containers? (admins' tasks only)
allow_root = false         # may admins' tasks run as root (an account mapped to root by [users])?
allow_root_containers = false  # containers as root instead of their owner's uid:gid
allowed_mount_roots = []   # host paths under which --mount may point
gpus = "auto"              # GPUs offered to tasks: "auto" (NVML, needs hakuriver[gpu]), "none", or "0,1"
executor = "auto"          # host tasks: "auto" = systemd scopes where systemd is PID 1, else
                           # "process" (own cgroup v1/v2 files); "process" or "systemd" forces one

[paths]
shared_dir = "{shared_dir}"          # shared storage: environment tarballs, data the tasks share
local_temp_dir = "{local_temp_dir}"  # per-node scratch space, mounted as /local_temp
state_dir = "{state_dir}"            # runner store, ledger database and logs

[host]
database_url = ""          # SQLAlchemy URL; "" = sqlite+aiosqlite:///<state_dir>/ledger.db
                           # PostgreSQL: "postgresql+asyncpg://user:pass@host/db"

[timing]
heartbeat_interval = 5.0   # seconds between runner heartbeats
heartbeat_timeout_factor = 3   # a node is offline after interval x factor without one
kill_grace = 10.0          # seconds between SIGTERM and SIGKILL

[docker]
default_container = "hakuriver-base"   # "NULL" = run tasks on the host by default
url = ""                               # Docker API; "" = the local socket
network = "host"                       # task containers' network mode

[client]
max_sweep = 100000         # largest --sweep accepted

[web]
listen = "127.0.0.1:8000"  # the host's dashboard and HTTP API (HAKURIVER_WEB_LISTEN); "" = off
allow_actions_without_login = false   # let anyone kill from the dashboard (only until sign-in is in use)
secret = ""                # signs session cookies; "" = a new secret at every host start

[security]
admins = []                # broker users who may kill and read every task; the others only their own
service_accounts = []      # broker users of runners and host whose events are believed (own user always is)

[users]                    # runners: broker user = Unix account a task runs as; map the exceptions here
# alice_lab = "alice"
'''


def default_config_text() -> str:
    paths = PathsConfig()
    return DEFAULT_CONFIG_TEXT.format(**paths.model_dump())
