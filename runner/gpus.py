"""A node's GPUs: which there are (``[node] gpus``), and what a task that holds some is told.

Why it exists: GPUs are handed out whole, one task at a time (:mod:`runner.admission` counts
them); this module says which GPUs the node has and turns an allocation into what each kind
of task needs to see only its own GPUs:

- ``"auto"`` reads them through NVML (the ``nvidia-ml-py`` binding, the optional extra
  ``hakuriver[gpu]``); no binding, no driver or no GPU means no GPUs, said once in the log.
- ``"none"``: no GPUs, whatever the machine has.
- ``"0,1"``: these indices, declared by hand where NVML is not usable (only the index is known).

A host task gets ``CUDA_VISIBLE_DEVICES`` (UUIDs when known; otherwise indices, with
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` because CUDA's own order is fastest-first, not NVML's) and
a host task that holds no GPU on a GPU node gets it empty, so it cannot take GPU 0 by
accident. A container gets Docker device requests instead (:mod:`runner.executors.docker`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hakuriver.config import parse_gpu_setting
from hakuriver.messages import Gpu

log = logging.getLogger(__name__)


class Inventory:
    """The node's GPUs; :meth:`read` refreshes memory and utilisation when NVML is in use."""

    def __init__(self, setting: str = "auto"):
        parsed = parse_gpu_setting(setting)
        self._nvml = None
        if parsed == "none":
            self.gpus: list[Gpu] = []
        elif parsed == "auto":
            self._nvml = _open_nvml()
            self.gpus = _nvml_gpus(self._nvml) if self._nvml is not None else []
            if self._nvml is not None and not self.gpus:
                log.info("gpus: NVML sees no GPU; this node offers none")
        else:
            self.gpus = [Gpu(index=i) for i in sorted(parsed)]

    @property
    def indices(self) -> list[int]:
        return [gpu.index for gpu in self.gpus]

    def read(self) -> list[Gpu]:
        """The GPUs with current memory use and utilisation (as declared when NVML is not used)."""
        if self._nvml is not None and self.gpus:
            try:
                self.gpus = _nvml_gpus(self._nvml)
            except Exception as exc:  # a driver hiccup: report the last reading, keep running
                log.debug("gpus: NVML reading failed: %s", exc)
        return self.gpus

    def by_index(self, index: int) -> Gpu | None:
        return next((gpu for gpu in self.gpus if gpu.index == index), None)

    def host_env(self, allocated: list[int] | None) -> dict[str, str]:
        """What a host task is told about its GPUs (nothing on a node without GPUs)."""
        if not self.gpus:
            return {}
        gpus = [self.by_index(i) or Gpu(index=i) for i in allocated or []]
        env = {"HAKURIVER_GPUS": ",".join(str(gpu.index) for gpu in gpus)}
        if gpus and all(gpu.uuid for gpu in gpus):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu.uuid for gpu in gpus)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpu.index) for gpu in gpus)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env

    def device_ids(self, allocated: list[int] | None) -> list[str]:
        """Docker device ids of the allocated GPUs: UUIDs when known, else indices."""
        ids = []
        for index in allocated or []:
            gpu = self.by_index(index)
            ids.append(gpu.uuid if gpu is not None and gpu.uuid else str(index))
        return ids


def _open_nvml():
    try:
        import pynvml
    except ImportError:
        log.info("gpus: nvidia-ml-py is not installed (pip install 'hakuriver[gpu]'); this node offers no GPUs")
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver library, or no GPU the driver can talk to
        log.info("gpus: NVML is not usable (%s); this node offers no GPUs", exc)
        return None
    return pynvml


def _nvml_gpus(nvml) -> list[Gpu]:
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:
            utilization = 0.0
        gpus.append(Gpu(index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                        name=_text(nvml.nvmlDeviceGetName(handle)), memory_total=int(memory.total),
                        memory_used=int(memory.used), utilization=utilization, numa=_numa_of(nvml, handle)))
    return gpus


def _numa_of(nvml, handle) -> int | None:
    """The NUMA node a GPU hangs off, from its PCI address in sysfs; None when unknown."""
    try:
        bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId).lower()
    except Exception:
        return None
    # NVML writes the domain with 8 hex digits, sysfs with 4
    path = Path("/sys/bus/pci/devices") / (bus_id[-12:] if len(bus_id) > 12 else bus_id) / "numa_node"
    try:
        node = int(path.read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
