"""What this process can see of its accelerator: CUDA stats, NVML, host RSS; warned no-ops on CPU."""

from __future__ import annotations

import functools
import os
from typing import Any

import psutil
import torch

from oomguard.guard.notices import warn_once

__all__ = ["cuda_available", "device_total", "host_rss", "memory_snapshot", "memory_stats", "nvml_process_used",
           "nvml_used", "SNAPSHOT_KEYS", "warn_no_cuda"]

# The memory_stats() keys worth keeping in an error record (bytes or counts, as torch reports).
SNAPSHOT_KEYS = (
    "allocated_bytes.all.current",
    "allocated_bytes.all.peak",
    "reserved_bytes.all.current",
    "reserved_bytes.all.peak",
    "active_bytes.all.current",
    "inactive_split_bytes.all.current",
    "num_alloc_retries",
    "num_ooms",
)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def warn_no_cuda(feature: str) -> None:
    """Warn once per run that ``feature`` does nothing on this machine, naming the oomguard line that asked."""
    warn_once(f"no_cuda:{feature}", f"oomguard: {feature} needs CUDA and none is available; it is a no-op here "
              "(host memory is still tracked)", stacklevel=2)


def memory_stats() -> dict[str, Any]:
    """The ``SNAPSHOT_KEYS`` of ``torch.cuda.memory_stats()`` (the figures oomguard reads) for the current
    device, or {} without CUDA. Read from the nested dict: ``memory_stats`` flattens and sorts its
    ~150 entries in Python on every call, and the monitor and the cache clearer read once per step."""
    if not cuda_available() or not torch.cuda.is_initialized():
        return {}
    nested = torch.cuda.memory_stats_as_nested_dict()
    out: dict[str, Any] = {}
    for key in SNAPSHOT_KEYS:
        node: Any = nested
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[key] = node
    return out


def host_rss() -> int:
    """Resident set size of this process, bytes."""
    return psutil.Process(os.getpid()).memory_info().rss


def device_total() -> int | None:
    """Total memory of the current CUDA device, bytes; None without CUDA."""
    if not cuda_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


@functools.lru_cache(maxsize=None)
def _nvml_handle(device: int) -> Any:
    import pynvml  # optional: nvidia-ml-py

    pynvml.nvmlInit()
    # NVML numbers devices physically, torch after CUDA_VISIBLE_DEVICES: match by UUID.
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return pynvml.nvmlDeviceGetHandleByUUID(uuid)


def nvml_used(device: int | None = None) -> int | None:
    """Device-wide used memory (all processes), bytes; None when NVML is unavailable."""
    if not cuda_available():
        return None
    try:
        import pynvml

        handle = _nvml_handle(torch.cuda.current_device() if device is None else device)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # NVML missing, no permission, MIG: the figure is optional
        return None


def nvml_process_used(device: int | None = None) -> int | None:
    """Memory NVML charges to this process on the device (context + allocator), bytes."""
    if not cuda_available():
        return None
    try:
        import pynvml

        handle = _nvml_handle(torch.cuda.current_device() if device is None else device)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
    except Exception:
        return None
    return None


def memory_snapshot() -> dict[str, Any]:
    """The subset of allocator stats an error record carries, plus host RSS."""
    stats = memory_stats()
    snap: dict[str, Any] = {k: stats[k] for k in SNAPSHOT_KEYS if k in stats}
    snap["host_rss_bytes"] = host_rss()
    used = nvml_used()
    if used is not None:
        snap["device_used_bytes"] = used
    return snap
