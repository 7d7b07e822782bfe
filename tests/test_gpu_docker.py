"""GPUs for containers against the real Docker engine (this machine has no GPU and no NVIDIA
runtime): the created container asks Docker for exactly its GPUs, and on a node whose Docker
cannot give them the task ends ``failed`` saying so, at once."""

from __future__ import annotations

import asyncio

import pytest

from docker_fixtures import (docker_client, docker_config, docker_engine, docker_executor,  # noqa: F401
                             make_spec, make_task, unique)
from runner.executors.base import StartFailed
from runner.executors.docker import container_name


@pytest.fixture
def executor(docker_executor):
    return docker_executor


async def test_the_created_container_requests_exactly_the_tasks_gpus(executor, docker_config, docker_client,
                                                                     tmp_path):
    task = make_task(docker_config, "true", gpu_count=2)
    spec = make_spec(docker_config, task, tmp_path, gpus=["GPU-aaaa", "3"])
    image = await executor._image_for(task)
    container_id = await executor._create(task, spec, image, container_name(task.task_id))
    try:
        host_config = (await docker_client.containers.container(container_id).show())["HostConfig"]
        [request] = host_config["DeviceRequests"]
        assert request["DeviceIDs"] == ["GPU-aaaa", "3"] and request["Capabilities"] == [["gpu"]]
    finally:
        await docker_client.containers.container(container_id).delete(force=True)


async def test_no_gpu_means_no_device_request(executor, docker_config, docker_client, tmp_path):
    task = make_task(docker_config, "true")
    spec = make_spec(docker_config, task, tmp_path)
    container_id = await executor._create(task, spec, await executor._image_for(task), container_name(task.task_id))
    try:
        assert not (await docker_client.containers.container(container_id).show())["HostConfig"].get("DeviceRequests")
    finally:
        await docker_client.containers.container(container_id).delete(force=True)


async def test_without_an_nvidia_runtime_the_task_fails_saying_so(executor, docker_config, docker_client, tmp_path):
    task = make_task(docker_config, "true", gpus=[0], gpu_count=1)
    spec = make_spec(docker_config, task, tmp_path, gpus=["0"])
    with pytest.raises(StartFailed, match="no NVIDIA runtime") as caught:
        await asyncio.wait_for(executor.start(task, spec), 120)
    assert "\n" not in str(caught.value)
    left = await docker_client.containers.list(all=True, filters={"name": [container_name(task.task_id)]})
    assert left == []   # nothing of it stays
