"""``hakuriver.init``: the default config it writes loads, and its units start this install.

Run as the installed console script, in a subprocess, like a person or a package script would.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hakuriver.config import load_config
from hakuriver.admin.init import render_unit

REPO = Path(__file__).resolve().parents[1]


def init(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # The script of the install running these tests: beside its interpreter (a venv), else on PATH.
    beside = Path(sys.executable).parent / "hakuriver.init"
    command = str(beside) if beside.is_file() else shutil.which("hakuriver.init")
    assert command, "hakuriver.init is not installed (pip install -e .)"
    return subprocess.run([command, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def exec_start(unit_text: str) -> list[str]:
    lines = [line for line in unit_text.splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, unit_text
    return shlex.split(lines[0].removeprefix("ExecStart="))


def test_config_to_stdout_is_toml_with_every_section_and_loads(tmp_path):
    done = init("config")
    assert done.returncode == 0, done.stderr
    parsed = tomllib.loads(done.stdout)
    assert {"broker", "node", "paths", "host", "timing", "docker"} <= parsed.keys()
    assert parsed["broker"]["prefix"] == "hakuriver"
    path = tmp_path / "config.toml"
    path.write_text(done.stdout)
    config = load_config(str(path), environ={})
    assert config.timing.heartbeat_interval == 5.0
    assert config.docker.default_container == "hakuriver-base"


def test_config_output_file_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "etc" / "config.toml"
    first = init("config", "--output", str(path))
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""
    assert str(path) in first.stderr
    assert load_config(str(path), environ={}).broker.url.startswith("amqp://")

    path.write_text("# edited by hand\n")
    refused = init("config", "--output", str(path))
    assert refused.returncode == 1
    assert "--force" in refused.stderr
    assert path.read_text() == "# edited by hand\n"

    forced = init("config", "--output", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "[broker]" in path.read_text()


def test_service_units_start_the_installed_console_scripts(tmp_path):
    config = tmp_path / "config.toml"
    units = tmp_path / "units"
    done = init("service", "--host", "--runner", "--node", "gpu-1", "--output", str(units),
                "--config", str(config))
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in units.iterdir())
    assert written == ["hakuriver-host.service", "hakuriver-runner.service"]
    for name in written:
        assert f"wrote {units / name}" in done.stdout

    host = exec_start((units / "hakuriver-host.service").read_text())
    runner = exec_start((units / "hakuriver-runner.service").read_text())
    # The absolute path of this install's script: the one beside the interpreter or on PATH.
    for argv, script in ((host, "hakuriver.host"), (runner, "hakuriver.runner")):
        assert Path(argv[0]).is_absolute() and Path(argv[0]).name == script
        assert Path(argv[0]).is_file()
        assert argv[0] in {str(Path(sys.executable).parent / script), shutil.which(script)}
    assert host[1:] == ["--config", str(config)]
    assert runner[1:] == ["--config", str(config), "--node", "gpu-1"]
    # The config does not exist yet: the output says how to make it.
    assert "hakuriver.init config --output" in done.stderr


def test_service_units_are_usable_systemd_units(tmp_path):
    done = init("service", "--runner", "--output", str(tmp_path))
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "hakuriver-runner.service").read_text()
    sections = [line for line in text.splitlines() if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    assert "WantedBy=multi-user.target" in text
    assert exec_start(text)[1:] == ["--config", "/etc/hakuriver/config.toml"]
    assert not (tmp_path / "hakuriver-host.service").exists()


def test_service_without_a_role_is_a_usage_error(tmp_path):
    done = init("service", "--output", str(tmp_path))
    assert done.returncode == 2
    assert "--host" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_exec_start_keeps_paths_with_spaces_and_percent_signs():
    text = render_unit("host", "/etc/hakuriver/my config%1.toml", bin_dir="/opt/hakuriver/bin")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert "%%1" in line  # systemd would expand a single % as a specifier
    argv = shlex.split(line.removeprefix("ExecStart=").replace("%%", "%"))
    assert argv == ["/opt/hakuriver/bin/hakuriver.host", "--config", "/etc/hakuriver/my config%1.toml"]


@pytest.mark.parametrize("role", ["host", "runner"])
def test_deploy_units_are_what_init_writes_for_an_opt_install(role):
    shipped = (REPO / "deploy" / "systemd" / f"hakuriver-{role}.service").read_text()
    assert shipped == render_unit(role, "/etc/hakuriver/config.toml", bin_dir="/opt/hakuriver/bin")


@pytest.mark.parametrize("name", ["host.toml", "runner.toml"])
def test_deploy_example_configs_load(name):
    config = load_config(str(REPO / "deploy" / "config" / name), environ={})
    assert config.paths.shared_dir == "/mnt/cluster-shared/hakuriver"
