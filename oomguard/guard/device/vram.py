"""Emulate a smaller card on a big one: cap PyTorch's allocator so OOM comes where it would.

``set_per_process_memory_fraction`` caps only the caching allocator (DESIGN §6). The CUDA
context (~0.5 GiB) and bitsandbytes' paged buffers (managed memory) live outside it, so the
fraction is (limit − context − paged_reserve) / total.

``paged_reserve`` defaults to 0: paged optimizer state is managed memory that the driver
evicts to host under pressure, so on a real card of the emulated size it slows training but
does not raise OOM; reserving it would make the emulated card fail *earlier* than a real one.
Pass the optimizer-state size to emulate the pessimistic case (all pages resident).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from oomguard import protocol
from oomguard.guard.device import stats as accel
from oomguard.guard.writer import EventWriter

__all__ = ["apply_vram_limit", "DEFAULT_CONTEXT_BYTES", "measure_context", "vram_fraction"]

DEFAULT_CONTEXT_BYTES = 512 * 2**20  # CUDA context when NVML cannot measure it


def vram_fraction(limit: int, total: int, context: int, paged_reserve: int = 0) -> float:
    """The allocator fraction that makes ``total`` behave like a ``limit``-byte card. Pure."""
    usable = limit - context - paged_reserve
    if usable <= 0:
        raise ValueError(f"VRAM limit {limit / 2**30:.2f} GiB leaves nothing for tensors after the CUDA context "
                         f"({context / 2**30:.2f} GiB) and paged reserve ({paged_reserve / 2**30:.2f} GiB); "
                         "raise OOMGUARD_VRAM_LIMIT")
    return min(1.0, usable / total)


def measure_context(dev: int) -> tuple[int, str]:
    """CUDA context bytes of this process and how they were found."""
    before = accel.nvml_used(dev) if not torch.cuda.is_initialized() else None
    torch.cuda.init()
    torch.cuda.set_device(dev)
    torch.empty(1, device=f"cuda:{dev}")  # the context is created lazily, on first use
    own = accel.nvml_process_used(dev)
    if own is not None:
        return max(0, own - torch.cuda.memory_reserved(dev)), "nvml_process"
    after = accel.nvml_used(dev)
    if before is not None and after is not None and after > before:
        return after - before - torch.cuda.memory_reserved(dev), "nvml_before_after"
    return DEFAULT_CONTEXT_BYTES, "assumed"


def apply_vram_limit(limit_bytes: int | None, device: int = 0, *, paged_reserve: int = 0,
                     run_dir: str | Path | None = None, rank: int = 0) -> dict[str, Any] | None:
    """Cap the allocator before the model loads; returns what it did, or None (no limit / no CUDA).

    ``run_dir`` defaults to OOMGUARD_RUN_DIR; the numbers go to a ``vram_limit`` event.
    """
    if limit_bytes is None:
        return None
    if not accel.cuda_available():
        accel.warn_no_cuda("VRAM limit emulation")
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    context, how = measure_context(device)
    fraction = vram_fraction(limit_bytes, total, context, paged_reserve)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    done = {"limit": limit_bytes, "total": total, "context": context, "context_source": how,
            "paged_reserve": paged_reserve, "fraction": fraction, "accounted": int(fraction * total)}
    EventWriter(run_dir or os.environ.get(protocol.ENV_RUN_DIR) or None, rank).emit("vram_limit", **done)
    return done
