"""The systemd executor's command line and availability, and the choice of executor per task.

systemd is not PID 1 on the development machine, so the scope itself cannot run here;
what can be checked without it is checked: the exact systemd-run argv and the selection.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hakuriver.config import Config, ConfigError, load_config
from hakuriver.messages import Task
from runner.executors.base import Executor, RunSpec, TaskRejected
from runner.executors.process import ProcessExecutor
from runner.executors.select import available_executors, executor_for
from runner.executors.systemd import SystemdExecutor, cpu_quota, systemd_is_init, systemd_run_argv, unit_name


def _task(**fields):
    return Task(**{"task_id": 7205759403792793, "batch_id": 1, "command": "python3",
                   "args": ["train.py", "--epochs", "3"], "target": "node1", **fields})


def _spec(**fields):
    return RunSpec(env={}, stdout_path=Path("/tmp/o"), stderr_path=Path("/tmp/e"), **fields)


def test_a_task_without_limits_is_a_bare_scope():
    assert systemd_run_argv(_task(), _spec()) == [
        "systemd-run", "--scope", "--quiet", "--unit=hakuriver-task-7205759403792793.scope",
        "--description=HakuRiver task 7205759403792793", "--", "python3", "train.py", "--epochs", "3"]


def test_limits_become_unit_properties():
    argv = systemd_run_argv(_task(cores=2.5, memory=8 << 30), _spec(cpus=[0, 1, 2, 3, 8], mems=[0]),
                            unit_prefix="hk-test-task")
    assert "--unit=hk-test-task-7205759403792793.scope" in argv
    properties = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-p"]
    assert properties == ["CPUQuota=250%", f"MemoryMax={8 << 30}", "MemorySwapMax=0",
                          "AllowedCPUs=0-3,8", "AllowedMemoryNodes=0"]
    assert argv[argv.index("--") + 1:] == ["python3", "train.py", "--epochs", "3"]


def test_legacy_systemd_pins_numa_with_numactl():
    argv = systemd_run_argv(_task(), _spec(cpus=[4, 5, 6, 7], mems=[1]), cpuset=False, numactl="/usr/bin/numactl")
    assert not any(arg.startswith(("AllowedCPUs", "AllowedMemoryNodes")) for arg in argv)
    assert argv[argv.index("--") + 1:] == ["/usr/bin/numactl", "--physcpubind=4-7", "--membind=1", "--",
                                           "python3", "train.py", "--epochs", "3"]
    # without numactl the command is left alone (the executor falls back to CPU affinity)
    argv = systemd_run_argv(_task(), _spec(cpus=[4], mems=[1]), cpuset=False)
    assert argv[argv.index("--") + 1:] == ["python3", "train.py", "--epochs", "3"]


@pytest.mark.parametrize("cores, quota", [(1, "100%"), (0.5, "50%"), (0.004, "1%"), (16, "1600%"), (1.256, "126%")])
def test_cpu_quota(cores, quota):
    assert cpu_quota(cores) == quota


def test_unit_name():
    assert unit_name(12) == "hakuriver-task-12.scope"


def test_systemd_is_init_needs_the_run_dir_and_pid_1(tmp_path):
    run_dir = tmp_path / "run-systemd-system"
    comm = tmp_path / "comm"
    comm.write_text("systemd\n")
    assert not systemd_is_init(str(run_dir), str(comm))
    run_dir.mkdir()
    assert systemd_is_init(str(run_dir), str(comm))
    comm.write_text("process_api\n")
    assert not systemd_is_init(str(run_dir), str(comm))
    assert not systemd_is_init(str(run_dir), str(tmp_path / "no-such-proc"))


def test_unavailable_without_systemd_run(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no systemd-run anywhere
    assert SystemdExecutor.available() is False


def test_unavailable_where_systemd_is_not_pid_1(monkeypatch, tmp_path):
    if systemd_is_init():
        pytest.skip("systemd is PID 1 here")
    fake = tmp_path / "systemd-run"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))  # systemd-run is there, systemd is not running
    assert SystemdExecutor.available() is False


def test_legacy_systemd_without_numactl_cannot_bind_memory_on_multi_node_machines(tmp_path):
    sys_nodes = tmp_path / "nodes"
    for index in (0, 1):
        (sys_nodes / f"node{index}").mkdir(parents=True)
        (sys_nodes / f"node{index}" / "cpulist").write_text(str(index))
        (sys_nodes / f"node{index}" / "meminfo").write_text(f"Node {index} MemTotal: 1024 kB\n")
    legacy = SystemdExecutor(sys_node_root=str(sys_nodes), cgroup_root=str(tmp_path / "legacy"))
    legacy._numactl = None
    assert legacy.unenforceable() == ["numa-memory"]
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("cpuset cpu memory\n")
    assert SystemdExecutor(sys_node_root=str(sys_nodes), cgroup_root=str(tmp_path / "unified")).unenforceable() == []


# ---- selection ---------------------------------------------------------------------

class _Named(Executor):
    """A stand-in executor that is never started: selection only looks at names."""

    def __init__(self, name):
        self.name = name

    async def start(self, task, spec): raise NotImplementedError
    async def wait(self, handle): raise NotImplementedError
    async def stop(self, handle, grace): raise NotImplementedError
    async def destroy(self, handle): raise NotImplementedError


def test_container_tasks_go_to_docker():
    executors = {name: _Named(name) for name in ("docker", "systemd", "process")}
    assert executor_for(_task(container="hakuriver-base"), executors).name == "docker"


def test_container_task_without_docker_is_rejected_with_the_reason():
    executors = {"process": _Named("process")}
    with pytest.raises(TaskRejected, match="Docker is not available"):
        executor_for(_task(container="hakuriver-base"), executors)


def test_host_tasks_prefer_systemd_then_process():
    assert executor_for(_task(), {name: _Named(name) for name in ("docker", "systemd", "process")}).name == "systemd"
    assert executor_for(_task(), {name: _Named(name) for name in ("docker", "process")}).name == "process"
    with pytest.raises(TaskRejected):
        executor_for(_task(), {"docker": _Named("docker")})


def test_available_executors_on_this_machine():
    config = Config()
    config.broker.prefix = "hk-test-select"
    executors = available_executors(config)
    assert isinstance(executors["process"], ProcessExecutor)
    assert executors["process"].cgroups.parent == "hk-test-select"
    assert ("systemd" in executors) is SystemdExecutor.available()
    assert all(name == executor.name for name, executor in executors.items())
    executors["process"].cgroups.remove_parent()
    assert executor_for(_task(), executors).name in ("systemd", "process")


def test_the_process_executor_can_be_forced_for_host_tasks():
    config = Config()
    config.broker.prefix = "hk-test-forced"
    config.node.executor = "process"
    executors = available_executors(config)
    executors["process"].cgroups.remove_parent()
    assert "systemd" not in executors  # also where systemd is PID 1 (the VM tests show that)
    assert executor_for(_task(), executors).name == "process"


def test_forcing_systemd_where_it_is_not_init_stops_the_runner_with_exit_2(tmp_path):
    if SystemdExecutor.available():
        pytest.skip("systemd is PID 1 here")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKURIVER_")}
    env.update(HAKURIVER_NODE_EXECUTOR="systemd", HAKURIVER_BROKER_URL="amqp://guest:guest@127.0.0.1:1/",
               HAKURIVER_CONFIG=str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    result = subprocess.run([str(Path(sys.executable).parent / "hakuriver.runner")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ('hakuriver.runner: [node] executor is "systemd", but systemd is not '
                                     "PID 1 here (or systemd-run is missing)")


def test_an_unknown_executor_is_a_config_error_naming_the_key(tmp_path):
    (tmp_path / "c.toml").write_text('[node]\nexecutor = "docker"\n')
    with pytest.raises(ConfigError, match="'node.executor'"):
        load_config(str(tmp_path / "c.toml"), environ={})
