"""What GPU this is and when a dead child's memory is back, through NVML (never torch)."""

from __future__ import annotations

import time
from typing import Iterable

from ..policy import GpuInfo

__all__ = ["GIB", "detect_gpu", "emulated_gpu", "wait_gpu_released"]

GIB = 2**30


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library, no GPU: the supervisor runs without NVML
        return None


def detect_gpu(index: int = 0) -> GpuInfo | None:
    """The first visible GPU, or None on a machine without one."""
    nv = _nvml()
    if nv is None:
        return None
    try:
        if nv.nvmlDeviceGetCount() <= index:
            return None
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        name = nv.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        total = nv.nvmlDeviceGetMemoryInfo(handle).total / GIB
        try:
            cc = tuple(nv.nvmlDeviceGetCudaComputeCapability(handle))
        except Exception:
            cc = None
        return GpuInfo(name=name, total_gib=round(total, 1), compute_capability=cc)  # type: ignore[arg-type]
    finally:
        nv.nvmlShutdown()


def emulated_gpu(real: GpuInfo | None, limit_bytes: int) -> GpuInfo:
    """The card a VRAM cap emulates: matched by memory only (DESIGN §6)."""
    cc = real.compute_capability if real else None
    base = real.name if real else "cpu"
    return GpuInfo(name=f"{base} capped at {limit_bytes / GIB:g} GiB", total_gib=limit_bytes / GIB,
                   compute_capability=cc, emulated=True)


def _our_pids_on_gpu(nv, pids: frozenset[int]) -> set[int]:
    found: set[int] = set()
    for i in range(nv.nvmlDeviceGetCount()):
        handle = nv.nvmlDeviceGetHandleByIndex(i)
        for getter in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                found |= {p.pid for p in getter(handle)} & pids
            except Exception:
                continue
    return found


def wait_gpu_released(pids: Iterable[int], timeout_s: float, poll_s: float = 0.02) -> tuple[bool, float]:
    """Wait until none of the dead child's pids holds GPU memory. Returns (released, waited s).

    Another user's process on the same card is not ours to wait for; NVML tells them apart
    by pid. Without NVML there is nothing to wait on. Polled every ``poll_s`` (a query of the
    running processes costs ~1 ms): the next attempt starts within that of the memory's return.
    """
    nv = _nvml()
    if nv is None:
        return True, 0.0
    t0 = time.monotonic()
    pid_set = frozenset(pids)
    try:
        while _our_pids_on_gpu(nv, pid_set):
            if time.monotonic() - t0 > timeout_s:
                return False, time.monotonic() - t0
            time.sleep(poll_s)
        return True, time.monotonic() - t0
    finally:
        nv.nvmlShutdown()
