"""Pure memory arithmetic on ``torch.cuda.memory_stats()`` dicts: samples, fragmentation, growth.

No torch import: everything here is testable with fabricated stats dicts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["detect_growth", "GIB", "Growth", "MemorySample", "project_cap_step", "rising_share", "sample_from_stats",
           "theil_sen"]

GIB = 2**30


@dataclass(frozen=True)
class MemorySample:
    """One optimizer step's allocator figures, bytes (as torch reports) and counts."""

    step: int
    allocated: int = 0
    reserved: int = 0
    active: int = 0
    peak: int = 0  # allocated peak since the step began (peak stats are reset per step)
    inactive_split: int = 0
    alloc_retries: int = 0
    ooms: int = 0
    device_used: int | None = None  # NVML, all processes on the device
    host_rss: int | None = None
    cuda: bool = True  # False: no allocator figures (CPU), only host RSS is meaningful

    @property
    def slack(self) -> int:
        """Reserved but not allocated, bytes: the caching allocator's cache. Large after every
        step (the step's activations were freed into it) and reused by the next: not a problem."""
        return max(0, self.reserved - self.allocated)

    @property
    def fragmentation(self) -> int:
        """Free bytes stranded inside split blocks that are partly in use (``inactive_split``):
        cached memory a large allocation cannot use (DESIGN §6: 3 GiB stuck there caused an OOM)."""
        return self.inactive_split

    @property
    def fragmentation_ratio(self) -> float:
        return self.fragmentation / self.reserved if self.reserved else 0.0

    def to_fields(self) -> dict[str, Any]:
        if not self.cuda:
            return {k: v for k, v in {"host_rss": self.host_rss}.items() if v is not None}
        fields = {
            "allocated": self.allocated, "reserved": self.reserved, "active": self.active,
            "step_peak": self.peak, "slack": self.slack,
            "inactive_split": self.inactive_split, "alloc_retries": self.alloc_retries,
            "num_ooms": self.ooms, "device_used": self.device_used, "host_rss": self.host_rss,
        }
        return {k: v for k, v in fields.items() if v is not None}


def sample_from_stats(step: int, stats: Mapping[str, Any], *, device_used: int | None = None,
                      host_rss: int | None = None) -> MemorySample:
    """Read a ``memory_stats()`` dict (empty on CPU) into a sample."""
    def get(key: str) -> int:
        return int(stats.get(key, 0) or 0)

    return MemorySample(
        step=step,
        allocated=get("allocated_bytes.all.current"),
        reserved=get("reserved_bytes.all.current"),
        active=get("active_bytes.all.current"),
        peak=get("allocated_bytes.all.peak"),
        inactive_split=get("inactive_split_bytes.all.current"),
        alloc_retries=get("num_alloc_retries"),
        ooms=get("num_ooms"),
        device_used=device_used,
        host_rss=host_rss,
        cuda=bool(stats),
    )


def theil_sen(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Robust line fit: (slope, intercept) = median of pairwise slopes, median of residual offsets.

    O(n²) pairs; a window of a few dozen steps costs microseconds, so no scipy dependency.
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"theil_sen needs two equal-length series of >= 2 points, got {len(xs)} and {len(ys)}")
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i])
              for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    if not slopes:
        raise ValueError("theil_sen needs at least two distinct x values")
    slope = statistics.median(slopes)
    intercept = statistics.median(y - slope * x for x, y in zip(xs, ys))
    return slope, intercept


def rising_share(ys: Sequence[float]) -> float:
    """Share of ordered pairs (i<j) with y_j > y_i among pairs that differ: 1.0 = monotone rise."""
    up = down = 0
    for i in range(len(ys)):
        for j in range(i + 1, len(ys)):
            up += ys[j] > ys[i]
            down += ys[j] < ys[i]
    return up / (up + down) if up + down else 0.0


@dataclass(frozen=True)
class Growth:
    """A steady rise of the step peak, and when it meets the cap."""

    slope: float  # bytes per optimizer step
    level: float  # fitted step peak at ``step``, bytes
    step: int
    cap: int | None  # bytes: the VRAM limit or the device total
    projected_step: int | None  # first step whose fitted peak reaches the cap

    @property
    def steps_left(self) -> int | None:
        return None if self.projected_step is None else self.projected_step - self.step


def detect_growth(samples: Sequence[MemorySample], *, cap: int | None, window: int = 20,
                  min_slope: float = 1 * 2**20, min_rising_share: float = 0.75,
                  min_samples: int = 8) -> Growth | None:
    """Steady growth of step peaks over the last ``window`` samples, or None.

    Growth needs at least ``min_samples`` samples (a fast leak kills before a window of 20
    fills: on an 8B model at 0.5 GiB/step a 24 GiB card lasts ~25 steps), a Theil–Sen slope of
    at least ``min_slope`` bytes/step (default 1 MiB/step) and most pairs rising (noise around
    a flat level gives ~0.5). Before the window is full the bar is higher (90 % of pairs
    rising): eight noisy samples clear 75 % by chance about once in thirty.
    """
    recent = list(samples)[-window:]
    if len(recent) < max(3, min(min_samples, window)):
        return None
    if len(recent) < window:
        min_rising_share = max(min_rising_share, 0.9)
    xs = [float(s.step) for s in recent]
    ys = [float(s.peak) for s in recent]
    # Cheap exact exits first (this runs every step; a flat or noisy series is the usual one): a median
    # pairwise slope >= min_slope needs some pair rising by >= min_slope over >= 1 step, so a range below
    # it is no growth; then the rising share, which is cheaper than the fit.
    if max(ys) - min(ys) < min_slope or rising_share(ys) < min_rising_share:
        return None
    slope, intercept = theil_sen(xs, ys)
    if slope < min_slope:
        return None
    step = recent[-1].step
    level = slope * step + intercept
    return Growth(slope=slope, level=level, step=step, cap=cap,
                  projected_step=project_cap_step(slope, intercept, step, cap))


def project_cap_step(slope: float, intercept: float, step: int, cap: int | None) -> int | None:
    """First step s >= step with slope*s + intercept >= cap; None without a cap or growth."""
    if cap is None or slope <= 0:
        return None
    s = math.ceil((cap - intercept) / slope)
    return max(step, s)
