"""A Docker API proxy for tests: take Docker away from a runner without touching the real engine.

A unix socket that forwards every connection, byte for byte, to the real engine's
socket. A test can stop it (the listener and every open connection close, as when the
daemon goes away: a followed log and a waiting request break in the middle), start it
again, or hold the requests whose first line names a path (a Docker that stalls on
them) until it releases them. The real engine is shared with other tests and is never
stopped.

It runs on its own event loop in a thread, so both plain and asyncio tests can drive
it and the code under test (a runner process, an executor on the test's loop) talks to
it as it would to Docker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from pathlib import Path

UPSTREAM = "/var/run/docker.sock"


class DockerProxy:
    def __init__(self, upstream: str = UPSTREAM) -> None:
        self.upstream = upstream
        # a short path: a unix socket's path is limited to 107 bytes
        self._directory = tempfile.mkdtemp(prefix="hk-docker-proxy-")
        self.path = Path(self._directory) / "docker.sock"
        self.held = threading.Event()   # set once a request is being held
        self.requests: list[bytes] = []  # the first line of every request seen
        self._hold_marker: bytes | None = None
        self._release = None             # asyncio.Event on the proxy's loop
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="docker-proxy", daemon=True)
        self._thread.start()
        self._call(self._make_release_event())

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    # -- control, from any thread ------------------------------------------------------

    def start(self) -> "DockerProxy":
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Close the listener and every connection; the socket file goes, as with a stopped daemon."""
        self._call(self._stop())

    def hold(self, marker: str) -> None:
        """Hold each request whose first line contains ``marker`` until :meth:`release`."""
        self.held.clear()
        self._hold_marker = marker.encode()
        self._call(self._set_release(False))

    def release(self) -> None:
        self._hold_marker = None
        self._call(self._set_release(True))

    def close(self) -> None:
        self.stop()
        self._call(self._cancel_connections())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    # -- on the proxy's loop -----------------------------------------------------------

    async def _make_release_event(self) -> None:
        self._release = asyncio.Event()
        self._release.set()

    async def _set_release(self, released: bool) -> None:
        if released:
            self._release.set()
        else:
            self._release.clear()

    async def _start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if self.path.exists():
            os.unlink(self.path)

    async def _cancel_connections(self) -> None:
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            engine_reader, engine_writer = await asyncio.open_unix_connection(self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, engine_writer}
        try:
            await asyncio.gather(self._pump(client_reader, engine_writer, requests=True),
                                 self._pump(engine_reader, client_writer, requests=False))
        except (ConnectionError, OSError):
            pass
        finally:
            for writer in (client_writer, engine_writer):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: bool) -> None:
        while data := await reader.read(65536):
            if requests and _is_request(data):
                first_line = data.split(b"\r\n", 1)[0]
                self.requests.append(first_line)
                if self._hold_marker is not None and self._hold_marker in first_line:
                    self.held.set()
                    await self._release.wait()
                    if reader.at_eof() or reader.exception() is not None:
                        return   # the client gave up on it meanwhile: Docker never sees it
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def _is_request(data: bytes) -> bool:
    return data.split(b" ", 1)[0] in (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE")
