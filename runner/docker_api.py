"""What the runner needs from the Docker API beyond aiodocker's public calls.

Three things, each kept here so the rest of the runner never reaches into aiodocker's
private internals:

* :func:`ping`: whether the engine answers at all. It is a plain socket request, so
  it can be asked synchronously (the runner asks it when it decides whether to take a
  container task) and it needs no client object (a machine whose Docker starts later
  has none yet).
* :func:`raw`: a request through the client's public ``session``, for the two calls
  aiodocker has no public form of: a container's log as bytes with its two streams
  apart (aiodocker decodes it to text and merges the streams), and a stat of a path
  in a container (HEAD on the archive endpoint).
* :func:`connection_lost`: whether an error means "Docker went away" (the daemon
  restarted, its socket was cut) rather than "Docker answered no". After a lost
  connection the work is done again once Docker answers (a container survives its
  engine's API going away); an answer is final.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

if TYPE_CHECKING:
    import aiodocker
    import aiohttp

DEFAULT_SOCKETS = ("/run/docker.sock", "/var/run/docker.sock")
PING_TIMEOUT_S = 0.5
CANNOT_CONNECT = 900   # the status aiodocker gives a DockerError when it could not connect


def resolve_url(url: str) -> str:
    """The engine's URL: ``url``, else ``$DOCKER_HOST``, else the first default socket that exists."""
    url = url or os.environ.get("DOCKER_HOST", "")
    if url:
        return url
    path = next((p for p in DEFAULT_SOCKETS if os.path.exists(p)), DEFAULT_SOCKETS[-1])
    return f"unix://{path}"


def ping(url: str) -> bool:
    """GET /_ping on the engine (unix socket or tcp), waiting at most ``PING_TIMEOUT_S``."""
    url = resolve_url(url)
    try:
        if url.startswith(("tcp://", "http://")):
            host, _, port = url.split("://", 1)[1].rstrip("/").partition(":")
            sock = socket.create_connection((host, int(port or 2375)), timeout=PING_TIMEOUT_S)
        elif url.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(PING_TIMEOUT_S)
            try:
                sock.connect(url[len("unix://"):])
            except OSError:
                sock.close()
                raise
        else:
            return False
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
        return reply.startswith(b"HTTP/1.") and reply.split(b" ", 2)[1:2] == [b"200"]
    except (OSError, ValueError):
        return False


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to Docker broke (not that Docker refused something)."""
    import aiodocker
    import aiohttp

    if isinstance(exc, aiodocker.DockerError):
        return exc.status == CANNOT_CONNECT
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError))


@asynccontextmanager
async def raw(docker: "aiodocker.Docker", method: str, path: str,
              params: dict[str, str] | None = None) -> AsyncIterator["aiohttp.ClientResponse"]:
    """A request to the engine's unversioned API (its current version) without a time limit.

    An HTTP error status becomes a ``DockerError`` with that status, as aiodocker's own calls
    do; a HEAD reply has no body, so its message is only the status.
    """
    import aiodocker
    import aiohttp

    url = f"{docker.docker_host}/{path}"
    try:
        response = await docker.session.request(method, url, params=params, timeout=aiohttp.ClientTimeout())
    except aiohttp.ClientConnectionError as exc:
        raise aiodocker.DockerError(CANNOT_CONNECT, f"cannot connect to Docker: {exc}") from None
    try:
        if response.status >= 400:
            text = "" if method == "HEAD" else (await response.text()).strip()
            try:
                text = json.loads(text)["message"]
            except (ValueError, TypeError, KeyError):
                pass   # not Docker's JSON error body: the text as it is
            raise aiodocker.DockerError(response.status, text or f"HTTP {response.status}")
        yield response
    finally:
        response.release()
