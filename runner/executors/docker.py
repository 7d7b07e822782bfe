"""The ``docker`` executor: a task as a container, through the Docker API (aiodocker).

The container runs ``hakuriver/<container>:base`` (synced from shared storage first,
see :mod:`runner.images`) with the task's command as an argument vector, its CPU and
memory limits, ``/shared`` and ``/local_temp`` bound in, and labels that name the task
and node so a restarted runner can find it again.

Output: the container logs through Docker's ``local`` log driver (the ``json-file``
driver is not binary-safe: it rewrites bytes that are not UTF-8). A follower reads the
multiplexed log stream and appends each frame, in pieces of at most 64 KiB, to the
task's stdout or stderr file. Resuming is exact without any state beyond the files:
the follower replays the container's log from its start and skips, per stream, the
bytes the file already holds beyond what it held when the task started
(``stdout_base``/``stderr_base`` in the handle). The same rule serves a runner restart,
a follower cut off by a lost Docker connection, and the final pass described next. The
log driver keeps up to ``LOG_MAX_FILES`` x ``LOG_MAX_SIZE`` of output per container; a
task that printed more than that before a resume cannot be resumed exactly (its live
output is never affected). Two Docker behaviours shape this: the engine passes a
running container's output to its log a line at a time (or 16 KiB without a newline),
so a partial last line shows once it is finished or the task ends; and a followed log
may end a few frames early when the container exits, so :meth:`DockerExecutor.wait`
makes a second, non-following pass (the same skip rule makes it copy only what is missing).

Docker going away (the daemon restarted, its socket cut) does not end a task: a
container outlives its engine's API. Every call that follows a task is retried once
Docker answers again (:meth:`DockerExecutor._retrying`), so the task's end and all of
its output are still read from the container; a container whose removal failed that
way is removed once Docker answers. Whether Docker answers is asked again every
``PROBE_EVERY_S`` (:meth:`DockerExecutor.available`), so a Docker that starts after the
runner is used from then on, and a runner restarted while Docker is away adopts its
containers once Docker is back (:meth:`DockerExecutor.recover`).

A kill while a task is starting (its image loading, Docker slow) cancels :meth:`start`;
whatever it created is removed and the command never runs.

A missing command: the container's PID 1 is tini (``Init``) so that SIGTERM reaches
the task; tini would report a missing command only as exit code 127, so the command
is looked up in the created container before it starts and a miss is a StartFailed.
Found commands are remembered per image id, so a steady stream of tasks costs no
lookups (see :meth:`DockerExecutor._command_exists`).

Pause and resume are Docker's own (``docker pause``: the container's cgroup freezer, its
whole tree at once); ``paused`` in the handle's data says whether it is paused. A stop
unpauses first, so a paused task ends at once; a restarted runner adopts a paused
container as paused (:meth:`DockerExecutor.recover` reads it from the container).

``--rm`` semantics: the container is not auto-removed (its exit code, OOM flag and log
must outlive it until :meth:`wait` has read them); :meth:`destroy` removes it, and the
runner calls it once the task has ended.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from hakuriver.config import Config
from hakuriver.containers import LOCAL_TEMP_MOUNT, SHARED_MOUNT
from hakuriver.messages import Task, one_line
from runner.docker_api import connection_lost, ping, raw, resolve_url
from runner.executors.base import Executor, Handle, Outcome, PauseRefused, RunSpec, StartFailed, TaskRejected
from runner.images import ImageLoadFailed, ImageSync, UnknownEnvironment, check_environment_name

if TYPE_CHECKING:
    import aiodocker

log = logging.getLogger(__name__)
T = TypeVar("T")

PIECE_BYTES = 64 * 1024
LOG_MAX_SIZE = "256m"
LOG_MAX_FILES = "4"
TASK_LABEL = "hakuriver.task_id"
NODE_LABEL = "hakuriver.node"
_FRAME_HEADER = struct.Struct(">BxxxL")   # stream (1 stdout, 2 stderr), payload length
FOUND_COMMANDS_MAX = 1024
PROBE_EVERY_S = 2.0    # how long an answer of available() stands
RETRY_EVERY_S = 0.5    # how often work waiting for Docker asks again


def container_name(task_id: int) -> str:
    return f"hakuriver-task-{task_id}"


class DockerExecutor(Executor):
    name = "docker"

    def __init__(self, config: Config) -> None:
        self._config = config
        self._url = resolve_url(config.docker.url)
        self._docker: aiodocker.Docker | None = None
        self._images: ImageSync | None = None
        self._followers: dict[int, asyncio.Task[None]] = {}
        self._removals: set[asyncio.Task[None]] = set()   # containers to remove once Docker answers
        self._found_commands: dict[tuple[str, str], bool] = {}   # (image id, command), see _command_exists
        self._reachable = False
        self._probed_at = -math.inf

    # -- availability ---------------------------------------------------------------

    def available(self) -> bool:
        """Whether Docker answers now: the one availability check of this executor.

        A ping costs a local connect; its answer stands for ``PROBE_EVERY_S`` (a lost
        connection found meanwhile counts as a "no" at once).
        """
        if time.monotonic() - self._probed_at >= PROBE_EVERY_S:
            self._note(ping(self._url))
        return self._reachable

    def _note(self, reachable: bool) -> None:
        if reachable != self._reachable:
            log.info("docker at %s is %s", self._url, "reachable" if reachable else "not reachable")
        self._reachable, self._probed_at = reachable, time.monotonic()

    async def _until_reachable(self) -> None:
        while not await asyncio.to_thread(ping, self._url):
            self._note(False)
            await asyncio.sleep(RETRY_EVERY_S)
        self._note(True)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, made again each time the connection to Docker is lost, once Docker answers."""
        while True:
            try:
                return await call()
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                log.warning("lost the connection to Docker (%s); going on once it answers", one_line(exc))
                self._note(False)
            await self._until_reachable()

    @property
    def docker(self) -> "aiodocker.Docker":
        if self._docker is None:
            import aiodocker

            self._docker = aiodocker.Docker(url=self._url)
            self._images = ImageSync(self._docker, self._config.paths.shared_dir)
        return self._docker

    @property
    def images(self) -> ImageSync:
        _ = self.docker   # creates the image sync with the client
        assert self._images is not None
        return self._images

    async def close(self) -> None:
        """Stop following and close the Docker session (containers run on; a new runner adopts them)."""
        for task in [*self._followers.values(), *self._removals]:
            task.cancel()
        if self._removals:
            log.warning("%d container(s) left to remove: Docker did not answer", len(self._removals))
        await asyncio.gather(*self._followers.values(), *self._removals, return_exceptions=True)
        self._followers.clear()
        self._removals.clear()
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    # -- the executor interface -------------------------------------------------------

    async def start(self, task: Task, spec: RunSpec) -> Handle:
        """Create and start the task's container; cancelled (a kill), it leaves nothing and runs nothing."""
        import aiodocker

        image = await self._retrying(lambda: self._image_for(task))
        name = container_name(task.task_id)
        stdout_path, stderr_path = Path(spec.stdout_path), Path(spec.stderr_path)
        for path in (stdout_path, stderr_path):
            path.touch()   # the output files exist from the start, as with a process
        handle = Handle(task.task_id, self.name, {
            "container_id": None,
            "container_name": name,
            "image": image,
            "stdout_path": str(stdout_path),
            "stderr_path": str(stderr_path),
            "stdout_base": _size(stdout_path),
            "stderr_base": _size(stderr_path),
            "memory": task.memory,
        })
        attempts = 0

        async def create_and_start() -> None:
            nonlocal attempts
            attempts += 1
            if handle.data["container_id"] is None:
                handle.data["container_id"] = await self._create(task, spec, image, name)
            container = self.docker.containers.container(handle.data["container_id"])
            if attempts > 1 and (await container.show())["State"]["Status"] != "created":
                return   # the start sent before the connection was lost went through
            if not await self._command_exists(task, handle.data["container_id"]):
                raise StartFailed(f"command not found: {task.command}")
            try:
                await container.start()
            except aiodocker.DockerError as exc:
                if connection_lost(exc):
                    raise
                raise StartFailed(_start_failure(task, exc.message)) from None

        try:
            await self._retrying(create_and_start)
        except BaseException as exc:
            # Killed while starting (cancelled), or it cannot start: nothing of it stays.
            try:
                await self._discard(handle.data["container_id"] or name)
            except Exception:
                log.exception("task %s: cannot remove its container %s", task.task_id, name)
            if isinstance(exc, aiodocker.DockerError):
                raise StartFailed(f"cannot start container: {exc.message}") from None
            raise
        self._follow(handle)
        return handle

    async def wait(self, handle: Handle) -> Outcome:
        import aiodocker

        container = self.docker.containers.container(_container_ref(handle))
        if handle.task_id not in self._followers:
            self._follow(handle)   # an adopted task's follower starts here
        try:
            ended = await self._retrying(lambda: container.wait(timeout=None))
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
            self._forget(handle.task_id)
            return Outcome(exit_code=None, message="its container is gone (removed outside HakuRiver)")
        follower = self._followers[handle.task_id]
        try:
            await follower
        finally:
            self._followers.pop(handle.task_id, None)
        # Docker (20.10 at least) may end a followed log stream while the last frames of
        # an exited container are still on their way to the log; once the container is
        # exited its log is complete, and a second pass copies whatever the follower missed.
        await self._retrying(lambda: self._copy_log(handle, follow=False))
        if "memory" in handle.data and not handle.data["memory"]:
            # Without a memory limit there is no OOM flag to read (killed_oom means the
            # limit being hit); the wait reply has the rest, one API call less per task.
            return Outcome(exit_code=ended.get("StatusCode"), message=(ended.get("Error") or {}).get("Message") or "")
        state = (await self._retrying(container.show))["State"]
        oom = bool(state.get("OOMKilled"))
        message = "memory limit reached" if oom else state.get("Error", "")
        return Outcome(exit_code=state.get("ExitCode"), oom=oom, message=message)

    async def pause(self, handle: Handle) -> str:
        await self._pause_call(handle, "pause")
        handle.data["paused"] = True
        return "docker pause"

    async def resume(self, handle: Handle) -> str:
        await self._pause_call(handle, "unpause")
        handle.data["paused"] = False
        return "docker unpause"

    async def _pause_call(self, handle: Handle, call: str) -> None:
        import aiodocker

        container = self.docker.containers.container(_container_ref(handle))
        try:
            await getattr(container, call)()
        except aiodocker.DockerError as exc:
            raise PauseRefused(f"docker {call} failed: {exc.message}") from None

    async def stop(self, handle: Handle, grace: float) -> None:
        import aiodocker

        container = self.docker.containers.container(_container_ref(handle))
        if handle.data.get("paused"):  # a paused container would hold the signals back until unpaused
            try:
                await self._retrying(container.unpause)
                handle.data["paused"] = False
            except aiodocker.DockerError as exc:
                log.warning("task %s: unpause before stop failed: %s", handle.task_id, exc.message)
        try:
            # Docker sends SIGTERM (to tini, which passes it to the task), waits t seconds, then SIGKILLs.
            await self._retrying(lambda: container.stop(t=max(0, math.ceil(grace))))
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 304):
                raise

    async def destroy(self, handle: Handle) -> None:
        self._forget(handle.task_id)
        await self._discard(_container_ref(handle))
        if self._images is not None and self._images.has_replaced():
            await self._images.prune_replaced()   # an image a container held may go now

    async def inspect(self, handle: Handle) -> dict[str, Any]:
        import aiodocker

        info = dict(handle.data)
        try:
            state = (await self.docker.containers.container(_container_ref(handle)).show())["State"]
        except aiodocker.DockerError as exc:
            info["state"] = "gone" if exc.status == 404 else f"unknown: {exc.message}"
            return info
        info.update(state=state.get("Status"), exit_code=state.get("ExitCode"),
                    oom_killed=state.get("OOMKilled"), pid=state.get("Pid"))
        return info

    async def recover(self, handle: Handle, spec: RunSpec) -> Handle | None:
        """Adopt the task's container: running or ended, its log is followed from where the files stop.

        While Docker does not answer, the task is adopted as it is: :meth:`wait` finds its
        container once Docker answers (and says so if it is gone by then). None only when
        Docker answers that there is no such container.
        """
        data = dict(handle.data)
        data.setdefault("container_id", None)
        data.setdefault("container_name", container_name(handle.task_id))
        data.setdefault("stdout_path", str(spec.stdout_path))
        data.setdefault("stderr_path", str(spec.stderr_path))
        # Without a recorded base the files held nothing of this task when it started.
        data.setdefault("stdout_base", 0)
        data.setdefault("stderr_base", 0)
        recovered = Handle(handle.task_id, self.name, data, list(handle.unenforced))
        if not await asyncio.to_thread(ping, self._url):
            self._note(False)
            log.warning("task %s: Docker does not answer; adopting its container once it does", handle.task_id)
            return recovered
        try:
            info = await self._find_container(handle)
        except Exception as exc:
            if not connection_lost(exc):
                raise
            return recovered
        if info is None:
            return None
        recovered.data["container_id"] = info["Id"]
        recovered.data["paused"] = bool(info.get("State", {}).get("Paused"))
        self._follow(recovered)
        return recovered

    # -- pieces -------------------------------------------------------------------------

    def _environment(self, task: Task) -> str:
        return task.container or self._config.docker.default_container

    async def _image_for(self, task: Task) -> str:
        name = self._environment(task)
        try:
            check_environment_name(name)
        except ValueError as exc:
            raise TaskRejected(str(exc)) from None
        try:
            return await self.images.ensure(name)
        except UnknownEnvironment as exc:
            raise TaskRejected(str(exc)) from None
        except ImageLoadFailed as exc:
            raise StartFailed(str(exc)) from None

    async def _create(self, task: Task, spec: RunSpec, image: str, name: str) -> str:
        """Create the container; the id. Handles an image removed meanwhile and a stale container."""
        import aiodocker

        body = self._container_config(task, spec, image)
        try:
            return (await self.docker.containers.create(body, name=name)).id
        except aiodocker.DockerError as exc:
            if connection_lost(exc):
                raise
            if exc.status == 404:
                # The image went away since it was last found current (removed by hand):
                # check it again, which loads its tarball if there is one.
                self.images.forget(self._environment(task))
                body = self._container_config(task, spec, await self._image_for(task))
            elif exc.status == 409:
                # A container of this task from a start whose handle was never stored, or
                # whose create reply was lost with the connection: it has not run.
                await self._remove(name)
            else:
                raise StartFailed(f"cannot create container: {exc.message}") from None
        try:
            return (await self.docker.containers.create(body, name=name)).id
        except aiodocker.DockerError as exc:
            if connection_lost(exc):
                raise
            raise StartFailed(f"cannot create container: {exc.message}") from None

    async def _find_container(self, handle: Handle) -> dict[str, Any] | None:
        """The inspect data of the task's container, by id, else by its label; None if there is none."""
        import aiodocker

        if handle.data.get("container_id"):
            try:
                return await self.docker.containers.container(handle.data["container_id"]).show()
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
        filters = {"label": [f"{TASK_LABEL}={handle.task_id}"]}
        found = await self.docker.containers.list(all=True, filters=filters)
        return await found[0].show() if found else None

    async def _command_exists(self, task: Task, container_id: str) -> bool:
        """:func:`_command_exists`, remembering commands found in an image.

        The lookup costs a container inspect and a request per PATH entry. A command
        looked up on the image's PATH alone (no ``/`` in it, no PATH and no mounts from
        the task) depends on the image only, and an image id names fixed content, so a
        found command stays found. Misses are not remembered.
        """
        image_id = self.images.image_id(self._environment(task))
        key = None
        if image_id and "/" not in task.command and "PATH" not in task.env and not task.mounts:
            key = (image_id, task.command)
            if key in self._found_commands:
                return True
        found = await _command_exists(self.docker, container_id, task.command)
        if found and key is not None:
            if len(self._found_commands) >= FOUND_COMMANDS_MAX:
                self._found_commands.pop(next(iter(self._found_commands)))   # the oldest
            self._found_commands[key] = True
        return found

    def _container_config(self, task: Task, spec: RunSpec, image: str) -> dict[str, Any]:
        binds = []
        if spec.shared_dir:
            binds.append(f"{spec.shared_dir}:{SHARED_MOUNT}")
        if spec.local_temp_dir:
            binds.append(f"{spec.local_temp_dir}:{LOCAL_TEMP_MOUNT}")
        host_config: dict[str, Any] = {
            "Binds": binds,
            # The user's mounts as "bind" mounts: unlike Binds, Docker refuses a host path
            # that does not exist instead of creating it (as root) on the node.
            "Mounts": [{"Type": "bind", "Source": m.host_path, "Target": m.container_path,
                        "ReadOnly": m.read_only} for m in task.mounts],
            "NetworkMode": self._config.docker.network,
            "Privileged": task.privileged,
            "Init": True,  # tini as PID 1: SIGTERM reaches the task, zombies are reaped
            "LogConfig": {"Type": "local", "Config": {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}},
        }
        if task.cores > 0:
            host_config["NanoCpus"] = int(task.cores * 1e9)
        if spec.cpus:
            host_config["CpusetCpus"] = ",".join(str(cpu) for cpu in spec.cpus)
        if spec.mems:
            host_config["CpusetMems"] = ",".join(str(mem) for mem in spec.mems)
        if spec.gpus:  # as `docker run --gpus device=...`: the NVIDIA runtime's hook picks them up
            host_config["DeviceRequests"] = [{"Driver": "", "Count": 0, "DeviceIDs": list(spec.gpus),
                                              "Capabilities": [["gpu"]], "Options": {}}]
        if task.memory:
            host_config["Memory"] = task.memory
            host_config["MemorySwap"] = task.memory  # no swap beyond the limit
        return {
            "Image": image,
            "Cmd": [task.command, *task.args],
            "Env": [f"{key}={value}" for key, value in self._task_env(task, spec).items()],
            "Labels": {TASK_LABEL: str(task.task_id), NODE_LABEL: self._config.node.node_name},
            "AttachStdin": False, "AttachStdout": False, "AttachStderr": False,
            "OpenStdin": False, "Tty": False,
            "HostConfig": host_config,
            **({"User": spec.container_user} if spec.container_user else {}),
        }

    @staticmethod
    def _task_env(task: Task, spec: RunSpec) -> dict[str, str]:
        # Only HAKURIVER_* and the user's own variables: the runner's environment
        # (its PATH, HOME, credentials) means nothing inside the image.
        env = {key: value for key, value in spec.env.items() if key.startswith("HAKURIVER_")}
        env.update(task.env)
        env["HAKURIVER_SHARED_DIR"] = SHARED_MOUNT
        env["HAKURIVER_LOCAL_TEMP_DIR"] = LOCAL_TEMP_MOUNT
        return env

    def _forget(self, task_id: int) -> None:
        follower = self._followers.pop(task_id, None)
        if follower is not None and not follower.done():
            follower.cancel()

    def _follow(self, handle: Handle) -> None:
        self._forget(handle.task_id)
        follower = asyncio.create_task(self._retrying(lambda: self._copy_log(handle)),
                                       name=f"docker-log-{handle.task_id}")
        self._followers[handle.task_id] = follower

    async def _copy_log(self, handle: Handle, follow: bool = True) -> None:
        """Append the container's output to the task's files, from where they stop.

        A container that is gone has nothing more to copy. A stream cut in the middle of
        a frame is a lost connection (the caller copies again once Docker answers).
        """
        import aiodocker

        data = handle.data
        paths = {1: Path(data["stdout_path"]), 2: Path(data["stderr_path"])}
        skip = {1: max(0, _size(paths[1]) - data["stdout_base"]),
                2: max(0, _size(paths[2]) - data["stderr_base"])}
        params = {"follow": "1" if follow else "0", "stdout": "1", "stderr": "1"}
        with open(paths[1], "ab", buffering=0) as out, open(paths[2], "ab", buffering=0) as err:
            files = {1: out, 2: err}
            try:
                # aiodocker's own log reader decodes to str and merges the streams; the
                # frames are read here so bytes stay bytes and each lands in its file.
                async with raw(self.docker, "GET", f"containers/{_container_ref(handle)}/logs",
                               params) as response:
                    content = response.content
                    while True:
                        try:
                            header = await content.readexactly(_FRAME_HEADER.size)
                        except asyncio.IncompleteReadError as exc:
                            if exc.partial:
                                raise ConnectionResetError("the log stream ended inside a frame") from None
                            return
                        stream, remaining = _FRAME_HEADER.unpack(header)
                        while remaining:
                            try:
                                piece = await content.readexactly(min(remaining, PIECE_BYTES))
                            except asyncio.IncompleteReadError as exc:
                                piece = exc.partial   # what came is kept; the rest is copied on the next pass
                                if stream in files and piece:
                                    _append(files[stream], piece, skip, stream)
                                raise ConnectionResetError("the log stream ended inside a frame") from None
                            remaining -= len(piece)
                            if stream in files:
                                _append(files[stream], piece, skip, stream)
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    return   # the container is gone: nothing more to copy
                raise

    async def _remove(self, container: str) -> None:
        import aiodocker

        try:
            await self.docker.containers.container(container).delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 409):   # gone, or its removal is already under way
                raise

    async def _discard(self, container: str) -> None:
        """Remove a container now, or once Docker answers again if it does not now."""
        try:
            await self._remove(container)
        except Exception as exc:
            if not connection_lost(exc):
                raise
            self._note(False)
            removal = asyncio.create_task(self._retrying(lambda: self._remove(container)),
                                          name=f"docker-remove-{container}")
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)


def _container_ref(handle: Handle) -> str:
    """The task's container as the Docker API takes it: its id, or its name before the id is known."""
    return handle.data.get("container_id") or handle.data.get("container_name") or container_name(handle.task_id)


def _append(file, piece: bytes, skip: dict[int, int], stream: int) -> None:
    """Write ``piece`` to the stream's file, less the bytes still to skip (already there)."""
    if skip[stream]:
        dropped = min(skip[stream], len(piece))
        skip[stream] -= dropped
        piece = piece[dropped:]
    if piece:
        file.write(piece)


async def _command_exists(docker: "aiodocker.Docker", container_id: str, command: str) -> bool:
    """Whether the command names a file in the created (not yet started) container.

    With ``Init`` the container's first process is tini, which starts whatever it is
    given; a missing command would only show as exit code 127 once it ran. Looking it
    up first (HEAD on the archive API: a stat, no data) turns that into a start failure.
    """
    import aiodocker

    info = await docker.containers.container(container_id).show()
    if info["Config"].get("Entrypoint"):
        return True   # the command is the entrypoint's argument, not a file to find
    if "/" in command:
        workdir = info["Config"].get("WorkingDir") or "/"
        candidates = [command if command.startswith("/") else os.path.join(workdir, command)]
    else:
        env = dict(item.partition("=")[::2] for item in info["Config"].get("Env") or [])
        search_path = env.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        candidates = [os.path.join(directory or ".", command) for directory in search_path.split(":")]
    for candidate in candidates:
        try:
            async with raw(docker, "HEAD", f"containers/{container_id}/archive", {"path": candidate}):
                return True
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _start_failure(task: Task, docker_message: str) -> str:
    lowered = docker_message.lower()
    if "could not select device driver" in lowered:
        return (f"this node's Docker has no NVIDIA runtime, so the task's GPUs cannot be given to its container "
                f"(install the NVIDIA Container Toolkit; Docker said: {docker_message.strip()})")
    if "executable file not found" in lowered or "no such file or directory" in lowered:
        return f"command not found: {task.command} ({docker_message.strip()})"
    if "permission denied" in lowered:
        return f"permission denied: {task.command} ({docker_message.strip()})"
    return f"cannot start container: {docker_message.strip()}"
