"""The container environment workflow (``hakuriver.docker``) against the real engine:
create a container, change it, publish a tarball, and have a runner load it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiodocker
import pytest

from docker_fixtures import (BASE_IMAGE, docker_client, docker_config, docker_engine, make_spec,  # noqa: F401
                             make_task, unique)
from hakuriver.admin.environments import env_container
from runner.executors.docker import DockerExecutor
from hakuriver.images import image_ref, tarball_path, tarballs
from runner.images import ImageSync


@pytest.fixture
def config_file(docker_config, tmp_path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[paths]\nshared_dir = "{docker_config.paths.shared_dir}"\n')
    return path


@pytest.fixture
async def environment(unique, docker_client, docker_config, config_file):
    """An environment name, and everything of it removed afterwards."""
    name = unique
    yield name
    await hakuriver_docker(config_file, "delete", name)
    for tag in (image_ref(name),):
        try:
            await docker_client.images.delete(tag, force=True)
        except aiodocker.DockerError:
            pass


async def hakuriver_docker(config_file: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hakuriver.admin.environments", "--config", str(config_file), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def exec_in(docker_client, container: str, *command: str) -> int:
    execution = await docker_client.containers.container(container).exec(list(command))
    async with execution.start(detach=False) as stream:
        while await stream.read_out() is not None:
            pass   # drained: the command has ended
    return (await execution.inspect())["ExitCode"]


async def test_create_change_publish_and_run(environment, docker_client, docker_config, config_file, tmp_path):
    name = environment
    code, _, err = await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name)
    assert code == 0, err
    assert (await docker_client.containers.container(env_container(name)).show())["State"]["Running"]
    assert await exec_in(docker_client, env_container(name), "touch", "/marker") == 0

    code, _, err = await hakuriver_docker(config_file, "create-tar", name)
    assert code == 0, err
    [tarball] = tarballs(docker_config.paths.shared_dir, name)
    assert tarball.size > 0 and str(tarball.path) in err

    code, out, _ = await hakuriver_docker(config_file, "list")
    assert code == 0
    [row] = [line.split() for line in out.splitlines() if line.split()[0] == name]
    assert row[1:4] == ["running", image_ref(name), "1"] and row[4] == tarball.path.name

    # a runner without the image: the task loads the tarball first (two tasks, one load)
    await docker_client.images.delete(image_ref(name), force=True)
    executor = DockerExecutor(docker_config)
    try:
        tasks = [make_task(docker_config, "ls", "/marker", container=name) for _ in range(2)]
        specs = [make_spec(docker_config, task, tmp_path) for task in tasks]
        handles = await asyncio.gather(*(executor.start(t, s) for t, s in zip(tasks, specs)))
        outcomes = [await asyncio.wait_for(executor.wait(h), 60) for h in handles]
        for handle in handles:
            await executor.destroy(handle)
    finally:
        await executor.close()
    assert [o.exit_code for o in outcomes] == [0, 0]
    assert [s.stdout_path.read_text() for s in specs] == ["/marker\n", "/marker\n"]
    loaded = await docker_client.images.inspect(image_ref(name))
    assert f"hakuriver/{name}:tarball-{tarball.timestamp}" in loaded["RepoTags"]


async def test_stop_start_and_delete(environment, docker_client, docker_config, config_file):
    name = environment
    assert (await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name))[0] == 0
    code, _, err = await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name)
    assert code == 1 and "already has a container" in err and len(err.strip().splitlines()) == 1

    assert (await hakuriver_docker(config_file, "stop", name))[0] == 0
    assert not (await docker_client.containers.container(env_container(name)).show())["State"]["Running"]
    assert (await hakuriver_docker(config_file, "start", name))[0] == 0
    assert (await docker_client.containers.container(env_container(name)).show())["State"]["Running"]

    assert (await hakuriver_docker(config_file, "create-tar", name))[0] == 0
    code, _, err = await hakuriver_docker(config_file, "delete", name)
    assert code == 0 and "removed container" in err
    assert tarballs(docker_config.paths.shared_dir, name) == []
    with pytest.raises(aiodocker.DockerError):
        await docker_client.images.inspect(image_ref(name))
    with pytest.raises(aiodocker.DockerError):
        await docker_client.containers.container(env_container(name)).show()
    code, _, err = await hakuriver_docker(config_file, "delete", name)
    assert code == 1 and f"no environment named '{name}'" in err


async def test_create_tar_keeps_the_newest_three(environment, docker_config, config_file):
    name = environment
    shared = docker_config.paths.shared_dir
    tarball_path(shared, name, 1).parent.mkdir(parents=True, exist_ok=True)
    for timestamp in (100, 200, 300):
        tarball_path(shared, name, timestamp).write_bytes(b"old")
    assert (await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name))[0] == 0
    assert (await hakuriver_docker(config_file, "create-tar", name))[0] == 0
    assert [t.timestamp for t in tarballs(shared, name)][1:] == [300, 200]


async def test_image_newer_than_its_tarball_is_kept(environment, docker_client, docker_config, config_file):
    name = environment
    assert (await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name))[0] == 0
    assert (await hakuriver_docker(config_file, "create-tar", name))[0] == 0
    [tarball] = tarballs(docker_config.paths.shared_dir, name)
    before = (await docker_client.images.inspect(image_ref(name)))["Id"]
    # an older tarball of something else under this name must not replace the image
    older = tarball_path(docker_config.paths.shared_dir, name, tarball.timestamp - 10)
    tarball.path.rename(older)
    assert await ImageSync(docker_client, docker_config.paths.shared_dir).ensure(name) == image_ref(name)
    after = await docker_client.images.inspect(image_ref(name))
    assert after["Id"] == before
    assert not any(":tarball-" in tag for tag in after["RepoTags"])


async def test_bad_input_and_failures_exit_codes(config_file, unique, tmp_path):
    code, _, err = await hakuriver_docker(config_file, "create-container", BASE_IMAGE, "Not Valid")
    assert code == 2 and "invalid container environment name" in err and len(err.strip().splitlines()) == 1
    code, _, err = await hakuriver_docker(config_file, "shell", unique)
    assert code == 1 and f"environment '{unique}' has no container" in err
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[paths]\nnope = 1\n")
    code, _, err = await hakuriver_docker(bad_config, "list")
    assert code == 2 and "nope" in err


async def image_gone(docker_client, image_id: str) -> bool:
    try:
        await docker_client.images.inspect(image_id)
    except aiodocker.DockerError as exc:
        return exc.status == 404
    return False


async def docker_cli(*args: str) -> str:
    process = await asyncio.create_subprocess_exec("docker", *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def test_create_tar_prunes_the_image_it_replaces(environment, docker_client, docker_config, config_file):
    name = environment
    assert (await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name))[0] == 0
    assert (await hakuriver_docker(config_file, "create-tar", name))[0] == 0
    [tarball] = tarballs(docker_config.paths.shared_dir, name)
    # as on a machine that is also a runner: the image was loaded from the tarball and stamped
    first = (await docker_client.images.inspect(image_ref(name)))["Id"]
    await docker_client.images.delete(image_ref(name))
    await ImageSync(docker_client, docker_config.paths.shared_dir).ensure(name)
    assert f"hakuriver/{name}:tarball-{tarball.timestamp}" in (await docker_client.images.inspect(first))["RepoTags"]

    assert await exec_in(docker_client, env_container(name), "touch", "/second") == 0
    assert (await hakuriver_docker(config_file, "create-tar", name))[0] == 0
    second = (await docker_client.images.inspect(image_ref(name)))["Id"]
    assert second != first and await image_gone(docker_client, first)   # stamps and all

    assert (await hakuriver_docker(config_file, "create-tar", name))[0] == 0
    assert await image_gone(docker_client, second)   # no dangling commit left behind
    dangling = await docker_client.images.list(filters={"label": [f"hakuriver.environment={name}"],
                                                        "dangling": ["true"]})
    assert dangling == []


async def test_a_runner_prunes_an_image_a_newer_tarball_replaced_once_no_task_uses_it(
        environment, docker_client, docker_config, config_file, tmp_path):
    name = environment
    shared = Path(docker_config.paths.shared_dir)
    assert (await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name))[0] == 0
    assert (await hakuriver_docker(config_file, "create-tar", name))[0] == 0
    [older] = tarballs(shared, name)
    first = (await docker_client.images.inspect(image_ref(name)))["Id"]
    executor = DockerExecutor(docker_config)
    try:
        holding = make_task(docker_config, "sh", "-c", "while [ ! -e /shared/go ]; do sleep 0.05; done",
                            container=name)
        handle = await executor.start(holding, make_spec(docker_config, holding, tmp_path))
        # a newer tarball, as if published from another machine: this machine keeps the first image
        assert await exec_in(docker_client, env_container(name), "touch", "/second") == 0
        second = await docker_cli("commit", env_container(name), image_ref(name))
        await docker_cli("save", "-o", str(tarball_path(shared, name, older.timestamp + 10)), image_ref(name))
        await docker_cli("tag", first, image_ref(name))
        await docker_cli("rmi", second)
        assert (await hakuriver_docker(config_file, "stop", name))[0] == 0
        # the task's container has the environment's label (from its image): list counts only the
        # environment's own container
        code, out, _ = await hakuriver_docker(config_file, "list")
        assert [line.split()[1] for line in out.splitlines() if line.split()[0] == name] == ["exited"]

        newer = make_task(docker_config, "ls", "/second", container=name)   # loads the newer tarball
        newer_handle = await executor.start(newer, make_spec(docker_config, newer, tmp_path))
        assert (await asyncio.wait_for(executor.wait(newer_handle), 60)).exit_code == 0
        await executor.destroy(newer_handle)
        assert (await docker_client.images.inspect(image_ref(name)))["Id"] == second
        assert not await image_gone(docker_client, first)   # a running task still uses it

        (shared / "go").touch()
        assert (await asyncio.wait_for(executor.wait(handle), 60)).exit_code == 0
        await executor.destroy(handle)
        assert await image_gone(docker_client, first)
    finally:
        await executor.close()


async def test_delete_removes_every_image_of_the_environment(environment, docker_client, config_file):
    name = environment
    assert (await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name))[0] == 0
    # what older versions left: an image named only by a runner's stamp, and a dangling commit
    stamped = await docker_cli("commit", env_container(name), f"hakuriver/{name}:tarball-100")
    dangling = await docker_cli("commit", env_container(name))
    code, _, err = await hakuriver_docker(config_file, "delete", name)
    assert code == 0, err
    assert f"removed image hakuriver/{name}:tarball-100" in err
    assert await image_gone(docker_client, stamped) and await image_gone(docker_client, dangling)


async def test_shell_takes_a_script_on_stdin_or_a_command(environment, docker_client, config_file):
    name = environment
    assert (await hakuriver_docker(config_file, "create-container", BASE_IMAGE, name))[0] == 0
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hakuriver.admin.environments", "--config", str(config_file), "shell", name,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(b"touch /prepared\necho done\n"), 120)
    assert process.returncode == 0, err.decode()
    assert out == b"done\n"
    assert await exec_in(docker_client, env_container(name), "ls", "/prepared") == 0
    code, out, _ = await hakuriver_docker(config_file, "shell", name, "--", "sh", "-c", "echo $0; exit 3", "hi")
    assert (code, out) == (3, "hi\n")
