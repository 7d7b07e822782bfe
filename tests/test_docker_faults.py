"""Docker going away, coming back and stalling, under the docker executor and a whole runner.

Docker is taken away through a proxy (:mod:`docker_proxy`) in front of the real engine:
the proxy is stopped (every connection cut, as when the daemon restarts), started again,
or made to hold requests. The real engine keeps running for the other tests.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest

from docker_fixtures import (docker_client, docker_config, docker_engine, make_spec, make_task,  # noqa: F401
                             unique)
from docker_proxy import DockerProxy
from harness.local_cluster import Cluster, wait_until, wait_until_async
from runner.executors.base import Handle, TaskRejected
from runner.executors.docker import TASK_LABEL, DockerExecutor
from runner.executors.select import available_executors, executor_for, usable


@pytest.fixture
def proxy(docker_engine):
    proxy = DockerProxy()
    yield proxy
    proxy.close()


@pytest.fixture
async def proxied(docker_config, proxy):
    """An executor that talks to Docker through the proxy (started)."""
    docker_config.docker.url = proxy.url
    proxy.start()
    executor = DockerExecutor(docker_config)
    yield executor
    proxy.start()   # whatever the test did, let the executor clean up
    await executor.close()


async def containers_of(client, task_id: int) -> list:
    return await client.containers.list(all=True, filters={"label": [f"{TASK_LABEL}={task_id}"]})


async def exited(client, container_id: str) -> None:
    """Wait (on the real engine, not the proxy) until the container has ended."""
    await asyncio.wait_for(client.containers.container(container_id).wait(), 60)


# -- the executor ------------------------------------------------------------------------


async def test_docker_that_starts_later_is_used_and_one_that_goes_is_not(docker_config, proxy, tmp_path):
    docker_config.docker.url = proxy.url   # nothing listens there yet
    executors = available_executors(docker_config)
    task = make_task(docker_config, "echo", "hi")
    try:
        assert "docker" in executors and "docker" not in usable(executors)
        with pytest.raises(TaskRejected, match="Docker is not available on this node"):
            executor_for(task, executors)

        proxy.start()
        await wait_until_async(lambda: "docker" in usable(executors), what="Docker to be seen", timeout=10)
        docker = executor_for(task, executors)
        spec = make_spec(docker_config, task, tmp_path)
        handle = await docker.start(task, spec)
        assert (await asyncio.wait_for(docker.wait(handle), 60)).exit_code == 0
        await docker.destroy(handle)
        assert spec.stdout_path.read_bytes() == b"hi\n"

        proxy.stop()
        await wait_until_async(lambda: "docker" not in usable(executors), what="Docker to be missed", timeout=10)
    finally:
        await executors["docker"].close()


async def test_a_kill_after_the_container_was_created_removes_it_unstarted(proxied, proxy, docker_config,
                                                                          docker_client, tmp_path):
    shared = Path(docker_config.paths.shared_dir)
    task = make_task(docker_config, "touch", "/shared/ran")
    # What the runner does with a kill while the task starts: it cancels the start. Here it
    # comes at the last moment, with the container created and Docker stalling on its start.
    proxy.hold("/start")
    starting = asyncio.ensure_future(proxied.start(task, make_spec(docker_config, task, tmp_path)))
    await asyncio.to_thread(proxy.held.wait, 30)
    assert len(await containers_of(docker_client, task.task_id)) == 1
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    proxy.release()
    assert await containers_of(docker_client, task.task_id) == []
    assert not (shared / "ran").exists()


async def test_a_short_disconnect_loses_no_output_and_leaves_no_container(proxied, proxy, docker_config,
                                                                         docker_client, tmp_path):
    shared = Path(docker_config.paths.shared_dir)
    task = make_task(docker_config, "sh", "-c",
                     "for i in 1 2 3; do echo line $i; echo err $i >&2; done; "
                     "while [ ! -e /shared/go ]; do sleep 0.02; done; "
                     "head -c 300000 /dev/urandom | tee /shared/rest; for i in 4 5 6; do echo line $i; done")
    spec = make_spec(docker_config, task, tmp_path)
    handle = await proxied.start(task, spec)
    waiting = asyncio.ensure_future(proxied.wait(handle))
    await wait_until_async(lambda: spec.stdout_path.read_bytes() == b"line 1\nline 2\nline 3\n", what="the first lines")
    proxy.stop()   # the followed log and the waiting request break
    (shared / "go").touch()
    await wait_until_async(lambda: (shared / "rest").exists() and (shared / "rest").stat().st_size == 300000,
                   what="the task to write its output")
    assert not waiting.done()
    proxy.start()
    outcome = await asyncio.wait_for(waiting, 60)
    assert outcome.exit_code == 0
    rest = (shared / "rest").read_bytes()
    assert spec.stdout_path.read_bytes() == b"line 1\nline 2\nline 3\n" + rest + b"line 4\nline 5\nline 6\n"
    assert spec.stderr_path.read_bytes() == b"err 1\nerr 2\nerr 3\n"
    await proxied.destroy(handle)
    assert await containers_of(docker_client, task.task_id) == []


async def test_the_end_of_a_task_is_read_from_its_container_after_docker_was_away(
        proxied, proxy, docker_config, docker_client, tmp_path):
    shared = Path(docker_config.paths.shared_dir)
    task = make_task(docker_config, "sh", "-c", "echo one; while [ ! -e /shared/go ]; do sleep 0.02; done; "
                                                "echo two; exit 4")
    spec = make_spec(docker_config, task, tmp_path)
    handle = await proxied.start(task, spec)
    waiting = asyncio.ensure_future(proxied.wait(handle))
    await wait_until_async(lambda: spec.stdout_path.read_bytes() == b"one\n", what="the first line")
    proxy.stop()
    (shared / "go").touch()
    await exited(docker_client, handle.data["container_id"])   # it ended while Docker was away
    proxy.start()
    outcome = await asyncio.wait_for(waiting, 60)
    assert outcome.exit_code == 4
    assert spec.stdout_path.read_bytes() == b"one\ntwo\n"
    await proxied.destroy(handle)
    assert await containers_of(docker_client, task.task_id) == []


async def test_a_container_whose_removal_failed_is_removed_once_docker_answers(
        proxied, proxy, docker_config, docker_client, tmp_path):
    task = make_task(docker_config, "true")
    spec = make_spec(docker_config, task, tmp_path)
    handle = await proxied.start(task, spec)
    assert (await asyncio.wait_for(proxied.wait(handle), 60)).exit_code == 0
    proxy.stop()
    await proxied.destroy(handle)   # does not wait for Docker
    assert len(await containers_of(docker_client, task.task_id)) == 1
    proxy.start()

    async def removed() -> None:
        while await containers_of(docker_client, task.task_id):
            await asyncio.sleep(0.05)
    await asyncio.wait_for(removed(), 30)


async def test_recover_while_docker_is_away_adopts_once_it_answers(docker_config, proxy, docker_client, tmp_path):
    docker_config.docker.url = proxy.url
    proxy.start()
    shared = Path(docker_config.paths.shared_dir)
    task = make_task(docker_config, "sh", "-c", "echo one; while [ ! -e /shared/go ]; do sleep 0.02; done; "
                                                "echo two; exit 3")
    spec = make_spec(docker_config, task, tmp_path)
    first = DockerExecutor(docker_config)
    handle = await first.start(task, spec)
    await wait_until_async(lambda: spec.stdout_path.read_bytes() == b"one\n", what="the first line")
    await first.close()   # the runner goes away, and so does Docker
    proxy.stop()

    second = DockerExecutor(docker_config)
    try:
        recovered = await second.recover(Handle.from_dict(handle.to_dict()), spec)
        assert recovered is not None   # not given up on: it is adopted once Docker answers
        waiting = asyncio.ensure_future(second.wait(recovered))
        (shared / "go").touch()
        proxy.start()
        outcome = await asyncio.wait_for(waiting, 60)
        assert outcome.exit_code == 3
        assert spec.stdout_path.read_bytes() == b"one\ntwo\n"
        await second.destroy(recovered)
    finally:
        await second.close()
    assert await containers_of(docker_client, task.task_id) == []


# -- a whole runner ---------------------------------------------------------------------


def containers_labelled(task_id: str) -> list[str]:
    return subprocess.run(["docker", "ps", "-aq", "--filter", f"label={TASK_LABEL}={task_id}"],
                          capture_output=True, text=True, check=True).stdout.split()


@pytest.fixture
def proxied_cluster(tmp_path, proxy):
    proxy.start()
    c = Cluster(tmp_path / "cluster", ["node1"], docker={"default_container": "hakuriver-base", "url": proxy.url})
    try:
        yield c.start()
    finally:
        proxy.start()
        c.stop()


def test_kill_while_a_container_task_starts_ends_it_killed_unrun(proxied_cluster, proxy):
    c = proxied_cluster
    marker = c.root / "shared" / "ran"
    proxy.hold("/images/")   # the runner's image check stalls, as on a slow image load
    task_id = c.cli_ok("--target", "node1", "--", "touch", "/shared/ran").strip()
    assert proxy.held.wait(30)
    c.cli_ok("--kill", task_id)
    task = c.wait_state(task_id, {"killed", "completed", "failed"})
    proxy.release()
    assert task["state"] == "killed", task
    # the runner still runs container tasks, and the killed one never ran
    assert c.cli("--wait", "--target", "node1", "--", "true").returncode == 0
    assert not marker.exists()
    assert containers_labelled(task_id) == []


def test_runner_restarted_while_docker_is_away_adopts_its_container(proxied_cluster, proxy):
    c = proxied_cluster
    go = c.root / "shared" / "go"
    task_id = c.cli_ok("--target", "node1", "--", "sh", "-c",
                       "echo one; while [ ! -e /shared/go ]; do sleep 0.05; done; echo two").strip()
    wait_until(lambda: c.cli("--stdout", task_id).stdout == b"one\n", what="the first line")
    c.kill("node1", signal.SIGKILL)
    proxy.stop()
    c.start_runner("node1")
    # the new runner's heartbeat: it runs, and says that Docker is away
    wait_until(lambda: "docker" not in c.query("--list-nodes")["nodes"][0]["executors"],
               what="a heartbeat without docker")
    assert c.task(task_id)["state"] == "running"
    proxy.start()
    go.touch()
    task = c.wait_state(task_id, {"completed", "failed"}, timeout=60)
    assert task["state"] == "completed", task
    assert c.cli("--stdout", task_id).stdout == b"one\ntwo\n"
    assert containers_labelled(task_id) == []


def test_a_docker_api_outage_during_a_task_loses_no_output_and_leaves_no_container(proxied_cluster, proxy):
    c = proxied_cluster
    task_id = c.cli_ok("--target", "node1", "--", "sh", "-c",
                       "for i in 1 2 3; do echo line $i; done; while [ ! -e /shared/go ]; do sleep 0.05; done; "
                       "for i in 4 5 6; do echo line $i; done").strip()
    wait_until(lambda: c.cli("--stdout", task_id).stdout == b"line 1\nline 2\nline 3\n", what="the first lines")
    proxy.stop()
    (c.root / "shared" / "go").touch()
    [container] = containers_labelled(task_id)
    wait_until(lambda: subprocess.run(["docker", "inspect", "-f", "{{.State.Status}}", container], capture_output=True,
                                      text=True).stdout.strip() == "exited", what="the container to end")
    proxy.start()
    task = c.wait_state(task_id, {"completed", "failed", "lost"}, timeout=60)
    assert task["state"] == "completed", task
    assert c.cli("--stdout", task_id).stdout == b"".join(f"line {i}\n".encode() for i in range(1, 7))
    assert containers_labelled(task_id) == []
