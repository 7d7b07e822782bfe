#!/usr/bin/env bash
# Check GPUs for real, on a machine with an NVIDIA GPU, its driver, and Docker's NVIDIA runtime
# (the NVIDIA Container Toolkit). The tests check the logic without a GPU; this checks the real thing:
#   1. the runner's NVML inventory (--list-nodes --json: index, UUID, name, memory of each GPU);
#   2. a container task on GPU 0 runs `nvidia-smi -L` and sees only that GPU;
#   3. a host task on GPU 0 sees one CUDA device (through libcuda, which honours CUDA_VISIBLE_DEVICES),
#      and a host task that asked for no GPU sees none.
# It starts a private host and runner against the broker at HAKURIVER_TEST_BROKER_URL (default: the
# local RabbitMQ, guest/guest) and removes what it declared. Needs `pip install -e '.[test,gpu]'`.
# Usage: deploy/gpu-check.sh   (GPU_CHECK_CONTAINER=<environment>, default hakuriver-base)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
nvidia-smi -L
exec "$PYTHON" - <<'PY'
import json, os, sys, tempfile
from pathlib import Path
sys.path.insert(0, os.getcwd())
from harness.local_cluster import Cluster

container = os.environ.get("GPU_CHECK_CONTAINER", "hakuriver-base")
failures = []

def check(what, ok, shown):
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {shown}")
    if not ok:
        failures.append(what)

def output(cluster, *argv):
    result = cluster.cli("--wait", "--target", "gpu-check::0", *argv)
    task = result.stdout.decode().strip()
    return result.returncode, cluster.cli("--stdout", task).stdout.decode() if task else result.stderr.decode()

with Cluster(Path(tempfile.mkdtemp(prefix="gpu-check-")), ["gpu-check"], node={"gpus": "auto"}) as cluster:
    cluster.start()
    [node] = cluster.query("--list-nodes")["nodes"]
    gpus = node.get("gpus") or []
    check("NVML inventory", bool(gpus) and all(g["uuid"] and g["name"] for g in gpus), json.dumps(gpus, indent=1))
    code, out = output(cluster, "--container", container, "--", "nvidia-smi", "-L")
    check("container sees only GPU 0", code == 0 and len(out.strip().splitlines()) == 1
          and gpus and gpus[0]["uuid"] in out, out.strip())
    count = ("import ctypes; c = ctypes.CDLL('libcuda.so.1'); n = ctypes.c_int(); "
             "r = c.cuInit(0); r = r or c.cuDeviceGetCount(ctypes.byref(n)); print(r, n.value)")
    code, out = output(cluster, "--container", "NULL", "--", "sh", "-c",
                       f"echo $CUDA_VISIBLE_DEVICES; python3 -c \"{count}\"")
    check("host task sees one CUDA device", code == 0 and out.split()[-2:] == ["0", "1"], out.strip())
    result = cluster.cli("--wait", "--target", "gpu-check", "--container", "NULL", "--", "python3", "-c", count)
    out = cluster.cli("--stdout", result.stdout.decode().strip()).stdout.decode()
    # no visible device: cuInit answers CUDA_ERROR_NO_DEVICE (100), or 0 devices
    check("host task without GPUs sees none", out.split()[:1] == ["100"] or out.split()[-1:] == ["0"], out.strip())
print("all GPU checks passed" if not failures else f"{len(failures)} GPU check(s) failed: {', '.join(failures)}")
sys.exit(1 if failures else 0)
PY
