"""A QEMU virtual machine with systemd as PID 1 and cgroup v2, for the tests of host tasks there.

Why a VM: on every current server systemd is PID 1 and cgroups are v2, so host tasks run
as ``systemd-run`` scopes and the ``process`` executor writes v2 files; neither can run on a
machine (or in a container) where systemd is not init. The image comes from
``deploy/vm/build-image.sh`` (Debian packages plus the project's wheels); this module boots it,
runs commands in it and stops it.

How the two sides talk, all of it on this machine's loopback or local sockets:

* the guest's runner reaches the broker at ``10.0.2.100:5672``, a ``guestfwd`` of QEMU's
  user-mode network to ``127.0.0.1:5672`` (a ``socat`` per connection); ``restrict=on``
  leaves the guest no other way out;
* the host runs commands in the guest through the QEMU guest agent (``qemu-guest-agent``
  in the guest, a virtio-serial port here, JSON over a Unix socket): ``guest-exec`` with
  captured output, and ``guest-file-*`` to write files.

TCG by default: nested KVM hangs in early boot on the machines this was written on.
``HAKURIVER_VM_ACCEL=kvm`` uses KVM where it works.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shlex
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "deploy" / "vm" / "build-image.sh"
CACHE = Path(os.environ.get("HAKURIVER_VM_CACHE", "/var/cache/hakuriver-vm"))
BROKER_GUEST_ADDRESS = "10.0.2.100"  # where the guest finds the host's broker (a guestfwd)
BOOT_TIMEOUT = 300.0  # seconds; TCG on a loaded 2-core machine


class VMError(Exception):
    """The VM or its guest agent did not do what was asked."""


@dataclass
class GuestResult:
    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str = "command") -> "GuestResult":
        if self.returncode != 0:
            raise VMError(f"{what} failed in the guest (exit {self.returncode}): {self.stderr.strip()[-2000:]}")
        return self


def build_image(python: str | None = None) -> str:
    """Build the image if its inputs changed (cached otherwise); the name of the current image."""
    env = dict(os.environ)
    if python:
        env.setdefault("PYTHON", python)
    subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, env=env, stdout=subprocess.DEVNULL)
    return (CACHE / "current").read_text().strip()


def qemu_argv(name: str, workdir: Path, *, cpus: int = 2, memory_mib: int = 1024, numa_nodes: int = 2,
              broker_port: int = 5672, accel: str = "tcg") -> list[str]:
    """The QEMU command line: the image (copy-on-write, never changed), its kernel, NUMA nodes, agent."""
    # qemu64: the baseline x86-64 CPU; with "max" glibc and Python take AVX code paths, which
    # TCG emulates far more slowly than the SSE2 ones
    argv = ["qemu-system-x86_64", "-accel", accel, "-cpu", "qemu64", "-smp", str(cpus), "-m", f"{memory_mib}M",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(CACHE / f"{name}.vmlinuz"), "-initrd", str(CACHE / f"{name}.initrd"),
            "-append", "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 "
                       "systemd.show_status=0 net.ifnames=0",
            "-drive", f"file={CACHE / f'{name}.img'},format=raw,if=virtio,snapshot=on",
            "-netdev", f"user,id=net0,restrict=on,guestfwd=tcp:{BROKER_GUEST_ADDRESS}:5672-"
                       f"cmd:socat - TCP:127.0.0.1:{broker_port}",
            "-device", "virtio-net-pci,netdev=net0",
            "-chardev", f"socket,id=qga0,path={workdir / 'qga.sock'},server=on,wait=off",
            "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-serial", f"file:{workdir / 'console.log'}"]
    if numa_nodes > 1:
        # the CPUs and the memory split evenly: node N has CPUs N, N+numa_nodes, ...
        size = memory_mib // numa_nodes
        for node in range(numa_nodes):
            node_cpus = list(range(node, cpus, numa_nodes))
            argv += ["-object", f"memory-backend-ram,id=mem{node},size={size}M",
                     "-numa", f"node,nodeid={node},memdev=mem{node}"
                     + "".join(f",cpus={cpu}" for cpu in node_cpus)]
    return argv


class GuestAgent:
    """A client of the QEMU guest agent over its Unix socket (one request at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def sync(self, timeout: float) -> None:
        """Wait until the agent answers (it starts late in the guest's boot); drop stale replies."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._connect()
                token = random.randrange(1, 2**31)
                self._send({"execute": "guest-sync", "arguments": {"id": token}})
                while True:
                    reply = self._receive(min(3.0, max(0.1, deadline - time.monotonic())))
                    if reply.get("return") == token:
                        return
            except (OSError, TimeoutError, ValueError):
                self.close()
                if time.monotonic() > deadline:
                    raise VMError(f"the guest agent did not answer within {timeout:.0f} s") from None
                time.sleep(0.5)

    def call(self, command: str, timeout: float = 30.0, **arguments) -> object:
        self._connect()
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        reply = self._receive(timeout)
        if "error" in reply:
            raise VMError(f"guest agent {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def _connect(self) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.path))
            self._sock = sock

    def _send(self, message: dict) -> None:
        assert self._sock is not None
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _receive(self, timeout: float) -> dict:
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply from the guest agent")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise OSError("the guest agent closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line.lstrip(b"\xff").decode() or "{}")


class VM:
    """One booted guest: :meth:`start`, :meth:`run` commands, :meth:`write_file`, :meth:`stop`."""

    def __init__(self, name: str, *, cpus: int = 2, memory_mib: int = 1024, numa_nodes: int = 2) -> None:
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix="hakuriver-vm-"))
        accel = os.environ.get("HAKURIVER_VM_ACCEL", "tcg")
        self.argv = qemu_argv(name, self.workdir, cpus=cpus, memory_mib=memory_mib, numa_nodes=numa_nodes,
                              accel=accel)
        self.agent = GuestAgent(self.workdir / "qga.sock")
        self.process: subprocess.Popen | None = None
        self.boot_seconds: float | None = None

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def start(self, timeout: float = BOOT_TIMEOUT) -> "VM":
        """Boot and wait until the guest agent answers (systemd has reached it)."""
        started = time.monotonic()
        with open(self.workdir / "qemu.log", "wb") as log:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = started + timeout
        while not (self.workdir / "qga.sock").exists():
            self._check_running()
            if time.monotonic() > deadline:
                raise VMError("QEMU made no agent socket")
            time.sleep(0.1)
        self.agent.sync(max(1.0, deadline - time.monotonic()))
        self.boot_seconds = time.monotonic() - started
        return self

    def _check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            log = (self.workdir / "qemu.log").read_text(errors="replace")
            raise VMError(f"QEMU exited with {self.process.returncode}: {log.strip()[-2000:]}")

    def run(self, argv: list[str] | str, timeout: float = 120.0, input: bytes | None = None) -> GuestResult:
        """Run a command in the guest as root (a string goes to ``sh -c``); killed after ``timeout``."""
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        # the agent cannot kill what it started; coreutils' timeout can
        argv = ["timeout", "-s", "KILL", str(int(timeout) + 1), *argv]
        arguments = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode()
        pid = self.agent.call("guest-exec", **arguments)["pid"]
        deadline = time.monotonic() + timeout + 30
        interval = 0.05
        while True:
            status = self.agent.call("guest-exec-status", pid=pid)
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise VMError(f"guest command {shlex.join(argv)} did not end")
            time.sleep(interval)
            interval = min(interval * 2, 0.5)
        code = status.get("exitcode")
        if code is None:  # ended by a signal
            code = 128 + int(status.get("signal", 0))
        return GuestResult(code, _decode(status.get("out-data")), _decode(status.get("err-data")))

    def sh(self, script: str, timeout: float = 120.0) -> str:
        """Run a shell script in the guest; its stdout, or :class:`VMError` on a non-zero exit."""
        return self.run(script, timeout=timeout).check(script.splitlines()[0][:80]).stdout

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sh(f"mkdir -p {shlex.quote(os.path.dirname(path))}")
        handle = self.agent.call("guest-file-open", path=path, mode="w")
        try:
            self.agent.call("guest-file-write", handle=handle, **{"buf-b64": base64.b64encode(data).decode()})
        finally:
            self.agent.call("guest-file-close", handle=handle)
        self.sh(f"chmod {mode:o} {shlex.quote(path)}")

    def stop(self) -> None:
        """Power off at once: the image is copy-on-write (snapshot=on), so there is nothing to save."""
        self.agent.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _decode(data: str | None) -> str:
    return base64.b64decode(data).decode(errors="replace") if data else ""
