"""``hakuriver.docker``: container environments, the upstream HakuRiver workflow.

An environment NAME is a long-running container ``hakuriver-env-NAME`` that a user
changes by hand (``shell``), then packages: ``create-tar`` commits it to the image
``hakuriver/NAME:base`` and saves that to ``<shared_dir>/hakuriver-containers/
NAME-<timestamp>.tar``, keeping the newest ``KEEP_TARBALLS``. Runners load the newest
tarball before a task (see :mod:`runner.images`).

Everything talks to the Docker API through aiodocker, except ``shell``: aiodocker has
no interactive terminal client, so ``shell`` replaces this process with
``docker exec`` (the docker CLI must be installed for that command only): with a
terminal (``-it``) when stdin is one, else with stdin alone (``-i``), so a script can
prepare an environment (``shell NAME < setup.sh``, or ``shell NAME -- COMMAND ...``).

What it makes, it prunes: ``create-tar`` removes the image its commit replaces (with any
stamps a runner on this machine put on it), and ``delete`` removes every image of the
environment, tagged or left dangling by an older version (:func:`hakuriver.images.prune_image`).

``delete`` asks nothing: it is a command for scripts as much as for people, and it
prints what it removed. Exit codes: 0 done, 1 a failure (Docker unreachable, no such
environment), 2 bad input (a name Docker cannot use, a bad config file).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import click

from hakuriver.cli_options import config_option

if TYPE_CHECKING:
    import aiodocker

    from hakuriver.config import Config

KEEP_TARBALLS = 3
ENV_LABEL = "hakuriver.environment"
KEEP_ALIVE = ["sleep", "2147483647"]   # busybox's sleep has no "infinity"


class Failure(Exception):
    """A command that could not be done; exit code 1 with this one-line message."""


def env_container(name: str) -> str:
    return f"hakuriver-env-{name}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """Create, change and publish container environments for HakuRiver tasks."""
    ctx.obj = config_file


def main(argv: list[str] | None = None) -> None:
    """The ``hakuriver.docker`` entry point: bad input is one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="hakuriver.docker", standalone_mode=False)
    except click.UsageError as exc:
        _fail(exc.format_message(), 2)
    except click.Abort:
        _fail("aborted", 1)


def _name_argument(function):
    return click.argument("name", callback=_checked_name)(function)


def _checked_name(ctx, param, value: str) -> str:
    from hakuriver.images import check_environment_name

    try:
        return check_environment_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command("create-container")
@click.argument("image")
@_name_argument
@click.pass_obj
def create_container(config_file, image: str, name: str) -> None:
    """Start environment NAME as a container from IMAGE, kept running for changes."""
    _run(config_file, lambda docker, config: _create_container(docker, image, name))


@cli.command()
@_name_argument
@click.pass_obj
def start(config_file, name: str) -> None:
    """Start the environment's container."""
    _run(config_file, lambda docker, config: _start(docker, name))


@cli.command()
@_name_argument
@click.pass_obj
def stop(config_file, name: str) -> None:
    """Stop the environment's container (its changes stay)."""
    _run(config_file, lambda docker, config: _stop(docker, name))


@cli.command()
@_name_argument
@click.argument("command", nargs=-1)
@click.pass_obj
def shell(config_file, name: str, command: tuple[str, ...]) -> None:
    """A shell in the environment (bash if it has one, else sh), or COMMAND.

    Interactive when stdin is a terminal; otherwise the shell reads its commands from
    stdin (``hakuriver.docker shell NAME < setup.sh``). Exits with the shell's or
    COMMAND's exit code.
    """
    _run(config_file, lambda docker, config: _start(docker, name, quiet=True))
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        _fail("the shell needs the docker command line client; it is not installed", 1)
    sys.stdout.flush()
    os.execvp(docker_cli, shell_argv(name, command, terminal=sys.stdin.isatty()))


def shell_argv(name: str, command: tuple[str, ...] = (), terminal: bool = False) -> list[str]:
    """The ``docker exec`` command line of ``shell``: a terminal only when stdin is one."""
    command = command or ("sh", "-c", "if [ -x /bin/bash ]; then exec /bin/bash; else exec /bin/sh; fi")
    return ["docker", "exec", "-it" if terminal else "-i", env_container(name), *command]


@cli.command("create-tar")
@_name_argument
@click.pass_obj
def create_tar(config_file, name: str) -> None:
    """Commit the environment to hakuriver/NAME:base and save it to shared storage."""
    _run(config_file, lambda docker, config: _create_tar(docker, config, name))


@cli.command("list")
@click.pass_obj
def list_environments(config_file) -> None:
    """Environments: their containers, images and tarballs."""
    _run(config_file, _list)


@cli.command()
@_name_argument
@click.pass_obj
def delete(config_file, name: str) -> None:
    """Remove the environment's container, image and tarballs (without asking)."""
    _run(config_file, lambda docker, config: _delete(docker, config, name))


# -- the work ------------------------------------------------------------------------------


async def _create_container(docker: "aiodocker.Docker", image: str, name: str) -> None:
    import aiodocker

    if await _container_info(docker, name) is not None:
        raise Failure(f"environment '{name}' already has a container ({env_container(name)}); "
                      f"use 'start {name}' or 'delete {name}'")
    try:
        await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise
        _say(f"pulling {image}")
        try:
            await docker.images.pull(image)
        except aiodocker.DockerError as pull_error:
            raise Failure(f"image {image!r} is not here and cannot be pulled: {pull_error.message}") from None
    container = await docker.containers.create({
        "Image": image,
        "Cmd": KEEP_ALIVE,
        "Labels": {ENV_LABEL: name},
        "Tty": False,
        "HostConfig": {"Init": True, "NetworkMode": "host"},  # host network: package installs work
    }, name=env_container(name))
    await container.start()
    _say(f"environment '{name}' is running as {env_container(name)}; change it with "
         f"'hakuriver.docker shell {name}', then publish it with 'hakuriver.docker create-tar {name}'")


async def _start(docker: "aiodocker.Docker", name: str, quiet: bool = False) -> None:
    info = await _require_container(docker, name)
    if not info["State"]["Running"]:
        await docker.containers.container(info["Id"]).start()
    if not quiet:
        _say(f"environment '{name}' is running")


async def _stop(docker: "aiodocker.Docker", name: str) -> None:
    info = await _require_container(docker, name)
    await docker.containers.container(info["Id"]).stop(t=5)
    _say(f"environment '{name}' is stopped")


async def _create_tar(docker: "aiodocker.Docker", config: "Config", name: str) -> None:
    from hakuriver.images import TIMESTAMP_LABEL, image_ref, prune_image, tarball_dir, tarball_path, tarballs

    info = await _require_container(docker, name)
    previous = await _image_id(docker, image_ref(name))
    timestamp = int(time.time())
    # The label carries the tarball's timestamp so that a runner (this machine included)
    # sees the image as exactly as new as its tarball. CMD replaces the keep-alive sleep.
    # The environment label names the image's environment (delete finds it even untagged).
    committed = await docker.containers.container(info["Id"]).commit(
        repository=f"hakuriver/{name}", tag="base", message=f"hakuriver.docker create-tar {name}",
        changes=[f"LABEL {TIMESTAMP_LABEL}={timestamp}", f"LABEL {ENV_LABEL}={name}", 'CMD ["/bin/sh"]'])
    if previous is not None and previous != committed.get("Id"):
        done, _ = await prune_image(docker, name, previous)
        if not done:
            _say(f"the image {image_ref(name)} replaced ({previous[:19]}) is still used by a container; "
                 f"'hakuriver.docker delete {name}' or 'docker image prune' removes it later")
    directory = tarball_dir(config.paths.shared_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = tarball_path(config.paths.shared_dir, name, timestamp)
    partial = directory / f".{target.name}.partial"   # runners never see a half-written tarball
    try:
        async with docker.images.export_image(image_ref(name)) as content:
            with open(partial, "wb") as out:
                async for piece in content.iter_chunked(1 << 20):
                    out.write(piece)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    for old in tarballs(config.paths.shared_dir, name)[KEEP_TARBALLS:]:
        old.path.unlink(missing_ok=True)
    _say(f"saved {image_ref(name)} to {target} ({_human(target.stat().st_size)})")


async def _list(docker: "aiodocker.Docker", config: "Config") -> None:
    from hakuriver.images import tarballs

    containers = {}
    for container in await docker.containers.list(all=True, filters={"label": [ENV_LABEL]}):
        # task containers carry the label too (their image has it): only hakuriver-env-NAME counts
        name = container["Labels"][ENV_LABEL]
        if f"/{env_container(name)}" in (container["Names"] or []):
            containers[name] = container["State"]
    images = set()
    for image in await docker.images.list(filters={"reference": ["hakuriver/*:base"]}):
        for tag in image.get("RepoTags") or []:
            images.add(tag[len("hakuriver/"):-len(":base")])
    saved: dict[str, list] = {}
    for tarball in tarballs(config.paths.shared_dir):
        saved.setdefault(tarball.name, []).append(tarball)
    rows = [("NAME", "CONTAINER", "IMAGE", "TARBALLS", "NEWEST TARBALL", "SIZE")]
    for name in sorted(set(containers) | images | set(saved)):
        mine = saved.get(name, [])
        newest = mine[0] if mine else None
        rows.append((name, containers.get(name, "-"), f"hakuriver/{name}:base" if name in images else "-",
                     str(len(mine)), newest.path.name if newest else "-",
                     _human(sum(t.size for t in mine)) if mine else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


async def _delete(docker: "aiodocker.Docker", config: "Config", name: str) -> None:
    from hakuriver.images import prune_image, tarballs

    removed = []
    info = await _container_info(docker, name)
    if info is not None:
        await docker.containers.container(info["Id"]).delete(force=True)
        removed.append(f"container {env_container(name)}")
    # every image of the environment: tagged hakuriver/NAME (base, a runner's tarball
    # stamps), or left untagged by a create-tar or load of an older version
    images = await docker.images.list(filters={"reference": [f"hakuriver/{name}"]})
    images += await docker.images.list(filters={"label": [f"{ENV_LABEL}={name}"], "dangling": ["true"]})
    kept = []
    for image_id in dict.fromkeys(image["Id"] for image in images):
        done, gone = await prune_image(docker, name, image_id, with_base=True)
        removed += [f"image {what}" for what in gone]
        if not done:
            kept.append(image_id[:19])
    for tarball in tarballs(config.paths.shared_dir, name):
        tarball.path.unlink(missing_ok=True)
        removed.append(f"tarball {tarball.path}")
    if not removed and not kept:
        raise Failure(f"no environment named '{name}'")
    for what in removed:
        _say(f"removed {what}")
    if kept:
        raise Failure(f"kept image(s) {', '.join(kept)} of environment '{name}': a container uses them")


async def _image_id(docker: "aiodocker.Docker", ref: str) -> str | None:
    import aiodocker

    try:
        return (await docker.images.inspect(ref))["Id"]
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise


async def _container_info(docker: "aiodocker.Docker", name: str) -> dict[str, Any] | None:
    import aiodocker

    try:
        return await docker.containers.container(env_container(name)).show()
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise


async def _require_container(docker: "aiodocker.Docker", name: str) -> dict[str, Any]:
    info = await _container_info(docker, name)
    if info is None:
        raise Failure(f"environment '{name}' has no container ({env_container(name)}); "
                      f"make one with 'hakuriver.docker create-container IMAGE {name}'")
    return info


# -- running a command ----------------------------------------------------------------------


def _run(config_file: str | None, work: Callable[["aiodocker.Docker", "Config"], Awaitable[None]]) -> None:
    """Load the config, open a Docker client, do the work; errors become one line and an exit code."""
    from hakuriver.config import ConfigError, load_config

    try:
        config = load_config(config_file)
    except ConfigError as exc:
        _fail(str(exc), 2)

    async def with_client() -> None:
        import aiodocker

        try:
            docker = aiodocker.Docker(url=config.docker.url or None)
        except Exception as exc:   # no socket found: aiodocker says so in its own words
            raise Failure(f"cannot reach Docker: {exc}") from None
        try:
            await work(docker, config)
        finally:
            await docker.close()

    import asyncio

    import aiodocker

    try:
        asyncio.run(with_client())
    except Failure as exc:
        _fail(str(exc), 1)
    except aiodocker.DockerError as exc:
        _fail(f"docker: {exc.message}", 1)
    except OSError as exc:
        _fail(str(exc), 1)


def _say(text: str) -> None:
    click.echo(text, err=True)


def _fail(message: str, code: int):
    click.echo(f"hakuriver.docker: {message}", err=True)
    sys.exit(code)


def _human(size: int) -> str:
    from hakuriver.sizes import format_size

    return format_size(size)


if __name__ == "__main__":
    main()
