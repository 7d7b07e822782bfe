"""Config loading: file, environment overrides, and errors that name the key and the file."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from harness.local_cluster import BIN
from hakuriver.config import ConfigError, default_config_text, load_config


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(environ={})
    assert config.broker.prefix == "hakuriver" and config.timing.heartbeat_interval == 5.0
    assert config.database_url.startswith("sqlite+aiosqlite:///")


def test_file_and_environment_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[broker]\nprefix = "lab"\n[node]\nallowed_mount_roots = ["/data"]\n')
    config = load_config(str(path), environ={"HAKURIVER_TIMING_HEARTBEAT_INTERVAL": "1.5",
                                             "HAKURIVER_NODE_ALLOWED_MOUNT_ROOTS": "/a,/b",
                                             "HAKURIVER_TASK_ID": "123"})  # a task's own variable: ignored
    assert config.broker.prefix == "lab"
    assert config.timing.heartbeat_interval == 1.5
    assert config.node.allowed_mount_roots == ["/a", "/b"]


@pytest.mark.parametrize("text, named", [
    ("[broker]\nprefx = 'x'\n", "'broker.prefx'"),
    ("[timing]\nkill_grace = 'soon'\n", "'timing.kill_grace'"),
    ("[nodes]\nname = 'x'\n", "[nodes]"),
    ("[node]\nmemory = '8X'\n", "'node.memory'"),
    ("[broker\n", "not valid TOML"),
])
def test_bad_file_names_the_key_and_the_file(tmp_path, text, named):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path), environ={})
    assert named in str(error.value) and str(path) in str(error.value)


def test_bad_environment_override_names_the_variable():
    with pytest.raises(ConfigError, match="HAKURIVER_TIMING_KILL_GRACE"):
        load_config(environ={"HAKURIVER_TIMING_KILL_GRACE": "soon"})
    with pytest.raises(ConfigError, match="HAKURIVER_BROKER_PORT"):
        load_config(environ={"HAKURIVER_BROKER_PORT": "1"})


def test_default_config_text_is_valid_and_complete(tmp_path):
    path = tmp_path / "default.toml"
    path.write_text(default_config_text())
    data = tomllib.loads(path.read_text())
    assert set(data) == {"broker", "node", "paths", "host", "timing", "docker", "client", "web", "security", "users"}
    assert load_config(str(path), environ={}).model_dump() == load_config(str(path), environ={}).model_dump()


@pytest.mark.parametrize("command", ["hakuriver.client", "hakuriver.runner", "hakuriver.host"])
def test_every_process_exits_2_on_a_bad_config(tmp_path, command):
    path = tmp_path / "bad.toml"
    path.write_text("[broker]\nurll = 'x'\n")
    args = ["--list-nodes"] if command == "hakuriver.client" else []
    result = subprocess.run([str(BIN / command), "--config", str(path), *args], capture_output=True, timeout=30)
    assert result.returncode == 2
    assert b"broker.urll" in result.stderr and str(path).encode() in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
