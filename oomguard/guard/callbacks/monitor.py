"""MemoryMonitorCallback: per-step allocator figures to the journal and the trainer's loggers.

Per step it reads only the allocator's figures (one ``memory_stats`` read, device/stats.py): the
growth detector and the pressure save need every step's peak. NVML's device-wide figure and the
host RSS (a driver call and a /proc read) are read only for a sample that is journaled (the first
``dense_steps``, every ``sample_every``-th, anything notable) or logged: off the hot path (issue 17
item 3). The error record reads all of them afresh at the failure (``device.memory_snapshot``).

Between journaled samples the steps are not lost to the supervisor's grow-back watch: a journaled CUDA sample
carries ``window_peak``, the highest step peak since the previous journaled one (this step's included), taken
from the per-step allocator read already made (no extra CUDA call, no device sync).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path

import torch
from transformers import TrainerCallback

from oomguard.guard.callbacks.memory import GIB, Growth, MemorySample, detect_growth, sample_from_stats
from oomguard.guard.device import stats as device
from oomguard.guard.writer import EventWriter

__all__ = ["MemoryMonitorCallback"]


class MemoryMonitorCallback(TrainerCallback):
    """Samples memory every optimizer step; journals every step for the first ``dense_steps``,
    then every ``sample_every`` steps, and always when something notable happens (allocator
    retries or OOMs rose, growth appears or ends). On CPU it still reports host RSS.
    """

    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0, cap_bytes: int | None = None,
                 sample_every: int = 10, dense_steps: int = 10, window: int = 20,
                 min_slope: float = 2**20):
        if sample_every < 1:
            raise ValueError(f"sample_every={sample_every} must be >= 1 (steps between journal samples)")
        self.journal = EventWriter(run_dir, rank)
        self.cap_bytes = cap_bytes
        self.sample_every = sample_every
        self.dense_steps = dense_steps
        self.window = window
        self.min_slope = min_slope  # bytes/step
        self.samples: deque[MemorySample] = deque(maxlen=window)
        self.latest: MemorySample | None = None
        self._previous: MemorySample | None = None
        self.growth: Growth | None = None
        self.window_peak = 0  # bytes: the highest step peak since the last journaled sample (CUDA only)

    # -- trainer events -------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if not device.cuda_available():
            device.warn_no_cuda("memory monitor (allocator stats)")
        elif self.cap_bytes is None:
            self.cap_bytes = device.device_total()

    def on_step_begin(self, args, state, control, **kwargs):
        if device.cuda_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()  # so ``peak`` is this step's

    def on_step_end(self, args, state, control, **kwargs):
        sample = self.take(state.global_step)
        growth = detect_growth(self.samples, cap=self.cap_bytes, window=self.window, min_slope=self.min_slope)
        notable = self._notable(sample, growth)
        if growth is not None and self.growth is None:
            self.journal.emit("memory_growth", step=sample.step, slope_bytes_per_step=growth.slope,
                              level=growth.level, cap=growth.cap, projected_step=growth.projected_step)
        self.growth = growth
        if sample.cuda:
            self.window_peak = max(self.window_peak, sample.peak)
        if notable or self._due(sample.step):
            sample = self._with_device_and_host(sample)
            window = {"window_peak": self.window_peak} if sample.cuda else {}
            self.journal.emit("memory", step=sample.step, **sample.to_fields(), **window)
            self.window_peak = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            self.add_log_fields(logs)

    def add_log_fields(self, logs: dict) -> None:
        """The latest sample's ``oomguard/*`` figures into ``logs`` (the trackers' callback calls this
        before the ``report_to`` integrations read the dict; this callback's own on_log runs after them)."""
        if self.latest is None:
            return
        s = self.latest
        if s.reserved:
            logs["oomguard/allocated_gib"] = round(s.allocated / GIB, 3)
            logs["oomguard/reserved_gib"] = round(s.reserved / GIB, 3)
            logs["oomguard/step_peak_gib"] = round(s.peak / GIB, 3)
            logs["oomguard/fragmentation_gib"] = round(s.fragmentation / GIB, 3)  # inactive_split
            logs["oomguard/cache_slack_gib"] = round(s.slack / GIB, 3)
            logs["oomguard/alloc_retries"] = s.alloc_retries
        host_rss = s.host_rss if s.host_rss is not None else device.host_rss()  # read at log time
        logs["oomguard/host_rss_gib"] = round(host_rss / GIB, 3)
        if self.growth is not None:
            logs["oomguard/growth_mib_per_step"] = round(self.growth.slope / 2**20, 3)

    # -- helpers --------------------------------------------------------------------
    def take(self, step: int) -> MemorySample:
        """Read the allocator's current figures, remember them, and return the sample."""
        sample = sample_from_stats(step, device.memory_stats())
        if sample.reserved or not device.cuda_available():
            self.samples.append(sample)
        self._previous, self.latest = self.latest, sample
        return sample

    def _with_device_and_host(self, sample: MemorySample) -> MemorySample:
        """``sample`` with NVML's device-wide figure and the host RSS, read now; it becomes the latest."""
        full = dataclasses.replace(sample, device_used=device.nvml_used(), host_rss=device.host_rss())
        if self.latest is sample:
            self.latest = full
        return full

    def _due(self, step: int) -> bool:
        return step <= self.dense_steps or step % self.sample_every == 0

    def _notable(self, sample: MemorySample, growth: Growth | None) -> bool:
        prev = self._previous
        if prev is not None and (sample.alloc_retries > prev.alloc_retries or sample.ooms > prev.ooms):
            return True
        return (growth is None) != (self.growth is None)
