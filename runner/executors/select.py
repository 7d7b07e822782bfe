"""Which executors this node has, and which one runs a given task (docs/architecture.md).

A task naming a container runs under ``docker``; a host task (``container`` is None)
runs under ``systemd`` where systemd is PID 1, else as a ``process``; ``[node] executor``
forces one of the two (``process`` on a systemd machine writes the cgroup v2 files
itself, which is how it is tested there).

Docker comes and goes (it may start after the runner, restart, be stopped), so the
``docker`` executor is always in the table and is asked each time whether it can take
a task (:meth:`~runner.executors.docker.DockerExecutor.available`, its one check):
container tasks are taken while Docker answers, and a runner restarted while Docker is
away still has the executor to adopt its containers with once Docker is back. Only a
machine where aiodocker cannot even be imported has no ``docker`` executor; host tasks
never depend on Docker.
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
    """Executor name → executor, for every executor this machine has (see :func:`usable`)."""
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
    try:
        from runner.executors.docker import DockerExecutor
    except ImportError as exc:  # a broken Docker client install must not take host tasks down with it
        log.warning("docker executor unavailable: %s", exc)
    else:
        executors["docker"] = DockerExecutor(config)
    return executors


def usable(executors: dict[str, Executor]) -> list[str]:
    """The names of the executors that can take a task now (what the heartbeat reports)."""
    return sorted(name for name, executor in executors.items() if executor.available())


def executor_name(task: Task, names) -> str | None:
    """Which of the executors ``names`` runs ``task`` (None: none of them can), by kind alone.

    A pure function: runners ask it of their peers' heartbeats too (runner/peers.py).
    """
    if task.container is not None:
        return "docker" if "docker" in names else None
    return next((name for name in ("systemd", "process") if name in names), None)


def executor_for(task: Task, executors: dict[str, Executor], now: bool = True) -> Executor:
    """The executor for ``task``; :class:`TaskRejected` when this node cannot run its kind.

    ``now``: it must be able to take the task now (when a task is accepted). A task
    already accepted asks with ``now=False``: its executor waits for Docker to answer.
    """
    name = executor_name(task, executors)
    if task.container is not None and (name is None or (now and not executors[name].available())):
        raise TaskRejected(f"task {task.task_id} needs container {task.container!r}, "
                           "but Docker is not available on this node")
    if name is None:
        raise TaskRejected(f"task {task.task_id} is a host task, but this node runs no host executor")
    return executors[name]
