"""The memory model fitted to probe points (issue 18): its form, its coefficients, its stated error."""

import random

import pytest

from oomguard.tune.fit import FORM_FULL, FORM_LINEAR, fit_memory, solve
from oomguard.tune.record import ProbePoint

GIB = 2**30
A, B, C = 8 * GIB, 200_000.0, 30.0  # bytes; bytes per token; bytes per token x length


def truth(batch: int, length: int) -> float:
    tokens = batch * length
    return A + B * tokens + C * tokens * length


def points(noise: float = 0.0, lengths=(2048, 1024, 512), batches=(1, 2, 4, 8), seed: int = 0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        for b in batches:
            peak = int(truth(b, n) * (1 + rng.uniform(-noise, noise)))
            out.append(ProbePoint(batch=b, length=n, fits=True, tokens=b * n, peak_allocated=int(peak * 0.9),
                                  peak_reserved=peak, step_s=1.0, tokens_per_s=1000.0 * b))
    return out


def test_exact_points_give_back_the_coefficients():
    fit = fit_memory(points())
    assert fit.form == FORM_FULL and fit.points == 12
    assert fit.a == pytest.approx(A, rel=1e-6) and fit.b == pytest.approx(B, rel=1e-6)
    assert fit.c == pytest.approx(C, rel=1e-6)
    assert fit.max_rel_error < 1e-9 and fit.rms_rel_error < 1e-9 and fit.loo_max_rel_error < 1e-9
    assert fit.predict(16 * 2048, 2048) == pytest.approx(truth(16, 2048), rel=1e-6)  # out of the probed range


def test_noisy_points_state_their_error():
    fit = fit_memory(points(noise=0.03))
    assert 0.0 < fit.rms_rel_error <= fit.max_rel_error <= 0.06
    assert fit.loo_max_rel_error >= fit.max_rel_error * 0.5  # out of sample is not better than in sample by much
    assert fit.predict(8 * 2048, 2048) == pytest.approx(truth(8, 2048), rel=0.06)


def test_one_length_drops_the_length_term_and_says_so():
    fit = fit_memory(points(lengths=(1024,)))
    assert fit.form == FORM_LINEAR and fit.c == 0.0
    assert fit.predict(3 * 1024, 1024) == pytest.approx(truth(3, 1024), rel=1e-6)  # linear in tokens at one length


def test_points_that_did_not_fit_or_have_no_memory_are_left_out():
    pts = points()
    oom = [ProbePoint(batch=16, length=2048, fits=False, error="CUDA out of memory")]
    assert fit_memory(pts + oom).points == len(pts)
    cpu = [ProbePoint(batch=b, length=64, fits=True, tokens=64 * b, tokens_per_s=10.0) for b in (1, 2, 4)]
    assert fit_memory(cpu) is None  # no CUDA: no memory model
    assert fit_memory(pts[:1]) is None


def test_allocated_is_fitted_on_its_own():
    fit = fit_memory(points(), "peak_allocated")
    assert fit.metric == "peak_allocated" and fit.a == pytest.approx(0.9 * A, rel=1e-3)
    with pytest.raises(ValueError, match="metric"):
        fit_memory(points(), "peak")


def test_solve_refuses_dependent_columns():
    assert solve([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]], [1.0, 2.0, 3.0]) is None
    assert solve([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [1.0, 2.0, 3.0]) == pytest.approx([1.0, 2.0])
