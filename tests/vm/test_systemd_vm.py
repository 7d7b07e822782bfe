"""Host tasks where systemd is PID 1 and cgroups are v2: a real runner in a QEMU VM.

This is the path host tasks take on every current server (``systemd-run`` scopes, cgroup v2
files), which the development machine (no systemd as init, cgroup v1) cannot show. The
guest (``deploy/vm/build-image.sh``, booted by :mod:`harness.vm`) runs ``hakuriver-runner``
as the systemd service ``hakuriver.init service --runner`` wrote; the host service and the
client run here, under a broker prefix of this module's own, and the guest's runner reaches
the broker through QEMU's ``guestfwd``. One VM boot serves the whole module.

Run them alone with ``.ci/test-vm`` (or ``.ci/test -m vm``). Needs root (the image is made
with debootstrap and chroot); the first run builds the image (a few minutes), later runs
reuse it while its inputs are unchanged.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap

import pytest

from hakuriver.admin.init import render_unit
from harness.local_cluster import Cluster, wait_until
from harness.vm import BROKER_GUEST_ADDRESS, VM, build_image

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

NODE = "vm1"
GUEST_CONFIG = "/etc/hakuriver/config.toml"
GUEST_BIN = "/opt/hakuriver/bin"
# TCG is slow and the guest shares two cores with everything else: heartbeats far apart
# and a generous offline window, so a busy moment never makes the node look dead.
TIMING = {"heartbeat_interval": 2.0, "heartbeat_timeout_factor": 30, "kill_grace": 3.0}
# Under TCG on a loaded machine a Python process in the guest starts in tens of seconds and the
# runner in minutes: every wait is generous (they end as soon as the event happens).
SLOW = 600
MiB = 1 << 20


def guest_config(prefix: str, executor: str = "auto") -> str:
    return textwrap.dedent(f"""\
        [broker]
        url = "amqp://guest:guest@{BROKER_GUEST_ADDRESS}:5672/"
        prefix = "{prefix}"

        [node]
        name = "{NODE}"
        executor = "{executor}"
        allow_root = true

        [security]
        admins = ["guest"]

        [users]
        guest = "root"   # the tests' broker user is an admin run as root, as in harness/local_cluster.py

        [paths]
        state_dir = "/var/lib/hakuriver"
        shared_dir = "/srv/hakuriver/shared"
        local_temp_dir = "/srv/hakuriver/tmp"

        [timing]
        heartbeat_interval = {TIMING["heartbeat_interval"]}
        heartbeat_timeout_factor = {TIMING["heartbeat_timeout_factor"]}
        kill_grace = {TIMING["kill_grace"]}

        [docker]
        default_container = "NULL"
        """)


@pytest.fixture(scope="module")
def vm():
    if os.geteuid() != 0:
        pytest.skip("the VM image is built with debootstrap and chroot: needs root")
    machine = VM(build_image(python=sys.executable))
    try:
        machine.start(timeout=1200)  # TCG on a machine loaded many times over: minutes
        print(f"\nVM booted in {machine.boot_seconds:.1f} s (agent answering)", file=sys.stderr)
        yield machine
    finally:
        machine.stop()


@pytest.fixture(scope="module")
def fabric(vm, tmp_path_factory):
    """The host here, the runner in the guest as its systemd service, one private prefix."""
    cluster = Cluster(tmp_path_factory.mktemp("vm-fabric"), [NODE], timing=TIMING)
    try:
        cluster.start_host()
        vm.write_file(GUEST_CONFIG, guest_config(cluster.prefix))
        vm.sh("systemctl enable --now hakuriver-runner")
        cluster.wait_online([NODE], timeout=SLOW)
        yield cluster
    finally:
        try:
            print(vm.run("journalctl -u hakuriver-runner --no-pager | tail -n 40").stdout, file=sys.stderr)
            vm.run("systemctl stop hakuriver-runner")
        finally:
            cluster.stop()


def run_task(cluster: Cluster, *args: str, timeout: float = SLOW) -> tuple[dict, str]:
    """``--wait`` one host task on the VM's node (``args`` may name ``--target NODE:N``); its final
    status and its stdout."""
    target = () if "--target" in args else ("--target", NODE)  # two --target would be two tasks
    result = cluster.cli("--wait", *target, *args, timeout=timeout)
    task_id = result.stdout.decode().split()[0]
    return cluster.task(task_id), cluster.cli_ok("--stdout", task_id)


def own_cgroup_script(body: str) -> str:
    """A Python task that knows its own cgroup directory as ``cg`` and prints JSON."""
    return ("import json, os, time\n"
            "path = open('/proc/self/cgroup').read().strip().split(':', 2)[2]\n"
            "cg = '/sys/fs/cgroup' + path\n"
            "read = lambda name: open(os.path.join(cg, name)).read().strip()\n" + textwrap.dedent(body))


def node_info(cluster: Cluster) -> dict:
    return next(n for n in cluster.query("--list-nodes")["nodes"] if n["name"] == NODE)


def guest_pids(vm: VM, marker: str) -> list[str]:
    # pgrep -f would match its own sh -c; the [x] trick keeps the pattern from matching itself
    pattern = f"[{marker[0]}]{marker[1:]}"
    return vm.run(f"pgrep -f {shlex.quote(pattern)}").stdout.split()


# ---- the machine ---------------------------------------------------------------------------

def test_the_guest_runs_systemd_as_pid_1_on_cgroup_v2(vm):
    assert vm.sh("cat /proc/1/comm").strip() == "systemd"
    assert vm.sh("stat -fc %T /sys/fs/cgroup").strip() == "cgroup2fs"
    assert vm.sh("ls /sys/devices/system/node | grep -c '^node[0-9]'").strip() == "2"


def test_the_runner_is_the_unit_hakuriver_init_wrote(vm, fabric):
    unit = vm.sh("cat /etc/systemd/system/hakuriver-runner.service")
    # the file in the image is hakuriver.init's output, unchanged
    assert unit == render_unit("runner", GUEST_CONFIG, bin_dir=GUEST_BIN)
    assert vm.sh("systemctl is-active hakuriver-runner").strip() == "active"
    main_pid = vm.sh("systemctl show -P MainPID hakuriver-runner").strip()
    assert vm.sh(f"cat /proc/{main_pid}/cgroup").strip() == "0::/system.slice/hakuriver-runner.service"
    info = node_info(fabric)
    assert info["online"] and "systemd" in info["executors"]
    assert info.get("unenforced") in (None, [])
    assert sorted(info["numa"]) == ["0", "1"] or sorted(map(str, info["numa"])) == ["0", "1"]


# ---- the systemd executor ---------------------------------------------------------------

def test_a_host_task_runs_in_a_transient_scope(fabric):
    status, out = run_task(fabric, "--", "cat", "/proc/self/cgroup")
    assert status["state"] == "completed", status
    assert out.strip().endswith(f"/{fabric.prefix}-task-{status['task_id']}.scope"), out


def test_cores_become_a_cpu_quota_that_throttles_a_busy_loop(fabric):
    script = own_cgroup_script("""\
        wall0, cpu0 = time.monotonic(), time.process_time()
        while time.monotonic() - wall0 < 4:
            pass
        ratio = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        stat = dict(line.split() for line in read('cpu.stat').splitlines())
        print(json.dumps({"cpu.max": read('cpu.max'), "ratio": ratio, "throttled": int(stat['nr_throttled'])}))
        """)
    status, out = run_task(fabric, "--cores", "0.5", "--", "python3", "-c", script)
    assert status["state"] == "completed", status
    seen = json.loads(out)
    assert seen["cpu.max"] == "50000 100000"
    assert seen["throttled"] > 0
    assert seen["ratio"] <= 0.6, seen  # half a core, plus scheduling slack


def test_memory_limit_ends_the_task_killed_oom(fabric):
    status, _ = run_task(fabric, "--memory", "64M", "--", "python3", "-c", "x = bytearray(400 * 2**20)")
    assert status["state"] == "killed_oom", status
    assert str(64 * MiB) in (status.get("message") or ""), status


@pytest.mark.parametrize("numa", ["0", "1"])
def test_a_numa_target_pins_cpus_and_memory_to_that_node(fabric, numa):
    result = fabric.cli("--wait", "--target", f"{NODE}:{numa}", "--", "grep", "-E",
                        "^(Cpus|Mems)_allowed_list", "/proc/self/status", timeout=SLOW)
    task_id = result.stdout.decode().split()[0]
    status = fabric.task(task_id)
    assert status["state"] == "completed", status
    out = fabric.cli_ok("--stdout", task_id)
    allowed = dict(line.split(":\t") for line in out.strip().splitlines())
    assert allowed == {"Cpus_allowed_list": numa, "Mems_allowed_list": numa}, out


KILL_TARGET = """\
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()  # out of the task's process group: only the scope still holds it
    while True:
        time.sleep(1)
while True:
    time.sleep(1)
"""


def test_kill_takes_the_whole_scope_down(vm, fabric):
    marker = f"hk-kill-{fabric.prefix}"
    task_id = fabric.cli_ok("--target", NODE, "--", "python3", "-c", KILL_TARGET, marker).split()[0]
    fabric.wait_state(task_id, "running", timeout=SLOW)
    wait_until(lambda: len(guest_pids(vm, marker)) == 2, SLOW, "the task and its child")
    fabric.cli_ok("--kill", task_id)
    status = fabric.wait_state(task_id, {"killed", "failed", "completed", "lost"}, timeout=SLOW)
    assert status["state"] == "killed", status
    assert guest_pids(vm, marker) == []
    unit = f"{fabric.prefix}-task-{task_id}.scope"
    assert vm.run(f"systemctl is-active {unit}").stdout.strip() in ("inactive", "failed", "unknown")
    assert vm.sh(f"systemctl list-units --all --no-legend '{unit}'").strip() == ""


LEAVES_A_CHILD = """\
import os, signal, time
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(ready_w, b"x")
    while True:
        time.sleep(1)
os.read(ready_r, 1)
print("left a child behind")
"""


def test_a_child_left_behind_by_a_finished_task_is_killed_at_once(vm, fabric):
    """Not after systemd's stop timeout (90 s), which a plain ``systemctl stop`` waits out."""
    marker = f"hk-leftover-{fabric.prefix}"
    status, out = run_task(fabric, "--", "python3", "-c", LEAVES_A_CHILD, marker)
    assert (status["state"], out) == ("completed", "left a child behind\n"), status
    assert guest_pids(vm, marker) == []
    journal = vm.sh(f"journalctl --no-pager -u {fabric.prefix}-task-{status['task_id']}.scope")
    assert "timed out" not in journal, journal


def test_a_runner_restart_while_a_task_runs_ends_it_lost(vm, fabric):
    marker = f"hk-restart-{fabric.prefix}"
    task_id = fabric.cli_ok("--target", NODE, "--", "python3", "-c", "import time; time.sleep(600)",
                             marker).split()[0]
    fabric.wait_state(task_id, "running", timeout=SLOW)
    wait_until(lambda: guest_pids(vm, marker), SLOW, "the task in the guest")
    vm.sh("systemctl restart hakuriver-runner", timeout=SLOW)
    status = fabric.wait_state(task_id, {"lost", "completed", "failed", "killed"}, timeout=SLOW)
    # README: process and systemd tasks that died with their runner end lost; whether the host
    # said so first (the stopping runner's last heartbeat) or the restarted runner, it stays lost
    assert status["state"] == "lost", status
    assert status.get("message") in (f"node {NODE} went offline",
                                     "the runner restarted and could not follow the task"), status
    assert guest_pids(vm, marker) == []
    assert vm.sh(f"systemctl list-units --all --no-legend '{fabric.prefix}-task-{task_id}.scope'").strip() == ""
    # the restarted runner takes new work
    status, out = run_task(fabric, "--", "echo", "after restart")
    assert (status["state"], out) == ("completed", "after restart\n")


# ---- the process executor, forced, writing the v2 files itself ------------------------------

@pytest.fixture
def process_executor(vm, fabric):
    def restart_with(executor: str) -> None:
        before = vm.sh("systemctl show -P InvocationID hakuriver-runner").strip()
        vm.write_file(GUEST_CONFIG, guest_config(fabric.prefix, executor))
        vm.sh("systemctl restart hakuriver-runner", timeout=SLOW)
        assert vm.sh("systemctl show -P InvocationID hakuriver-runner").strip() != before
        want_systemd = executor != "process"
        wait_until(lambda: ("systemd" in node_info(fabric)["executors"]) is want_systemd
                   and node_info(fabric)["online"], SLOW, f"runner with executor {executor}")

    restart_with("process")
    try:
        yield
    finally:
        restart_with("auto")


def test_the_forced_process_executor_writes_the_v2_files(vm, fabric, process_executor):
    script = own_cgroup_script("""\
        print(json.dumps({"path": path, "cpu.max": read('cpu.max'), "memory.max": read('memory.max'),
                          "cpuset.cpus": read('cpuset.cpus'), "cpuset.mems": read('cpuset.mems'),
                          "affinity": sorted(os.sched_getaffinity(0)),
                          "parent": open(os.path.dirname(cg) + '/cgroup.subtree_control').read().split()}))
        """)
    status, out = run_task(fabric, "--cores", "0.5", "--memory", "64M", "--target", f"{NODE}:1", "--",
                           "python3", "-c", script)
    assert status["state"] == "completed", status
    assert not status.get("unenforced"), status
    seen = json.loads(out)
    assert seen == {**seen, "path": f"/{fabric.prefix}/{status['task_id']}", "cpu.max": "50000 100000",
                    "memory.max": str(64 * MiB), "cpuset.cpus": "1", "cpuset.mems": "1", "affinity": [1]}, \
        (seen, vm.run("cat /sys/fs/cgroup/cgroup.subtree_control; journalctl -u hakuriver-runner --no-pager "
                      "| tail -n 20").stdout)
    # the group is gone with the task
    assert vm.run(f"test -e /sys/fs/cgroup/{fabric.prefix}/{status['task_id']}").returncode == 1

    status, _ = run_task(fabric, "--memory", "64M", "--", "python3", "-c", "x = bytearray(400 * 2**20)")
    assert status["state"] == "killed_oom", status


# ---- the repository's own cgroup tests, inside the guest --------------------------------------

def test_the_cgroup_tests_run_for_real_in_the_guest(vm):
    result = vm.run(f"cd /opt/hakuriver/src && {GUEST_BIN}/python -m pytest -p no:cacheprovider -v -rs "
                    "tests/test_cgroups.py tests/test_systemd_executor.py", timeout=1200)
    report = result.stdout
    assert result.returncode == 0, report[-4000:] + result.stderr[-2000:]
    # the v2 branches that are skipped on a v1 machine ran here
    for name in ("test_limits_are_written_to_the_kernel_files", "test_oom_is_counted_by_the_kernel",
                 "test_join_list_kill_and_remove", "test_available_executors_on_this_machine"):
        assert f"{name} PASSED" in report, report[-4000:]
    skipped = [line for line in report.splitlines() if line.startswith("SKIPPED")]
    # "SKIPPED [1] tests/test_cgroups.py:202: v1 only: ...": only v1 branches and the not-PID-1 checks
    reasons = [line.split(": ", 1)[1] for line in skipped]
    assert all(reason.startswith("v1 ") or reason == "systemd is PID 1 here" for reason in reasons), skipped
