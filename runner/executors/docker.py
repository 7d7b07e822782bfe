"""The ``docker`` executor: a task as a container, through the Docker API (aiodocker).

The container runs ``hakuriver/<container>:base`` (synced from shared storage first,
see :mod:`runner.images`) with the task's command as an argument vector, its CPU and
memory limits, ``/shared`` and ``/local_temp`` bound in, and labels that name the task
and node so a restarted runner can find it again.

Output: the container logs through Docker's ``local`` log driver (the ``json-file``
driver is not binary-safe: it rewrites bytes that are not UTF-8). A follower reads the
multiplexed log stream and appends each frame, in pieces of at most 64 KiB, to the
task's stdout or stderr file. Resuming after a runner restart is exact without any
state beyond the files: the follower replays the container's log from its start and
skips, per stream, the bytes the file already holds beyond what it held when the task
started (``stdout_base``/``stderr_base`` in the handle). The log driver keeps up to
``LOG_MAX_FILES`` x ``LOG_MAX_SIZE`` of output per container; a task that printed more
than that before the runner restarted cannot be resumed exactly (its live output is
never affected). Two Docker behaviours shape this: the engine passes a running
container's output to its log a line at a time (or 16 KiB without a newline), so a
partial last line shows once it is finished or the task ends; and a followed log
may end a few frames early when the container exits, so :meth:`DockerExecutor.wait`
makes a second, non-following pass (the same skip rule makes it copy only what is missing).

A missing command: the container's PID 1 is tini (``Init``) so that SIGTERM reaches
the task; tini would report a missing command only as exit code 127, so the command
is looked up in the created container before it starts and a miss is a StartFailed.
Found commands are remembered per image id, so a steady stream of tasks costs no
lookups (see :meth:`DockerExecutor._command_exists`).

``--rm`` semantics: the container is not auto-removed (its exit code, OOM flag and log
must outlive it until :meth:`wait` has read them); :meth:`destroy` removes it, and the
runner calls it once the task has ended.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hakuriver.config import Config
from hakuriver.messages import Task
from runner.executors.base import Executor, Handle, Outcome, RunSpec, StartFailed, TaskRejected
from runner.policy import refusal
from runner.images import ImageLoadFailed, ImageSync, UnknownEnvironment, check_environment_name

if TYPE_CHECKING:
    import aiodocker

SHARED_MOUNT = "/shared"
LOCAL_TEMP_MOUNT = "/local_temp"
PIECE_BYTES = 64 * 1024
LOG_MAX_SIZE = "256m"
LOG_MAX_FILES = "4"
TASK_LABEL = "hakuriver.task_id"
NODE_LABEL = "hakuriver.node"
_FRAME_HEADER = struct.Struct(">BxxxL")   # stream (1 stdout, 2 stderr), payload length
_DEFAULT_SOCKETS = ("/run/docker.sock", "/var/run/docker.sock")
FOUND_COMMANDS_MAX = 1024


def container_name(task_id: int) -> str:
    return f"hakuriver-task-{task_id}"


class DockerExecutor(Executor):
    name = "docker"

    def __init__(self, config: Config) -> None:
        self._config = config
        self._docker: aiodocker.Docker | None = None
        self._images: ImageSync | None = None
        self._followers: dict[int, asyncio.Task[None]] = {}
        self._found_commands: dict[tuple[str, str], bool] = {}   # (image id, command), see _command_exists

    # -- availability ---------------------------------------------------------------

    @classmethod
    def available(cls) -> bool:
        """Whether the Docker socket answers a ping (a local connect; well under a second)."""
        return _ping(os.environ.get("DOCKER_HOST", ""))

    def is_reachable(self) -> bool:
        """Like :meth:`available`, for the URL in this executor's config."""
        return _ping(self._config.docker.url or os.environ.get("DOCKER_HOST", ""))

    @property
    def docker(self) -> "aiodocker.Docker":
        if self._docker is None:
            import aiodocker

            self._docker = aiodocker.Docker(url=self._config.docker.url or None)
            self._images = ImageSync(self._docker, self._config.paths.shared_dir)
        return self._docker

    async def close(self) -> None:
        for follower in self._followers.values():
            follower.cancel()
        self._followers.clear()
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    # -- the executor interface -------------------------------------------------------

    async def start(self, task: Task, spec: RunSpec) -> Handle:
        import aiodocker

        image = await self._image_for(task)
        body = self._container_config(task, spec, image)
        name = container_name(task.task_id)
        try:
            container = await self.docker.containers.create(body, name=name)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                # The image went away since it was last found current (removed by hand):
                # check it again, which loads its tarball if there is one.
                assert self._images is not None
                self._images.forget(self._environment(task))
                body = self._container_config(task, spec, await self._image_for(task))
            elif exc.status == 409:
                # A container of this task from a start whose handle was never stored.
                await self._remove(name)
            else:
                raise StartFailed(f"cannot create container: {exc.message}") from None
            try:
                container = await self.docker.containers.create(body, name=name)
            except aiodocker.DockerError as exc:
                raise StartFailed(f"cannot create container: {exc.message}") from None
        stdout_path, stderr_path = Path(spec.stdout_path), Path(spec.stderr_path)
        for path in (stdout_path, stderr_path):
            path.touch()   # the output files exist from the start, as with a process
        handle = Handle(task.task_id, self.name, {
            "container_id": container.id,
            "container_name": name,
            "image": image,
            "stdout_path": str(stdout_path),
            "stderr_path": str(stderr_path),
            "stdout_base": _size(stdout_path),
            "stderr_base": _size(stderr_path),
            "memory": task.memory,
        })
        try:
            if not await self._command_exists(task, container.id):
                raise StartFailed(f"command not found: {task.command}")
            await container.start()
        except aiodocker.DockerError as exc:
            await self._remove(container.id)
            raise StartFailed(_start_failure(task, exc.message)) from None
        except StartFailed:
            await self._remove(container.id)
            raise
        self._follow(handle)
        return handle

    async def wait(self, handle: Handle) -> Outcome:
        import aiodocker

        container = self.docker.containers.container(handle.data["container_id"])
        try:
            ended = await container.wait(timeout=None)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
            self._forget(handle.task_id)
            return Outcome(exit_code=None, message="its container was removed by someone else")
        if handle.task_id not in self._followers:
            self._follow(handle)
        follower = self._followers[handle.task_id]
        try:
            await follower
        finally:
            self._followers.pop(handle.task_id, None)
        # Docker (20.10 at least) may end a followed log stream while the last frames of
        # an exited container are still on their way to the log; once the container is
        # exited its log is complete, and a second pass copies whatever the follower missed.
        await self._copy_log(handle, follow=False)
        if "memory" in handle.data and not handle.data["memory"]:
            # Without a memory limit there is no OOM flag to read (killed_oom means the
            # limit being hit); the wait reply has the rest, one API call less per task.
            return Outcome(exit_code=ended.get("StatusCode"), message=(ended.get("Error") or {}).get("Message") or "")
        state = (await container.show())["State"]
        oom = bool(state.get("OOMKilled"))
        message = "memory limit reached" if oom else state.get("Error", "")
        return Outcome(exit_code=state.get("ExitCode"), oom=oom, message=message)

    async def stop(self, handle: Handle, grace: float) -> None:
        import aiodocker

        container = self.docker.containers.container(handle.data["container_id"])
        try:
            # Docker sends SIGTERM (to tini, which passes it to the task), waits t seconds, then SIGKILLs.
            await container.stop(t=max(0, math.ceil(grace)))
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 304):
                raise

    async def destroy(self, handle: Handle) -> None:
        self._forget(handle.task_id)
        await self._remove(handle.data.get("container_id") or container_name(handle.task_id))

    async def inspect(self, handle: Handle) -> dict[str, Any]:
        import aiodocker

        info = dict(handle.data)
        try:
            state = (await self.docker.containers.container(handle.data["container_id"]).show())["State"]
        except aiodocker.DockerError as exc:
            info["state"] = "gone" if exc.status == 404 else f"unknown: {exc.message}"
            return info
        info.update(state=state.get("Status"), exit_code=state.get("ExitCode"),
                    oom_killed=state.get("OOMKilled"), pid=state.get("Pid"))
        return info

    async def recover(self, handle: Handle, spec: RunSpec) -> Handle | None:
        """Adopt the task's container: running or ended, its log is followed from where the files stop."""
        import aiodocker

        container_id = handle.data.get("container_id")
        info = None
        if container_id:
            try:
                info = await self.docker.containers.container(container_id).show()
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
        if info is None:
            filters = {"label": [f"{TASK_LABEL}={handle.task_id}"]}
            found = await self.docker.containers.list(all=True, filters=filters)
            if not found:
                return None
            info = await found[0].show()
        data = dict(handle.data)
        data["container_id"] = info["Id"]
        data.setdefault("container_name", container_name(handle.task_id))
        data.setdefault("stdout_path", str(spec.stdout_path))
        data.setdefault("stderr_path", str(spec.stderr_path))
        # Without a recorded base the files held nothing of this task when it started.
        data.setdefault("stdout_base", 0)
        data.setdefault("stderr_base", 0)
        recovered = Handle(handle.task_id, self.name, data, list(handle.unenforced))
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
        self._check_policy(task)
        _ = self.docker  # creates the image sync with the client
        assert self._images is not None
        try:
            return await self._images.ensure(name)
        except UnknownEnvironment as exc:
            raise TaskRejected(str(exc)) from None
        except ImageLoadFailed as exc:
            raise StartFailed(str(exc)) from None

    async def _command_exists(self, task: Task, container_id: str) -> bool:
        """:func:`_command_exists`, remembering commands found in an image.

        The lookup costs a container inspect and a request per PATH entry. A command
        looked up on the image's PATH alone (no ``/`` in it, no PATH and no mounts from
        the task) depends on the image only, and an image id names fixed content, so a
        found command stays found. Misses are not remembered.
        """
        assert self._images is not None
        image_id = self._images.image_id(self._environment(task))
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

    def _check_policy(self, task: Task) -> None:
        reason = refusal(task, self._config.node)
        if reason is not None:
            raise TaskRejected(reason)

    def _container_config(self, task: Task, spec: RunSpec, image: str) -> dict[str, Any]:
        binds = []
        if spec.shared_dir:
            binds.append(f"{spec.shared_dir}:{SHARED_MOUNT}")
        if spec.local_temp_dir:
            binds.append(f"{spec.local_temp_dir}:{LOCAL_TEMP_MOUNT}")
        binds += [f"{m.host_path}:{m.container_path}:{'ro' if m.read_only else 'rw'}" for m in task.mounts]
        host_config: dict[str, Any] = {
            "Binds": binds,
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
        follower = asyncio.create_task(self._copy_log(handle), name=f"docker-log-{handle.task_id}")
        self._followers[handle.task_id] = follower

    async def _copy_log(self, handle: Handle, follow: bool = True) -> None:
        """Append the container's output to the task's files, from where they stop."""
        data = handle.data
        paths = {1: Path(data["stdout_path"]), 2: Path(data["stderr_path"])}
        skip = {1: max(0, _size(paths[1]) - data["stdout_base"]),
                2: max(0, _size(paths[2]) - data["stderr_base"])}
        params = {"follow": follow, "stdout": True, "stderr": True}
        with open(paths[1], "ab", buffering=0) as out, open(paths[2], "ab", buffering=0) as err:
            files = {1: out, 2: err}
            async with self.docker._query(f"containers/{data['container_id']}/logs",
                                          params=params, timeout=None) as response:
                # aiodocker's own log reader decodes to str and merges the streams; the
                # frames are read here so bytes stay bytes and each lands in its file.
                content = response.content
                while True:
                    try:
                        header = await content.readexactly(_FRAME_HEADER.size)
                    except asyncio.IncompleteReadError:
                        return
                    stream, remaining = _FRAME_HEADER.unpack(header)
                    while remaining:
                        piece = await content.readexactly(min(remaining, PIECE_BYTES))
                        remaining -= len(piece)
                        if stream not in files:
                            continue
                        if skip[stream]:
                            dropped = min(skip[stream], len(piece))
                            skip[stream] -= dropped
                            piece = piece[dropped:]
                        if piece:
                            files[stream].write(piece)

    async def _remove(self, container: str) -> None:
        import aiodocker

        try:
            await self.docker.containers.container(container).delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 409):   # gone, or its removal is already under way
                raise


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
    # aiodocker has no stat call, and its error handling expects a JSON body that a
    # HEAD reply cannot carry, so the request goes through its session directly.
    url = docker._canonicalize_url(f"containers/{container_id}/archive")
    for candidate in candidates:
        async with docker.session.head(url, params={"path": candidate}) as response:
            if response.status == 200:
                return True
            if response.status != 404:
                raise aiodocker.DockerError(response.status, f"cannot look up {candidate} in the container")
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _start_failure(task: Task, docker_message: str) -> str:
    lowered = docker_message.lower()
    if "executable file not found" in lowered or "no such file or directory" in lowered:
        return f"command not found: {task.command} ({docker_message.strip()})"
    if "permission denied" in lowered:
        return f"permission denied: {task.command} ({docker_message.strip()})"
    return f"cannot start container: {docker_message.strip()}"


def _ping(url: str) -> bool:
    """GET /_ping on the Docker socket (unix or tcp), with a short timeout."""
    try:
        if url.startswith("tcp://") or url.startswith("http://"):
            host, _, port = url.split("://", 1)[1].rstrip("/").partition(":")
            sock = socket.create_connection((host, int(port or 2375)), timeout=1.0)
        else:
            path = url[len("unix://"):] if url.startswith("unix://") else None
            path = path or next((p for p in _DEFAULT_SOCKETS if os.path.exists(p)), None)
            if path is None:
                return False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(1.0)
            sock.connect(path)
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
        return reply.startswith(b"HTTP/1.") and reply.split(b" ", 2)[1:2] == [b"200"]
    except OSError:
        return False
