"""Peak memory as a function of tokens per micro-batch and length, fitted to the probe. Pure.

The form (one QLoRA step at the worst batch): ``peak = a + b·T + c·T·L`` bytes, with ``T`` the tokens
of one micro-batch (rows × padded length) and ``L`` its length. ``a`` is what does not move with the
batch (weights, adapter, optimizer state, the CUDA workspace), ``b·T`` the activations and logits kept
per token, ``c·T·L`` what grows with the square of the length (attention scores where the kernel
materializes them). Least squares on the relative residual (every row divided by its measured
peak), so a 10 GiB point and a 50 GiB point count alike. With every point at one length ``T`` and
``T·L`` are collinear: the fit drops ``c`` and says so. Its error is stated as the max and RMS
relative residual on the probed points and, out of sample, the max leave-one-out residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from oomguard.tune.record import ProbePoint

__all__ = ["FORM_FULL", "FORM_LINEAR", "MemoryFit", "fit_memory", "point_length", "point_tokens", "solve"]

FORM_FULL = "peak = a + b*tokens + c*tokens*length"
FORM_LINEAR = "peak = a + b*tokens (one length probed: the length term cannot be told apart)"
METRICS = ("peak_reserved", "peak_allocated")


def point_tokens(p: ProbePoint) -> int:
    """Tokens of one micro-batch: as the model saw them, else rows × length."""
    return int(p.tokens) if p.tokens else p.batch * p.length


def point_length(p: ProbePoint) -> float:
    return point_tokens(p) / p.batch


@dataclass(frozen=True)
class MemoryFit:
    """A fitted peak (bytes). ``max_rel_error`` / ``rms_rel_error``: on the probed points;
    ``loo_max_rel_error``: each point predicted by a fit without it (None: too few points)."""

    metric: str
    a: float
    b: float
    c: float
    form: str
    points: int
    max_rel_error: float
    rms_rel_error: float
    loo_max_rel_error: float | None

    def predict(self, tokens: float, length: float) -> float:
        return self.a + self.b * tokens + self.c * tokens * length

    def to_dict(self) -> dict:
        return {"metric": self.metric, "form": self.form, "a": self.a, "b": self.b, "c": self.c,
                "points": self.points, "max_rel_error": self.max_rel_error, "rms_rel_error": self.rms_rel_error,
                "loo_max_rel_error": self.loo_max_rel_error}


def solve(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float] | None:
    """Least squares ``rows · x ≈ ys`` by the normal equations (Gauss-Jordan, partial pivoting);
    None when the columns are (numerically) dependent."""
    n = len(rows[0])
    m = [[sum(r[i] * r[j] for r in rows) for j in range(n)] + [sum(r[i] * y for r, y in zip(rows, ys))]
         for i in range(n)]
    scale = max(abs(m[i][i]) for i in range(n)) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-10 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _features(p: ProbePoint, full: bool) -> list[float]:
    t, length = point_tokens(p), point_length(p)
    # scaled so the normal equations stay well conditioned (tokens ~1e4, tokens*length ~1e7)
    return [1.0, t / 1e4] + ([t * length / 1e7] if full else [])


def _coefficients(points: Sequence[ProbePoint], metric: str, full: bool) -> tuple[float, float, float] | None:
    ys = [float(getattr(p, metric)) for p in points]
    rows = [[f / y for f in _features(p, full)] for p, y in zip(points, ys)]  # relative residuals
    x = solve(rows, [1.0] * len(points)) if len(points) >= len(rows[0]) else None
    if x is None:
        return None
    return x[0], x[1] / 1e4, (x[2] / 1e7 if full else 0.0)


def _relative_errors(points: Sequence[ProbePoint], metric: str, coef: tuple[float, float, float]) -> list[float]:
    a, b, c = coef
    return [(a + b * point_tokens(p) + c * point_tokens(p) * point_length(p)) / getattr(p, metric) - 1.0
            for p in points]


def _leave_one_out(points: Sequence[ProbePoint], metric: str, full: bool) -> float | None:
    worst = 0.0
    for i, p in enumerate(points):
        coef = _coefficients([q for j, q in enumerate(points) if j != i], metric, full)
        if coef is None:
            return None
        worst = max(worst, abs(_relative_errors([p], metric, coef)[0]))
    return worst


def fit_memory(points: Sequence[ProbePoint], metric: str = "peak_reserved") -> MemoryFit | None:
    """The fit over the points that fit and carry ``metric``; None with fewer than two (CPU: none)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
    usable = [p for p in points if p.fits and getattr(p, metric)]
    if len(usable) < 2:
        return None
    full = len({round(point_length(p)) for p in usable}) >= 2 and len(usable) >= 3
    coef = _coefficients(usable, metric, full) if full else None
    if coef is None:
        full, coef = False, _coefficients(usable, metric, False)
    if coef is None:
        return None
    errors = _relative_errors(usable, metric, coef)
    return MemoryFit(metric=metric, a=coef[0], b=coef[1], c=coef[2], form=FORM_FULL if full else FORM_LINEAR,
                     points=len(usable), max_rel_error=max(abs(e) for e in errors),
                     rms_rel_error=math.sqrt(sum(e * e for e in errors) / len(errors)),
                     loo_max_rel_error=_leave_one_out(usable, metric, full) if len(usable) > 3 else None)
