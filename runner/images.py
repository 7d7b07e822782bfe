"""Container environment images and their tarballs in shared storage (SPEC §10).

An environment NAME is the image ``hakuriver/NAME:base``. ``hakuriver.docker create-tar``
publishes it as ``<shared_dir>/hakuriver-containers/NAME-<timestamp>.tar`` (timestamp:
whole Unix seconds), and every runner loads the newest tarball before a task when its
own image is missing or older.

How "older" is decided: an image's age is the newest of
  * its ``hakuriver.timestamp`` label (create-tar stamps the commit with the same
    timestamp it puts in the tarball's name, so the machine that made the tarball
    never reloads it),
  * a ``hakuriver/NAME:tarball-<timestamp>`` tag (put on every image this module
    loads, so a tarball made by other tools, whose image carries no label, is
    loaded once and not on every task),
  * its ``Created`` time (an image built or imported by hand, e.g. the CI base image).
A tarball is loaded when its timestamp is greater than that age.

Only one load per environment runs at a time: other tasks for the same environment
wait for it and then use the loaded image.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiodocker

TARBALL_DIR = "hakuriver-containers"
TIMESTAMP_LABEL = "hakuriver.timestamp"
_TARBALL_TAG = re.compile(r"^tarball-(\d+)$")
# Docker repository path components: lower case, digits and separators.
_ENVIRONMENT_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")


class UnknownEnvironment(Exception):
    """No image and no tarball for this environment."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown container environment '{name}'")
        self.name = name


class ImageLoadFailed(Exception):
    """A tarball exists but Docker could not load it (corrupt, wrong content)."""


@dataclass(frozen=True)
class Tarball:
    name: str
    timestamp: int
    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def check_environment_name(name: str) -> str:
    """``name`` if Docker can use it in ``hakuriver/NAME:base``; ValueError naming it otherwise."""
    if len(name) > 100 or not _ENVIRONMENT_NAME.match(name):
        raise ValueError(f"invalid container environment name {name!r} "
                         "(use lower-case letters, digits, '.', '_' or '-')")
    return name


def image_ref(name: str) -> str:
    return f"hakuriver/{name}:base"


def tarball_dir(shared_dir: str | Path) -> Path:
    return Path(shared_dir) / TARBALL_DIR


def tarball_path(shared_dir: str | Path, name: str, timestamp: int) -> Path:
    return tarball_dir(shared_dir) / f"{name}-{timestamp}.tar"


def tarballs(shared_dir: str | Path, name: str | None = None) -> list[Tarball]:
    """Tarballs in shared storage (of one environment, or all), newest first."""
    directory = tarball_dir(shared_dir)
    if not directory.is_dir():
        return []
    pattern = re.compile(r"^(%s)-(\d+)\.tar$" % (re.escape(name) if name else r"[a-z0-9._-]+"))
    found = []
    for path in directory.iterdir():
        match = pattern.match(path.name)
        if match and path.is_file():
            found.append(Tarball(match.group(1), int(match.group(2)), path))
    return sorted(found, key=lambda tarball: tarball.timestamp, reverse=True)


def image_timestamp(info: dict) -> float:
    """The age of an image, from ``docker inspect`` data (see the module docstring)."""
    candidates = [_created_seconds(info.get("Created", ""))]
    labels = (info.get("Config") or {}).get("Labels") or {}
    if labels.get(TIMESTAMP_LABEL, "").isdigit():
        candidates.append(int(labels[TIMESTAMP_LABEL]))
    for tag in info.get("RepoTags") or []:
        match = _TARBALL_TAG.match(tag.rpartition(":")[2])
        if match:
            candidates.append(int(match.group(1)))
    return max(candidates)


def _created_seconds(created: str) -> float:
    # Docker writes nanoseconds ("2024-05-01T10:00:00.123456789Z"); Python parses micro.
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$", created)
    if not match:
        return 0.0
    base, fraction, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    stamp = datetime.fromisoformat(base + zone).timestamp()
    return stamp + (float("0." + fraction) if fraction else 0.0)


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
                info = await load_tarball(self._docker, newest, replaced=info)
            self._current[name] = (listing, info.get("Id", ""))
        return ref

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


def tarball_listing(shared_dir: str | Path, name: str) -> tuple:
    """(file name, size, mtime) of each tarball of ``name``: what :class:`ImageSync` compares."""
    pattern = re.compile(r"^%s-\d+\.tar$" % re.escape(name))
    try:
        with os.scandir(tarball_dir(shared_dir)) as entries:
            found = []
            for entry in entries:
                if pattern.match(entry.name):
                    try:
                        stat = entry.stat()
                    except OSError:
                        continue   # removed while listing
                    found.append((entry.name, stat.st_size, stat.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(found))


async def load_tarball(docker: "aiodocker.Docker", tarball: Tarball, replaced: dict | None = None) -> dict:
    """Load a tarball into Docker (streamed from disk) and stamp the loaded image.

    ``replaced`` is the inspect data of the image the tarball replaces, if any.
    Returns the loaded image's inspect data.
    """
    import aiodocker

    ref = image_ref(tarball.name)
    try:
        with open(tarball.path, "rb") as data:
            await docker.images.import_image(data=data)
        loaded = await docker.images.inspect(ref)
    except (aiodocker.DockerError, OSError) as exc:
        raise ImageLoadFailed(f"cannot load {tarball.path}: {exc}") from None
    stamp = f"tarball-{tarball.timestamp}"
    await docker.images.tag(ref, f"hakuriver/{tarball.name}", tag=stamp)
    # The replaced image's stamps are all that still names it; untag them so it can go.
    for tag in (replaced or {}).get("RepoTags") or []:
        repo, _, tag_name = tag.rpartition(":")
        if repo == f"hakuriver/{tarball.name}" and _TARBALL_TAG.match(tag_name) and tag_name != stamp:
            try:
                await docker.images.delete(tag, noprune=True)
            except aiodocker.DockerError:
                pass
    return loaded
