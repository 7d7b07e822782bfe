"""The NVML path (``[node] gpus = "auto"``) through the real nvidia-ml-py binding, against a
stand-in ``libnvidia-ml.so.1`` built here with gcc from tests/nvml/standin.c (two GPUs with
names, UUIDs and memory) and found through ``LD_LIBRARY_PATH``, as the driver's would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.local_cluster import Cluster, wait_until

STANDIN = Path(__file__).parent / "nvml" / "standin.c"
INVENTORY = ("import json, logging, sys; logging.basicConfig(stream=sys.stderr, level=logging.INFO); "
             "from runner.gpus import Inventory; "
             "print(json.dumps([g.model_dump() for g in Inventory('auto').read()]))")


@pytest.fixture(scope="module")
def nvml_dir(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("nvml")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(where / "libnvidia-ml.so.1"), str(STANDIN)], check=True)
    return where


def _inventory(library_path: str | None):
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    if library_path:
        env["LD_LIBRARY_PATH"] = library_path
    result = subprocess.run([sys.executable, "-c", INVENTORY], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_nvml_reports_the_stand_ins_gpus(nvml_dir):
    gpus, _ = _inventory(str(nvml_dir))
    assert [(g["index"], g["name"], g["uuid"], g["memory_total"], g["memory_used"], g["utilization"], g["numa"])
            for g in gpus] == [
        (0, "Stand-in GPU A100", "GPU-00000000-1111-2222-3333-444444444444", 40 << 30, 1 << 30, 10.0, None),
        (1, "Stand-in GPU H100", "GPU-55555555-6666-7777-8888-999999999999", 80 << 30, 2 << 30, 20.0, None)]


def test_without_the_driver_library_the_node_has_no_gpus_and_says_so_once(tmp_path):
    gpus, log = _inventory(str(tmp_path))   # an empty directory: no libnvidia-ml.so.1 anywhere
    assert gpus == []
    assert log.count("NVML is not usable") == 1 and "offers no GPUs" in log


def test_list_nodes_json_shows_the_nvml_gpus_and_a_task_sees_its_gpu_by_uuid(nvml_dir, tmp_path):
    with Cluster(tmp_path, ["gpu-node"], node={"gpus": "auto"}) as cluster:
        cluster.env["LD_LIBRARY_PATH"] = str(nvml_dir)
        cluster.start()
        [node] = cluster.query("--list-nodes")["nodes"]
        assert [(g["name"], g["uuid"], g["memory_total"]) for g in node["gpus"]] == [
            ("Stand-in GPU A100", "GPU-00000000-1111-2222-3333-444444444444", 40 << 30),
            ("Stand-in GPU H100", "GPU-55555555-6666-7777-8888-999999999999", 80 << 30)]
        assert node["gpus_free"] == [0, 1]
        assert "0/2" not in cluster.cli_ok("--list-nodes") and " 2/2 " in cluster.cli_ok("--list-nodes")
        result = cluster.cli("--wait", "--target", "gpu-node::1", "--",
                             "sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES [${CUDA_DEVICE_ORDER-}] $HAKURIVER_GPUS"')
        assert result.returncode == 0, result.stderr.decode()
        out = wait_until(lambda: cluster.cli_ok("--stdout", result.stdout.decode().strip()), 10, "output")
        assert out == "GPU-55555555-6666-7777-8888-999999999999 [] 1\n"
