"""Memory math on fabricated torch.cuda.memory_stats() series."""

import math
import random

import pytest

from oomguard.guard.callbacks.cache import ClearReason, clear_reason
from oomguard.guard.callbacks.memory import (
    GIB,
    detect_growth,
    project_cap_step,
    rising_share,
    sample_from_stats,
    theil_sen,
)

MIB = 2**20


def stats(peak: int, *, allocated: int | None = None, reserved: int | None = None, retries: int = 0,
          split: int = 0) -> dict:
    allocated = peak if allocated is None else allocated
    return {
        "allocated_bytes.all.current": allocated, "allocated_bytes.all.peak": peak,
        "reserved_bytes.all.current": reserved if reserved is not None else allocated + 64 * MIB,
        "active_bytes.all.current": allocated, "inactive_split_bytes.all.current": split,
        "num_alloc_retries": retries, "num_ooms": 0,
    }


def series(peaks):
    return [sample_from_stats(step, stats(p)) for step, p in enumerate(peaks, start=1)]


def test_leak_with_known_slope_is_detected_and_projected():
    rng = random.Random(1)
    base, slope, cap = 10 * GIB, 50 * MIB, 16 * GIB
    # a leak of 50 MiB/step with ±2 MiB jitter
    peaks = [base + slope * s + rng.randint(-2 * MIB, 2 * MIB) for s in range(1, 31)]
    growth = detect_growth(series(peaks), cap=cap, window=20)
    assert growth is not None
    assert growth.slope == pytest.approx(slope, rel=0.02)
    expected = math.ceil((cap - base) / slope)  # first step whose clean peak reaches the cap
    assert abs(growth.projected_step - expected) <= 1
    assert growth.steps_left == growth.projected_step - 30


def test_flat_noisy_series_is_not_growth():
    rng = random.Random(2)
    peaks = [12 * GIB + rng.randint(-300 * MIB, 300 * MIB) for _ in range(40)]
    assert detect_growth(series(peaks), cap=16 * GIB, window=20) is None


def test_growth_needs_min_samples_not_a_full_window():
    peaks = [GIB + 100 * MIB * s for s in range(10)]
    assert detect_growth(series(peaks[:7]), cap=None, window=20) is None
    assert detect_growth(series(peaks[:8]), cap=None, window=20) is not None
    assert detect_growth(series(peaks), cap=None, window=20, min_samples=20) is None


def test_noise_over_a_few_samples_is_not_growth():
    rng = random.Random(3)
    for _ in range(200):
        peaks = [12 * GIB + rng.randint(-300 * MIB, 300 * MIB) for _ in range(8)]
        assert detect_growth(series(peaks), cap=16 * GIB, window=20) is None


def test_theil_sen_ignores_a_spike():
    xs = list(range(10))
    ys = [3.0 * x + 7 for x in xs]
    ys[5] = 1e9  # one eval-sized spike
    slope, intercept = theil_sen(xs, ys)
    assert slope == pytest.approx(3.0)
    assert intercept == pytest.approx(7.0)


def test_rising_share_extremes():
    assert rising_share([1, 2, 3, 4]) == 1.0
    assert rising_share([4, 3, 2, 1]) == 0.0
    assert rising_share([5, 5, 5]) == 0.0


def test_projection_without_cap_or_growth_is_none():
    assert project_cap_step(1.0, 0.0, 5, None) is None
    assert project_cap_step(0.0, 0.0, 5, 100) is None
    assert project_cap_step(10.0, 0.0, 5, 100) == 10
    assert project_cap_step(10.0, 0.0, 50, 100) == 50  # already past the cap: now


def test_fragmentation_is_stranded_split_memory_not_the_cache():
    s = sample_from_stats(3, stats(8 * GIB, allocated=6 * GIB, reserved=10 * GIB, split=2 * GIB))
    assert s.slack == 4 * GIB and s.fragmentation == 2 * GIB
    assert s.fragmentation_ratio == pytest.approx(0.2)
    assert s.to_fields()["slack"] == 4 * GIB and s.to_fields()["inactive_split"] == 2 * GIB


def test_cpu_sample_reports_only_host_rss():
    s = sample_from_stats(1, {}, host_rss=123)
    assert s.to_fields() == {"host_rss": 123}


@pytest.mark.parametrize("allocated,reserved,split,retries_before,retries_now,expected", [
    (6 * GIB, 10 * GIB, 3 * GIB, 0, 0, ClearReason.FRAGMENTATION),  # 3 GiB stranded, 30 %
    # 12 GiB cached after a step (activations freed), nothing stranded: the cache at work, no clear
    # (clearing here cost 291 ms per 8B step on an H200)
    (6 * GIB, 18 * GIB, 0, 0, 0, None),
    (9 * GIB, 10 * GIB, 500 * MIB, 0, 0, None),                      # under 1 GiB
    (9 * GIB, 40 * GIB, 2 * GIB, 0, 0, None),                        # 5 % of reserved
    (9 * GIB, 10 * GIB, 0, 2, 3, ClearReason.ALLOC_RETRIES),
])
def test_clear_reason(allocated, reserved, split, retries_before, retries_now, expected):
    prev = sample_from_stats(1, stats(allocated, allocated=allocated, reserved=reserved, retries=retries_before))
    cur = sample_from_stats(2, stats(allocated, allocated=allocated, reserved=reserved, retries=retries_now,
                                     split=split))
    assert clear_reason(prev, cur) == expected


def test_the_clearer_judges_the_monitors_sample_of_the_step_and_reads_its_own_otherwise():
    """The monitor runs first at each step end; its sample is the clearer's (the allocator's stats are read
    once per step). A sample of another step, or none, is not used."""
    from types import SimpleNamespace

    from oomguard.guard.callbacks.cache import CacheClearerCallback
    from oomguard.guard.callbacks.memory import MemorySample

    fragmented = MemorySample(step=7, allocated=10 * GIB, reserved=20 * GIB, inactive_split=4 * GIB)
    clearer = CacheClearerCallback(monitor=SimpleNamespace(latest=fragmented))
    assert clearer._sample(7) is fragmented
    assert clear_reason(None, clearer._sample(7)) is ClearReason.FRAGMENTATION
    own = clearer._sample(8)  # the monitor's is step 7's: read again (on CPU, no allocator figures)
    assert own is not fragmented and own.step == 8 and own.inactive_split == 0
    assert CacheClearerCallback()._sample(7).step == 7  # no monitor at all


def _growth_by_the_fit(samples, cap, window=20, min_slope=2**20, min_rising_share=0.75, min_samples=8):
    """detect_growth as first written (the fit, then the rising share): the cheap exits must not change it."""
    from oomguard.guard.callbacks.memory import Growth, project_cap_step, rising_share, theil_sen

    recent = list(samples)[-window:]
    if len(recent) < max(3, min(min_samples, window)):
        return None
    share = max(min_rising_share, 0.9) if len(recent) < window else min_rising_share
    xs, ys = [float(s.step) for s in recent], [float(s.peak) for s in recent]
    slope, intercept = theil_sen(xs, ys)
    if slope < min_slope or rising_share(ys) < share:
        return None
    step = recent[-1].step
    return Growth(slope=slope, level=slope * step + intercept, step=step, cap=cap,
                  projected_step=project_cap_step(slope, intercept, step, cap))


@pytest.mark.parametrize("seed", range(40))
def test_the_cheap_exits_of_detect_growth_keep_its_verdicts(seed):
    from oomguard.guard.callbacks.memory import MemorySample

    rng = random.Random(seed)
    slope = rng.choice([0, 0, 0.2, 0.9, 1.0, 1.1, 3, 50]) * MIB
    noise = rng.choice([0, 0.1, 0.5, 2, 20]) * MIB
    n = rng.randint(3, 30)
    samples = [MemorySample(step=10 + i, peak=int(8 * GIB + slope * i + rng.uniform(-noise, noise)))
               for i in range(n)]
    assert detect_growth(samples, cap=16 * GIB) == _growth_by_the_fit(samples, 16 * GIB)
