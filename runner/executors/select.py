"""Which executors this node has, and which one runs a given task (SPEC §6 "Executors").

A task naming a container runs under ``docker``; a host task (``container`` is None)
runs under ``systemd`` where systemd is PID 1, else as a ``process``; ``[node] executor``
forces one of the two (``process`` on a systemd machine writes the cgroup v2 files
itself, which is how it is tested there). Docker is
optional: it is imported and probed lazily and any failure there only means this
node has no ``docker`` executor, so host tasks keep working.
"""

from __future__ import annotations

import logging

from hakuriver.config import Config, ConfigError
from hakuriver.messages import Task
from runner.executors.base import Executor, TaskRejected
from runner.executors.process import ProcessExecutor
from runner.executors.systemd import SystemdExecutor

log = logging.getLogger(__name__)


def available_executors(config: Config) -> dict[str, Executor]:
    """Executor name → executor, for every executor this machine can use now."""
    # the runner's prefix names its cgroup parent, so runners of different fabrics never collide
    # "process" stays even where systemd runs host tasks: a restarted runner still finds it
    # to clean up the tasks it started before the executor setting changed
    executors: dict[str, Executor] = {"process": ProcessExecutor(cgroup_parent=config.broker.prefix)}
    wanted = config.node.executor
    if wanted != "process" and SystemdExecutor.available():
        executors["systemd"] = SystemdExecutor(unit_prefix=f"{config.broker.prefix}-task")
    elif wanted == "systemd":
        raise ConfigError('[node] executor is "systemd", but systemd is not PID 1 here '
                          "(or systemd-run is missing)")
    docker = _docker_executor(config)
    if docker is not None:
        executors["docker"] = docker
    return executors


def _docker_executor(config: Config) -> Executor | None:
    try:
        from runner.executors.docker import DockerExecutor

        executor = DockerExecutor(config)
        reachable = executor.is_reachable()
    except Exception as exc:  # a broken Docker set-up must not take host tasks down with it
        log.warning("docker executor unavailable: %s", exc)
        return None
    return executor if reachable else None


def executor_for(task: Task, executors: dict[str, Executor]) -> Executor:
    """The executor for ``task``; :class:`TaskRejected` when this node cannot run its kind."""
    if task.container is not None:
        if "docker" not in executors:
            raise TaskRejected(f"task {task.task_id} needs container {task.container!r}, "
                               "but Docker is not available on this node")
        return executors["docker"]
    for name in ("systemd", "process"):
        if name in executors:
            return executors[name]
    raise TaskRejected(f"task {task.task_id} is a host task, but this node runs no host executor")
