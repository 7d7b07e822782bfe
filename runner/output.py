"""Streaming a task's output files to the broker in bounded chunks.

Executors write stdout and stderr into two files; this module sends what is new
in them as :class:`~hakuriver.messages.OutputChunk` messages of at most 64 KiB,
each tagged with its byte offset, and records the offset confirmed by the broker.
At most ``window`` chunks are in flight, so a task that prints gigabytes keeps the
runner's memory flat, and a restarted runner resumes at the recorded offset.

The files are the task owner's (:func:`create_output_files`): mode 0600 and, where the runner
is root, owned by the owner's uid:gid, so another user of the node cannot read what a task
prints while it runs (the stored copy in the ledger is the owner's too).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Awaitable, Callable, Iterable

from hakuriver.messages import MAX_CHUNK_BYTES, OutputChunk
from hakuriver.topology import Topology

STREAMS = ("stdout", "stderr")

# (routing key, body, headers) -> awaits the broker's confirm
PublishChunk = Callable[[str, bytes, dict], Awaitable[None]]
# (stream, offset confirmed) -> records it durably
RecordSent = Callable[[str, int], None]


def create_output_files(paths: Iterable[Path], owner: tuple[int, int] | None) -> None:
    """Make a task's output files (kept if they exist): mode 0600, owned by ``owner`` (uid, gid) when
    given. The executors then append to them; the file keeps its owner and mode."""
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask, and a file left by an older runner too
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)


class OutputStream:
    """The output files of one task and how far each has been sent."""

    def __init__(self, task_id: int, paths: dict[str, Path], sent: dict[str, int], attempt: int = 1):
        self.task_id = task_id
        self.attempt = attempt  # a retried task's attempts each have their own output
        self.paths = paths
        self.sent = dict(sent)
        self._lock = asyncio.Lock()

    def has_news(self) -> bool:
        for stream in STREAMS:
            try:
                if os.stat(self.paths[stream]).st_size > self.sent[stream]:
                    return True
            except FileNotFoundError:
                pass
        return False

    async def flush(self, publish: PublishChunk, record: RecordSent, window: int = 16) -> None:
        """Send everything written so far. Raises if the broker fails; the offsets stay at what was confirmed."""
        async with self._lock:
            for stream in STREAMS:
                await self._flush_stream(stream, publish, record, window)

    async def _flush_stream(self, stream: str, publish: PublishChunk, record: RecordSent, window: int) -> None:
        try:
            handle = open(self.paths[stream], "rb")
        except FileNotFoundError:
            return
        key = Topology.output_key(self.task_id, stream)
        with handle:
            while True:
                handle.seek(self.sent[stream])
                batch: list[tuple[int, bytes]] = []
                offset = self.sent[stream]
                while len(batch) < window:
                    data = handle.read(MAX_CHUNK_BYTES)
                    if not data:
                        break
                    batch.append((offset, data))
                    offset += len(data)
                if not batch:
                    return
                await asyncio.gather(*(
                    publish(key, data, OutputChunk(task_id=self.task_id, stream=stream, offset=start,
                                             attempt=self.attempt).headers())
                    for start, data in batch))
                self.sent[stream] = offset
                record(stream, offset)

    def remove_files(self) -> None:
        for path in self.paths.values():
            try:
                path.unlink()
            except FileNotFoundError:
                pass
