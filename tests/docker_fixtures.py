"""A real Docker engine for the tests, and small helpers to build tasks for it.

``docker_engine`` starts the engine (and builds the base image) with
``.ci/setup-docker.sh`` when ``docker info`` fails; if that does not work the
tests fail, they are never skipped. Test modules import these fixtures by name.
"""

from __future__ import annotations

import itertools
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hakuriver.config import Config
from hakuriver.messages import Task
from runner.executors.base import RunSpec

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "hakuriver/hakuriver-base:base"
_task_ids = itertools.count(int(time.time() * 1000) << 16)


def _engine_ready() -> bool:
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, timeout=30)
        image = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return info.returncode == 0 and image.returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if not _engine_ready():
        setup = subprocess.run([str(REPO / ".ci" / "setup-docker.sh")], capture_output=True, text=True,
                               timeout=900)
        assert setup.returncode == 0, f"setup-docker.sh failed:\n{setup.stdout}\n{setup.stderr}"
    assert _engine_ready(), "the Docker engine or the base image is not available after setup"


@pytest.fixture
async def docker_client(docker_engine):
    import aiodocker

    client = aiodocker.Docker()
    yield client
    await client.close()


@pytest.fixture
def unique() -> str:
    """A name prefix no other test (or engineer) uses."""
    return f"hk-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def docker_config(tmp_path: Path, unique: str, docker_engine):
    """A config whose node name is unique; its task containers are removed afterwards,
    also when a test fails half-way."""
    import aiodocker

    yield _config(tmp_path, unique)
    async with aiodocker.Docker() as client:
        for container in await client.containers.list(
                all=True, filters={"label": [f"hakuriver.node={unique}"]}):
            await container.delete(force=True)



@pytest.fixture
async def docker_executor(docker_config, docker_engine):
    """A docker executor on ``docker_config``, closed afterwards."""
    from runner.executors.docker import DockerExecutor

    executor = DockerExecutor(docker_config)
    yield executor
    await executor.close()


def _config(tmp_path: Path, unique: str) -> Config:
    shared = tmp_path / "shared"
    local_temp = tmp_path / "local_temp"
    shared.mkdir()
    local_temp.mkdir()
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return Config.model_validate({
        "node": {"name": unique, "allowed_mount_roots": [str(allowed)]},
        "paths": {"shared_dir": str(shared), "local_temp_dir": str(local_temp),
                  "state_dir": str(tmp_path / "state")},
    })


def new_task_id() -> int:
    return next(_task_ids)


def make_task(config: Config, command: str, *args: str, **fields) -> Task:
    fields.setdefault("container", "hakuriver-base")
    return Task(task_id=fields.pop("task_id", None) or new_task_id(), batch_id=1, command=command,
                args=list(args), target=config.node.node_name, **fields)


def make_spec(config: Config, task: Task, tmp_path: Path, **fields) -> RunSpec:
    env = {"HAKURIVER_TASK_ID": str(task.task_id), "HAKURIVER_NODE": config.node.node_name,
           "HAKURIVER_SHARED_DIR": config.paths.shared_dir,
           "HAKURIVER_LOCAL_TEMP_DIR": config.paths.local_temp_dir,
           "HAKURIVER_CORES": str(task.cores), **task.env}
    env.update(fields.pop("extra_env", {}))
    return RunSpec(env=env, stdout_path=tmp_path / f"{task.task_id}.out",
                   stderr_path=tmp_path / f"{task.task_id}.err",
                   shared_dir=config.paths.shared_dir, local_temp_dir=config.paths.local_temp_dir, **fields)

