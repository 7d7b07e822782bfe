"""Keeping a runner's container images current with the tarballs in shared storage.

The names (``hakuriver/NAME:base``, ``<shared>/hakuriver-containers/NAME-<ts>.tar``, how an
image's age is read) are :mod:`hakuriver.images`; this module loads tarballs into Docker.
Only one load per environment runs at a time: other tasks for the same environment
wait for it and then use the loaded image. The image a load replaces is pruned
(:func:`hakuriver.images.prune_image`); while a task's container still uses it, it is
pruned again after each task's container is removed, until it goes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from hakuriver.images import (Tarball, check_environment_name, image_ref, image_timestamp, prune_image,
                              tarball_listing, tarballs)
from runner.docker_api import connection_lost

if TYPE_CHECKING:
    import aiodocker

__all__ = ["ImageLoadFailed", "ImageSync", "UnknownEnvironment", "check_environment_name", "load_tarball"]


class UnknownEnvironment(Exception):
    """No image and no tarball for this environment."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown container environment '{name}'")
        self.name = name


class ImageLoadFailed(Exception):
    """A tarball exists but Docker could not load it (corrupt, wrong content)."""


class ImageSync:
    """Makes ``hakuriver/NAME:base`` current before a task, one load per name at a time.

    Checking costs Docker API calls, so an environment found current is remembered with
    the listing of its tarballs at that moment (names, sizes, mtimes: one directory
    scan); the next task checks again only when that listing has changed, e.g. a newer
    tarball was published. An image removed behind the runner's back is the caller's to
    report through :meth:`forget` (its container create fails with 404).
    """

    def __init__(self, docker: "aiodocker.Docker", shared_dir: str | Path) -> None:
        self._docker = docker
        self._shared_dir = shared_dir
        self._locks: dict[str, asyncio.Lock] = {}
        self._current: dict[str, tuple[tuple, str]] = {}   # name → (tarball listing, image id)
        self._replaced: dict[str, str] = {}   # image id → environment name, for images still to prune

    async def ensure(self, name: str) -> str:
        """The image reference to run, loading a newer tarball first if there is one.

        Raises :class:`UnknownEnvironment` or :class:`ImageLoadFailed`.
        """
        ref = image_ref(name)
        listing = tarball_listing(self._shared_dir, name)
        current = self._current.get(name)
        if current is not None and current[0] == listing:
            return ref
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            # taken before the checks: a tarball published meanwhile changes the listing,
            # so the next task checks again
            listing = tarball_listing(self._shared_dir, name)
            info = await self._inspect(ref)
            newest = next(iter(tarballs(self._shared_dir, name)), None)
            if newest is None:
                if info is None:
                    raise UnknownEnvironment(name)
            elif info is None or newest.timestamp > image_timestamp(info):
                replaced = info
                info = await load_tarball(self._docker, newest)
                if replaced is not None and replaced.get("Id") != info.get("Id"):
                    self._replaced[replaced["Id"]] = name
                    await self.prune_replaced()
            self._current[name] = (listing, info.get("Id", ""))
        return ref

    def has_replaced(self) -> bool:
        """Whether an image a load replaced is still waiting to be pruned."""
        return bool(self._replaced)

    async def prune_replaced(self) -> None:
        """Prune the images loads replaced; those a container still uses wait for the next call."""
        for image_id, name in list(self._replaced.items()):
            done, _ = await prune_image(self._docker, name, image_id)
            if done:
                del self._replaced[image_id]

    def image_id(self, name: str) -> str | None:
        """The id of ``hakuriver/NAME:base`` as of the last :meth:`ensure` (None: not known)."""
        current = self._current.get(name)
        return current[1] if current and current[1] else None

    def forget(self, name: str) -> None:
        """Check the environment's image again on the next :meth:`ensure`."""
        self._current.pop(name, None)

    async def _inspect(self, ref: str) -> dict | None:
        import aiodocker

        try:
            return await self._docker.images.inspect(ref)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise


async def load_tarball(docker: "aiodocker.Docker", tarball: Tarball) -> dict:
    """Load a tarball into Docker (streamed from disk) and stamp the loaded image.

    Returns the loaded image's inspect data. A lost connection to Docker is raised as it
    is (the caller may load again once Docker answers); any other failure is an
    :class:`ImageLoadFailed`.
    """
    import aiodocker

    ref = image_ref(tarball.name)
    try:
        with open(tarball.path, "rb") as data:
            await docker.images.import_image(data=data)
        loaded = await docker.images.inspect(ref)
    except (aiodocker.DockerError, OSError) as exc:
        if connection_lost(exc):
            raise
        raise ImageLoadFailed(f"cannot load {tarball.path}: {exc}") from None
    await docker.images.tag(ref, f"hakuriver/{tarball.name}", tag=f"tarball-{tarball.timestamp}")
    return loaded
