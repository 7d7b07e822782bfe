"""What a runner refuses (runner.policy), and the container rule it shares with the client
(hakuriver.containers): pure functions, called directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from hakuriver.config import NodeConfig
from hakuriver.containers import MIN_CORES, MIN_MEMORY, container_refusal
from hakuriver.messages import Mount, Task
from runner.policy import refusal


def task(**fields) -> Task:
    fields.setdefault("container", "env")
    return Task(task_id=1, batch_id=1, command="true", target="node1", **fields)


@pytest.fixture
def allowed(tmp_path) -> Path:
    root = tmp_path / "allowed"
    root.mkdir()
    return root


@pytest.fixture
def node(allowed) -> NodeConfig:
    return NodeConfig(name="node1", allowed_mount_roots=[str(allowed)])


def mount(text: str) -> list[Mount]:
    return [Mount.parse(text)]


@pytest.mark.parametrize("fields, reason", [
    ({"memory": 4 * 2**20}, "--memory 4.0M is below Docker's minimum of 6.0M for a container"),
    ({"memory": MIN_MEMORY - 1}, "below Docker's minimum of 6.0M"),
    ({"cores": 0.001}, "--cores 0.001 is below Docker's minimum of 0.01 for a container"),
    ({"mounts": mount("/data:/shared")}, "--mount /data:/shared: /shared is already the shared directory"),
    ({"mounts": mount("/data:/local_temp/")}, "/local_temp is already the node's local temp directory"),
    ({"mounts": mount("/data://shared")}, "/shared is already the shared directory"),
    ({"mounts": mount("/data:/")}, "--mount /data:/: a container path of / is not allowed"),
    ({"mounts": mount("/data:/x/..")}, "a container path of / is not allowed"),
    ({"mounts": mount("/a:/data") + mount("/b:/data:ro")},
     "--mount /b:/data:ro: /data is already mounted by --mount /a:/data in the container"),
])
def test_what_docker_would_refuse_is_refused_with_one_clear_line(fields, reason):
    found = container_refusal(task(**fields))
    assert found is not None and reason in found and "\n" not in found


@pytest.mark.parametrize("fields", [
    {}, {"memory": MIN_MEMORY, "cores": MIN_CORES}, {"cores": 0},
    {"mounts": mount("/a:/data") + mount("/b:/shared/sub")},
])
def test_what_docker_takes_is_not_refused(fields):
    assert container_refusal(task(**fields)) is None


def test_host_tasks_are_not_held_to_docker_bounds():
    assert container_refusal(task(container=None, memory=1024, cores=0.001)) is None


def test_the_runner_policy_applies_the_container_rule(node):
    assert "below Docker's minimum" in refusal(task(memory=1024), node)


def test_a_mount_of_a_host_path_that_does_not_exist_is_refused(node, allowed):
    found = refusal(task(mounts=mount(f"{allowed}/missing:/data")), node)
    assert found == f"mount of {allowed}/missing: no such file or directory on node node1"
    (allowed / "here").mkdir()
    assert refusal(task(mounts=mount(f"{allowed}/here:/data")), node) is None


def test_privileged_only_where_allowed(node):
    assert refusal(task(privileged=True), node) == "privileged containers are not allowed on node node1"
    assert refusal(task(privileged=True, container=None), node) == "privileged tasks are not allowed on node node1"
    node.allow_privileged = True
    assert refusal(task(privileged=True), node) is None


def test_mounts_only_under_allowed_roots_with_symlinks_resolved(node, allowed, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    assert f"mount of {outside} is not allowed on node node1" in refusal(task(mounts=mount(f"{outside}:/d")), node)
    (allowed / "escape").symlink_to(outside)   # a symlink inside an allowed root does not lead out of it
    assert "is not allowed" in refusal(task(mounts=mount(f"{allowed}/escape:/d")), node)


def test_a_host_task_takes_no_mount(node, allowed):
    assert "needs a container environment" in refusal(task(container=None, mounts=mount(f"{allowed}:/d")), node)
