"""The docker executor against the real engine: limits, mounts, env, OOM, kill,
policy, byte-exact output, and adopting containers after a runner restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
from pathlib import Path

import aiodocker
import pytest

from harness.local_cluster import wait_until_async

from docker_fixtures import (BASE_IMAGE, docker_client, docker_config, docker_engine,  # noqa: F401
                             docker_executor, make_spec, make_task, unique)
from hakuriver.messages import Mount
from hakuriver.containers import MIN_CORES, MIN_MEMORY
from runner.executors.base import Handle, StartFailed, TaskRejected
from runner.executors.docker import TASK_LABEL, DockerExecutor
from hakuriver.images import image_timestamp, tarball_path


@pytest.fixture
def executor(docker_executor):
    return docker_executor


async def run_to_end(executor: DockerExecutor, task, spec):
    handle = await executor.start(task, spec)
    try:
        return handle, await asyncio.wait_for(executor.wait(handle), 60)
    finally:
        await executor.destroy(handle)


async def containers_of(client, task_id: int) -> list:
    return await client.containers.list(all=True, filters={"label": [f"{TASK_LABEL}={task_id}"]})


async def test_available(executor):
    assert executor.available() is True


async def test_task_sees_its_memory_and_cpu_limits(executor, docker_config, tmp_path):
    script = ("if [ -e /sys/fs/cgroup/cpu.max ]; then cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; "
              "else cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; fi")
    task = make_task(docker_config, "sh", "-c", script, cores=0.5, memory=64 * 1024 * 1024)
    spec = make_spec(docker_config, task, tmp_path)
    _, outcome = await run_to_end(executor, task, spec)
    assert outcome.exit_code == 0 and not outcome.oom
    lines = spec.stdout_path.read_text().split("\n")
    assert lines[0] == str(64 * 1024 * 1024)
    assert lines[1] in ("50000", "50000 100000")


async def test_numa_target_pins_cpuset(executor, docker_config, tmp_path):
    task = make_task(docker_config, "sh", "-c",
                     "cat /sys/fs/cgroup/cpuset/cpuset.cpus 2>/dev/null || cat /sys/fs/cgroup/cpuset.cpus.effective")
    spec = make_spec(docker_config, task, tmp_path, cpus=[0], mems=[0])
    _, outcome = await run_to_end(executor, task, spec)
    assert outcome.exit_code == 0
    assert spec.stdout_path.read_text().strip() == "0"


async def test_shared_dir_env_and_no_runner_environment(executor, docker_config, tmp_path):
    task = make_task(docker_config, "sh", "-c",
                     'echo "$HAKURIVER_TASK_ID $GREETING $HAKURIVER_SHARED_DIR $HAKURIVER_LOCAL_TEMP_DIR" '
                     '> /shared/hello; echo "leak=$RUNNER_SECRET"; touch /local_temp/scratch',
                     env={"GREETING": "hi there"})
    spec = make_spec(docker_config, task, tmp_path, extra_env={"RUNNER_SECRET": "s3cret"})
    _, outcome = await run_to_end(executor, task, spec)
    assert outcome.exit_code == 0, spec.stderr_path.read_text()
    shared = Path(docker_config.paths.shared_dir)
    assert (shared / "hello").read_text() == f"{task.task_id} hi there /shared /local_temp\n"
    assert spec.stdout_path.read_text() == "leak=\n"
    assert (Path(docker_config.paths.local_temp_dir) / "scratch").exists()


async def test_exit_code_and_stderr_are_reported(executor, docker_config, tmp_path):
    task = make_task(docker_config, "sh", "-c", "echo out; echo err >&2; exit 3")
    spec = make_spec(docker_config, task, tmp_path)
    _, outcome = await run_to_end(executor, task, spec)
    assert (outcome.exit_code, outcome.oom) == (3, False)
    assert spec.stdout_path.read_bytes() == b"out\n"
    assert spec.stderr_path.read_bytes() == b"err\n"


async def test_memory_limit_hit_is_oom(executor, docker_config, tmp_path):
    task = make_task(docker_config, "sh", "-c", 'x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo survived',
                     memory=32 * 1024 * 1024)
    spec = make_spec(docker_config, task, tmp_path)
    _, outcome = await run_to_end(executor, task, spec)
    assert outcome.oom is True
    assert outcome.exit_code != 0
    assert b"survived" not in spec.stdout_path.read_bytes()


async def test_stop_ends_the_task_and_destroy_leaves_no_container(executor, docker_config, tmp_path, docker_client):
    task = make_task(docker_config, "sh", "-c", "echo started; exec sleep 1000")
    spec = make_spec(docker_config, task, tmp_path)
    handle = await executor.start(task, spec)
    await wait_until_async(lambda: spec.stdout_path.read_bytes() == b"started\n", what="the task to start")
    await executor.stop(handle, grace=5)
    outcome = await asyncio.wait_for(executor.wait(handle), 30)
    assert outcome.exit_code == 143   # SIGTERM reached the task: no need for SIGKILL
    await executor.destroy(handle)
    assert await containers_of(docker_client, task.task_id) == []
    await executor.destroy(handle)    # idempotent


async def test_stop_kills_a_task_that_ignores_sigterm(executor, docker_config, tmp_path):
    task = make_task(docker_config, "sh", "-c", "trap '' TERM; echo ready; while true; do sleep 0.1; done")
    spec = make_spec(docker_config, task, tmp_path)
    handle = await executor.start(task, spec)
    await wait_until_async(lambda: spec.stdout_path.read_bytes() == b"ready\n", what="the trap to be set")
    await executor.stop(handle, grace=1)
    outcome = await asyncio.wait_for(executor.wait(handle), 30)
    await executor.destroy(handle)
    assert outcome.exit_code == 137


async def test_privileged_is_allowed_where_the_node_allows_it(docker_config, tmp_path):
    docker_config.node.allow_privileged = True
    task = make_task(docker_config, "true", privileged=True)
    allowing = DockerExecutor(docker_config)
    try:
        body = allowing._container_config(task, make_spec(docker_config, task, tmp_path), "image")
        assert body["HostConfig"]["Privileged"] is True
    finally:
        await allowing.close()


async def test_allowed_mounts_honour_read_only(executor, docker_config, tmp_path):
    allowed = Path(docker_config.node.allowed_mount_roots[0])
    (allowed / "rw").mkdir()
    (allowed / "ro").mkdir()
    (allowed / "ro" / "input").write_text("data\n")
    task = make_task(docker_config, "sh", "-c", "cat /in/input > /out/copy; touch /in/nope",
                     mounts=[Mount(host_path=str(allowed / "rw"), container_path="/out"),
                             Mount(host_path=str(allowed / "ro"), container_path="/in", read_only=True)])
    spec = make_spec(docker_config, task, tmp_path)
    _, outcome = await run_to_end(executor, task, spec)
    assert (allowed / "rw" / "copy").read_text() == "data\n"
    assert not (allowed / "ro" / "nope").exists()
    assert outcome.exit_code != 0 and b"Read-only" in spec.stderr_path.read_bytes()


async def test_output_is_byte_exact(executor, docker_config, tmp_path):
    task = make_task(docker_config, "sh", "-c",
                     "head -c 3000000 /dev/urandom | tee /shared/stdout.bin; "
                     "head -c 200000 /dev/urandom | tee /shared/stderr.bin >&2")
    spec = make_spec(docker_config, task, tmp_path)
    _, outcome = await run_to_end(executor, task, spec)
    assert outcome.exit_code == 0
    shared = Path(docker_config.paths.shared_dir)
    assert _digest(spec.stdout_path) == _digest(shared / "stdout.bin")
    assert _digest(spec.stderr_path) == _digest(shared / "stderr.bin")


async def test_command_not_found_fails_to_start(executor, docker_config, tmp_path, docker_client):
    task = make_task(docker_config, "no-such-command-here")
    with pytest.raises(StartFailed, match="command not found: no-such-command-here"):
        await executor.start(task, make_spec(docker_config, task, tmp_path))
    assert await containers_of(docker_client, task.task_id) == []


async def test_unknown_environment_is_rejected(executor, docker_config, tmp_path, unique):
    task = make_task(docker_config, "true", container=unique)
    with pytest.raises(TaskRejected, match=f"unknown container environment '{unique}'"):
        await executor.start(task, make_spec(docker_config, task, tmp_path))
    task = make_task(docker_config, "true", container="Bad Name")
    with pytest.raises(TaskRejected, match="invalid container environment name"):
        await executor.start(task, make_spec(docker_config, task, tmp_path))


async def test_recover_running_container_resumes_output_exactly(docker_config, tmp_path, docker_client):
    shared = Path(docker_config.paths.shared_dir)
    task = make_task(docker_config, "sh", "-c",
                     # Docker hands a running container's output to its log line by line:
                     # the newline lets the last partial line through before the task ends.
                     "{ head -c 500000 /dev/urandom; echo; } | tee /shared/before; "
                     "while [ ! -e /shared/go ]; do sleep 0.02; done; "
                     "head -c 300000 /dev/urandom | tee /shared/after; echo done >&2; exit 7")
    spec = make_spec(docker_config, task, tmp_path)
    first = DockerExecutor(docker_config)
    handle = await first.start(task, spec)
    stored = handle.to_dict()
    await wait_until_async(lambda: spec.stdout_path.stat().st_size == 500001,
                   what="the first part of the output")
    await first.close()   # the runner goes away; the container keeps running

    second = DockerExecutor(docker_config)
    try:
        recovered = await second.recover(Handle.from_dict(stored), spec)
        assert recovered is not None
        (shared / "go").touch()
        outcome = await asyncio.wait_for(second.wait(recovered), 60)
        assert outcome.exit_code == 7
        assert spec.stdout_path.read_bytes() == (shared / "before").read_bytes() + (shared / "after").read_bytes()
        assert spec.stderr_path.read_bytes() == b"done\n"
        await second.destroy(recovered)
    finally:
        await second.close()
    assert await containers_of(docker_client, task.task_id) == []


async def test_recover_after_the_container_ended_copies_the_rest(docker_config, tmp_path, docker_client):
    shared = Path(docker_config.paths.shared_dir)
    task = make_task(docker_config, "sh", "-c",
                     "echo one; while [ ! -e /shared/go ]; do sleep 0.02; done; "
                     "head -c 200000 /dev/urandom | tee /shared/rest; exit 5")
    spec = make_spec(docker_config, task, tmp_path)
    first = DockerExecutor(docker_config)
    handle = await first.start(task, spec)
    await wait_until_async(lambda: spec.stdout_path.read_bytes() == b"one\n", what="the first line")
    await first.close()
    (shared / "go").touch()
    await docker_client.containers.container(handle.data["container_id"]).wait()
    os.truncate(spec.stdout_path, 2)   # as if the runner died in the middle of a write

    second = DockerExecutor(docker_config)
    try:
        recovered = await second.recover(Handle.from_dict(handle.to_dict()), spec)
        assert recovered is not None
        outcome = await asyncio.wait_for(second.wait(recovered), 60)
        assert outcome.exit_code == 5
        assert spec.stdout_path.read_bytes() == b"one\n" + (shared / "rest").read_bytes()
        await second.destroy(recovered)
        # the container is gone now: nothing to adopt any more
        assert await second.recover(Handle.from_dict(handle.to_dict()), spec) is None
    finally:
        await second.close()


async def test_recover_finds_the_container_by_label(docker_config, tmp_path):
    task = make_task(docker_config, "sh", "-c", "echo hi; exit 2")
    spec = make_spec(docker_config, task, tmp_path)
    first = DockerExecutor(docker_config)
    handle = await first.start(task, spec)
    await first.close()
    second = DockerExecutor(docker_config)
    try:
        # a handle stored before the container id was known
        recovered = await second.recover(Handle(task.task_id, "docker", {}), spec)
        assert recovered is not None and recovered.data["container_id"] == handle.data["container_id"]
        outcome = await asyncio.wait_for(second.wait(recovered), 60)
        assert outcome.exit_code == 2
        assert spec.stdout_path.read_bytes() == b"hi\n"
        await second.destroy(recovered)
    finally:
        await second.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_path_set_by_the_task_is_not_answered_from_the_command_cache(executor, docker_config, tmp_path):
    task = make_task(docker_config, "echo", "hi")
    _, outcome = await run_to_end(executor, task, make_spec(docker_config, task, tmp_path))
    assert outcome.exit_code == 0
    task = make_task(docker_config, "echo", "hi", env={"PATH": "/no-such-dir"})
    with pytest.raises(StartFailed, match="command not found: echo"):
        await executor.start(task, make_spec(docker_config, task, tmp_path))


async def test_a_newer_tarball_or_a_removed_image_is_noticed_after_the_image_was_found_current(
        executor, docker_config, docker_client, tmp_path, unique):
    repo = f"hakuriver/{unique}"
    await docker_client.images.tag(BASE_IMAGE, repo, tag="base")
    tags = [f"{repo}:base"]
    try:
        async def run_one():
            task = make_task(docker_config, "echo", "hi", container=unique)
            _, outcome = await run_to_end(executor, task, make_spec(docker_config, task, tmp_path))
            assert outcome.exit_code == 0

        await run_one()   # the image is found current; there is no tarball
        timestamp = int(max(time.time(), image_timestamp(await docker_client.images.inspect(f"{repo}:base")))) + 1
        tarball = tarball_path(docker_config.paths.shared_dir, unique, timestamp)
        tarball.parent.mkdir(parents=True, exist_ok=True)
        saved = await asyncio.to_thread(subprocess.run, ["docker", "save", "-o", str(tarball), f"{repo}:base"],
                                        capture_output=True, timeout=120)
        assert saved.returncode == 0, saved.stderr
        tags.append(f"{repo}:tarball-{timestamp}")
        await run_one()   # the new tarball is loaded, which stamps the image
        assert tags[1] in (await docker_client.images.inspect(f"{repo}:base"))["RepoTags"]
        for tag in tags:
            await docker_client.images.delete(tag, noprune=True)
        await run_one()   # create fails with 404; the image is loaded from its tarball again
        assert tags[1] in (await docker_client.images.inspect(f"{repo}:base"))["RepoTags"]
    finally:
        for tag in tags:
            try:
                await docker_client.images.delete(tag, noprune=True)
            except aiodocker.DockerError:
                pass


async def test_the_smallest_limits_the_rule_allows_are_the_smallest_docker_runs(executor, docker_config, tmp_path,
                                                                                docker_client):
    """The bounds of hakuriver.containers are Docker's own: at them a container runs, below them it cannot."""
    task = make_task(docker_config, "true", cores=MIN_CORES, memory=MIN_MEMORY)
    _, outcome = await run_to_end(executor, task, make_spec(docker_config, task, tmp_path))
    assert outcome.exit_code == 0
    for cores, memory in ((MIN_CORES, MIN_MEMORY - 1), (MIN_CORES * 0.9, MIN_MEMORY)):
        task = make_task(docker_config, "true", cores=cores, memory=memory)
        with pytest.raises(StartFailed):
            await executor.start(task, make_spec(docker_config, task, tmp_path))
        assert await containers_of(docker_client, task.task_id) == []


async def test_a_mount_whose_host_path_is_gone_fails_and_is_not_created(executor, docker_config, tmp_path):
    """Past the policy (the path went away after the task was accepted), Docker still creates nothing."""
    missing = Path(docker_config.node.allowed_mount_roots[0]) / "gone"
    task = make_task(docker_config, "true", mounts=[Mount(host_path=str(missing), container_path="/data")])
    with pytest.raises(StartFailed, match="does not exist"):
        await executor.start(task, make_spec(docker_config, task, tmp_path))
    assert not missing.exists()
