"""CacheClearerCallback: give cached blocks back where it pays, never blindly every step.

``torch.cuda.empty_cache()`` every step costs ~10 % speed (DESIGN §8) — 56 % on an 8B QLoRA
step measured on an H200 (scripts/bench_overhead.py), when an earlier version read the
allocator's normal end-of-step cache (reserved − allocated) as fragmentation and cleared after
every step. It clears after eval and save, on real fragmentation (free bytes stranded in split
blocks, ``inactive_split``) and when the allocator had to retry: cheap next to an OOM.
"""

from __future__ import annotations

import enum
import gc

import torch
from transformers import TrainerCallback

from oomguard.guard.callbacks.memory import GIB, MemorySample, sample_from_stats
from oomguard.guard.device import stats as device
from oomguard.guard.writer import EventWriter

__all__ = ["CacheClearerCallback", "clear_cache", "clear_reason", "ClearReason"]


class ClearReason(str, enum.Enum):
    EVAL = "after_eval"
    SAVE = "after_save"
    FRAGMENTATION = "fragmentation"
    ALLOC_RETRIES = "alloc_retries"


def clear_reason(prev: MemorySample | None, cur: MemorySample, *, frag_ratio: float = 0.1,
                 frag_min_bytes: int = 1 * GIB) -> str | None:
    """Why the cache should be cleared after this step, or None. Pure."""
    if prev is not None and cur.alloc_retries > prev.alloc_retries:
        return ClearReason.ALLOC_RETRIES
    if cur.fragmentation > frag_min_bytes and cur.fragmentation_ratio > frag_ratio:
        return ClearReason.FRAGMENTATION
    return None


def clear_cache() -> int:
    """gc + empty_cache; returns reserved bytes given back to the driver."""
    before = torch.cuda.memory_reserved()
    gc.collect()
    torch.cuda.empty_cache()
    return max(0, before - torch.cuda.memory_reserved())


class CacheClearerCallback(TrainerCallback):
    """``monitor``: the run's MemoryMonitorCallback (it runs first each step); the step's figures are
    then its sample, read once for both, instead of a second read of the allocator's stats."""

    def __init__(self, run_dir=None, *, rank: int = 0, frag_ratio: float = 0.1, frag_min_bytes: int = 1 * GIB,
                 monitor=None):
        self.journal = EventWriter(run_dir, rank)
        self.monitor = monitor
        self.frag_ratio = frag_ratio  # share of reserved memory
        self.frag_min_bytes = frag_min_bytes
        self.previous: MemorySample | None = None
        self.clears: list[tuple[int, str, int]] = []  # (step, reason, bytes freed)

    def _usable(self) -> bool:
        if not device.cuda_available():
            device.warn_no_cuda("cache clearer")
            return False
        return torch.cuda.is_initialized()

    def on_step_end(self, args, state, control, **kwargs):
        if not self._usable():
            return
        cur = self._sample(state.global_step)
        reason = clear_reason(self.previous, cur, frag_ratio=self.frag_ratio, frag_min_bytes=self.frag_min_bytes)
        if reason is not None:
            self.clear(state.global_step, reason)
            cur = sample_from_stats(state.global_step, device.memory_stats())
        self.previous = cur

    def _sample(self, step: int) -> MemorySample:
        latest = getattr(self.monitor, "latest", None)
        if latest is not None and latest.step == step and latest.cuda:  # the monitor's, read this step end
            return latest
        return sample_from_stats(step, device.memory_stats())

    def on_evaluate(self, args, state, control, **kwargs):
        if self._usable():
            self.clear(state.global_step, ClearReason.EVAL)

    def on_save(self, args, state, control, **kwargs):
        if self._usable():
            self.clear(state.global_step, ClearReason.SAVE)

    def clear(self, step: int, reason: str) -> int:
        freed = clear_cache()
        self.clears.append((step, reason, freed))
        self.journal.emit("cache_cleared", step=step, reason=str(getattr(reason, "value", reason)), bytes_freed=freed)
        return freed
