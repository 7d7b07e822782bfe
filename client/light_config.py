"""The few config values the command line needs, read without pydantic.

Why it exists: :func:`hakuriver.config.load_config` validates every section with pydantic,
~50 ms of imports that a command-line invocation would pay before its first byte to the
broker. The client needs five values ([broker] url, prefix, queue_type; [docker]
default_container; [client] max_sweep); this reads them from the same file and the same
``HAKURIVER_<SECTION>_<KEY>`` variables, by the same rules.

It never invents an error of its own: the moment anything is not plainly right (a section or
key it does not know, a value not of its plain type, a URL that is not amqp://), it hands
over to ``load_config``, whose refusal (exit 2, naming the key and the file) is then the
answer, exactly as on the aio-pika path. Values of the sections only runners and the host use
are checked for their names here, not their values: those processes validate them when they start.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, NamedTuple

ENV_PREFIX = "HAKURIVER_"

# Every section and key of hakuriver.config.Config (tests/test_quick.py checks they agree).
KEYS: dict[str, frozenset[str]] = {
    "broker": frozenset({"url", "prefix", "queue_type", "ca_file", "cert_file", "key_file"}),  # TLS: load_config
    "node": frozenset({"name", "cores", "memory", "allow_privileged", "allow_root", "allow_root_containers",
                       "allowed_mount_roots", "gpus", "executor"}),
    "paths": frozenset({"shared_dir", "local_temp_dir", "state_dir"}),
    "host": frozenset({"database_url"}),
    "timing": frozenset({"heartbeat_interval", "heartbeat_timeout_factor", "kill_grace"}),
    "docker": frozenset({"default_container", "url", "network"}),
    "client": frozenset({"max_sweep"}),
    "web": frozenset({"listen", "allow_actions_without_login", "secret"}),
    "security": frozenset({"admins", "service_accounts"}),
    "users": frozenset(),  # free-form names; never set from the environment
}


class ClientSettings(NamedTuple):
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    prefix: str = "hakuriver"
    queue_type: str = "classic"
    default_container: str = "hakuriver-base"
    max_sweep: int = 100_000
    ssl_context: Any = None   # amqps:// only: hakuriver.tls's context, made where load_config read the file


class NotPlain(Exception):
    """Something only ``load_config`` may judge; the caller asks it."""


def read_settings(explicit: str | None = None, environ: dict[str, str] | None = None) -> ClientSettings:
    """The client's settings from the file and environment; :class:`NotPlain` where ``load_config``
    must decide (and, for a config it accepts, would decide the same values)."""
    path = _config_path(explicit)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            raise NotPlain from None
    for section, values in data.items():
        if section not in KEYS or not isinstance(values, dict):
            raise NotPlain
        if section != "users" and not set(values) <= KEYS[section]:
            raise NotPlain
    for name, value in (os.environ if environ is None else environ).items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in KEYS or not key:
            continue  # HAKURIVER_TASK_ID and friends: not config
        if section == "users" or key not in KEYS[section]:
            raise NotPlain
        data.setdefault(section, {})[key] = value
    broker, docker, client = data.get("broker", {}), data.get("docker", {}), data.get("client", {})
    defaults = ClientSettings()
    settings = ClientSettings(
        broker_url=_text(broker, "url", defaults.broker_url), prefix=_text(broker, "prefix", defaults.prefix),
        queue_type=_text(broker, "queue_type", defaults.queue_type),
        default_container=_text(docker, "default_container", defaults.default_container),
        max_sweep=_whole(client, "max_sweep", defaults.max_sweep))
    if settings.queue_type not in ("classic", "quorum"):
        raise NotPlain
    return settings


def _config_path(explicit: str | None) -> str | None:
    # as hakuriver.config.config_path (os.path, not pathlib: one import less at start-up):
    # explicit, else $HAKURIVER_CONFIG, else ~/.hakuriver/config.toml if it exists
    if explicit:
        return explicit
    if os.environ.get("HAKURIVER_CONFIG"):
        return os.environ["HAKURIVER_CONFIG"]
    default = os.path.join(os.path.expanduser("~"), ".hakuriver", "config.toml")
    return default if os.path.exists(default) else None


def _text(section: dict[str, Any], key: str, default: str) -> str:
    value = section.get(key, default)
    if not isinstance(value, str):
        raise NotPlain
    return value


def _whole(section: dict[str, Any], key: str, default: int) -> int:
    value = section.get(key, default)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if type(value) is not int:
        raise NotPlain
    return value
