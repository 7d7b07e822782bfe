"""Container environment names, image references and tarball names: the core's part.

Why it exists: ``hakuriver.docker`` (which makes tarballs) and the runner (which loads them)
must agree on every name; both import it from here, so neither imports the other.

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
A tarball is loaded when its timestamp is greater than that age (:mod:`runner.images`).

What the fabric loads or makes, it also prunes (:func:`prune_image`): an image that a
newer one replaced under ``hakuriver/NAME:base`` (a runner loaded a newer tarball,
``create-tar`` committed again) loses its ``hakuriver/NAME`` stamps and goes, unless a
container still uses it (the caller tries again later) or a name outside
``hakuriver/NAME`` still holds it (not ours to remove).
"""

from __future__ import annotations

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
TARBALL_TAG = re.compile(r"^tarball-(\d+)$")
# Docker repository path components: lower case, digits and separators.
_ENVIRONMENT_NAME = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")


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
        match = TARBALL_TAG.match(tag.rpartition(":")[2])
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


async def prune_image(docker: "aiodocker.Docker", name: str, image_id: str,
                      with_base: bool = False) -> tuple[bool, list[str]]:
    """Remove environment ``name``'s tags from an image, then the image if nothing else names it.

    ``hakuriver/NAME:base`` itself is removed only ``with_base`` (deleting the environment).
    Returns whether the image is done with (gone, or held by a name outside
    ``hakuriver/NAME``) and what was removed; not done means a container still uses it.
    """
    import aiodocker

    removed: list[str] = []
    repo = f"hakuriver/{name}"
    try:
        info = await docker.images.inspect(image_id)
        for tag in info.get("RepoTags") or []:
            if tag.rpartition(":")[0] == repo and (with_base or tag != image_ref(name)):
                await docker.images.delete(tag)
                removed.append(tag)
        info = await docker.images.inspect(image_id)
        if [tag for tag in info.get("RepoTags") or [] if tag != "<none>:<none>"]:
            return True, removed
        await docker.images.delete(image_id)
        removed.append(image_id)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return True, removed
        if exc.status == 409:   # a container (running or not) uses it
            return False, removed
        raise
    return True, removed
