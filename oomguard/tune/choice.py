"""What the probe says about the command: does it fit at its worst batch, the fastest configuration
that fits with a safety margin at the same effective batch and length, what the ladder would do
first (asked of :func:`oomguard.policy.decide`, not re-implemented). Pure.

Memory is judged by the peak *reserved* (the caching allocator's hold, which the card or the
emulated cap limits), measured where the configuration was probed, else predicted by the fit.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from oomguard.policy import AttemptView, DataProfile, Failure, Policy, decide
from oomguard.protocol import KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH, FailureKind, Phase
from oomguard.tune.fit import MemoryFit, fit_memory
from oomguard.tune.record import ProbePoint, ProbeRecord

__all__ = ["CONTEXT_BYTES", "DEFAULT_MARGIN", "Config", "LadderStep", "Plan", "Verdict", "capacity_of", "data_profile",
           "make_plan", "peak_at"]

DEFAULT_MARGIN = 0.10  # share of the allocator's capacity kept free by a tuned start
CONTEXT_BYTES = 512 * 2**20  # CUDA context outside the allocator on a real card (DESIGN §6)
GIB = 2**30


class Verdict(str, enum.Enum):
    FITS = "fits"  # peak within capacity minus the margin
    TIGHT = "tight"  # within capacity, inside the margin: one fragmentation away from an OOM
    DOES_NOT_FIT = "does_not_fit"
    UNKNOWN = "unknown"  # no memory measured (no CUDA device)


@dataclass(frozen=True)
class Config:
    """One configuration at the worst batch: ``peak`` reserved bytes (``measured`` or predicted)."""

    batch: int
    accumulation: int
    length: int
    peak: float | None
    measured: bool
    fits: bool | None
    tokens_per_s: float | None


@dataclass(frozen=True)
class LadderStep:
    reason: str
    changes: dict[str, Any]
    config: Config | None  # the configuration after the rung (None: the rung changes no probed knob)
    verdict: Verdict


@dataclass(frozen=True)
class Plan:
    capacity: int | None
    margin: float
    command: Config
    verdict: Verdict
    headroom: float | None
    best: Config | None
    ladder_first: LadderStep | None
    fit: MemoryFit | None
    fit_allocated: MemoryFit | None
    typical_peak: float | None  # the same batch of average-length rows: what an average step needs
    device: str
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fit"] = self.fit.to_dict() if self.fit else None
        out["fit_allocated"] = self.fit_allocated.to_dict() if self.fit_allocated else None
        return _plain(out)


def _plain(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def capacity_of(record: ProbeRecord, context_bytes: int = CONTEXT_BYTES) -> int | None:
    """Bytes the allocator may hold: the cap the probe read, else the emulated card or the real one less
    the CUDA context."""
    if record.cuda and record.capacity:
        return int(record.capacity)
    size = record.vram_limit or record.total_bytes
    return None if not record.cuda or not size else int(size - context_bytes)


def data_profile(record: ProbeRecord) -> DataProfile | None:
    prof = record.profile or {}
    quantiles = tuple((float(q), int(n)) for q, n in prof.get("quantiles", ()))
    try:
        return DataProfile(count=int(prof["count"]), quantiles=quantiles, max_len=int(prof["max_len"]),
                           packed=record.packed)
    except (KeyError, ValueError):
        return None


def _probed(record: ProbeRecord, batch: int, length: int) -> ProbePoint | None:
    for p in record.points:
        if p.batch == batch and abs(p.length - length) <= max(1, length // 100):
            return p
    return None


def peak_at(record: ProbeRecord, fit: MemoryFit | None, batch: int, length: int) -> tuple[float | None, bool]:
    """(reserved peak at ``batch`` × ``length``, whether measured). A probed OOM reads as infinite."""
    p = _probed(record, batch, length)
    if p is not None and not p.fits:  # ran out of memory, or a smaller batch at this length or shorter did
        return float("inf"), not p.implied
    if p is not None and p.peak_reserved:
        return float(p.peak_reserved), True
    return (fit.predict(batch * length, length) if fit else None), False


def _judge(peak: float | None, capacity: int | None, margin: float) -> Verdict:
    if peak == float("inf"):  # it ran out of memory when probed
        return Verdict.DOES_NOT_FIT
    if peak is None or capacity is None:
        return Verdict.UNKNOWN
    if peak <= capacity * (1 - margin):
        return Verdict.FITS
    return Verdict.TIGHT if peak <= capacity else Verdict.DOES_NOT_FIT


def _config(record: ProbeRecord, fit: MemoryFit | None, batch: int, effective: int, length: int) -> Config:
    peak, measured = peak_at(record, fit, batch, length)
    p = _probed(record, batch, length)
    return Config(batch=batch, accumulation=max(1, effective // batch), length=length, peak=peak, measured=measured,
                  fits=p.fits if p is not None else None, tokens_per_s=p.tokens_per_s if p is not None else None)


def _best(record: ProbeRecord, fit: MemoryFit | None, effective: int, length: int, capacity: int | None,
          margin: float) -> Config | None:
    """The fastest probed configuration at ``length`` whose batch divides the effective batch and fits."""
    options = []
    for p in record.points:
        if p.fits and p.tokens_per_s and abs(p.length - length) <= max(1, length // 100) and effective % p.batch == 0:
            c = _config(record, fit, p.batch, effective, length)
            if capacity is None or _judge(c.peak, capacity, margin) is Verdict.FITS:
                options.append(c)
    return max(options, key=lambda c: c.tokens_per_s or 0.0, default=None)


def _knobs(record: ProbeRecord) -> dict[str, Any]:
    req = record.requested
    knobs = {KNOB_BATCH: int(req[KNOB_BATCH]), KNOB_GRAD_ACCUM: int(req[KNOB_GRAD_ACCUM])}
    for name in (KNOB_MAX_SEQ_LENGTH, "lora_r", "precision"):
        if req.get(name) is not None:
            knobs[name] = req[name]
    return knobs


def _ladder_first(policy: Policy, record: ProbeRecord, fit: MemoryFit | None, length: int, capacity: int | None,
                  margin: float) -> LadderStep:
    """``decide()`` after a CUDA OOM on the first step of the command as written."""
    knobs = _knobs(record)
    attempt = AttemptView(n=1, knobs=knobs, rung=None, max_step=None,
                          failure=Failure(kind=FailureKind.CUDA_OOM, phase=Phase.FORWARD_BACKWARD,
                                          detail="CUDA out of memory at the worst batch (oomguard plan)"))
    d = decide(policy, [attempt], profile=data_profile(record), world_size=int(record.requested.get("world_size", 1)))
    changes = {c.knob: c.new for c in d.changes}
    after = dict(knobs, **changes)
    new_length = min(length, int(after.get(KNOB_MAX_SEQ_LENGTH) or length))
    config = None
    if changes.keys() & {KNOB_BATCH, KNOB_MAX_SEQ_LENGTH}:
        effective = int(after[KNOB_BATCH]) * int(after[KNOB_GRAD_ACCUM])
        config = _config(record, fit, int(after[KNOB_BATCH]), effective, new_length)
    verdict = _judge(config.peak, capacity, margin) if config else Verdict.UNKNOWN
    return LadderStep(reason=d.reason, changes=changes, config=config, verdict=verdict)


def make_plan(record: ProbeRecord, policy: Policy, margin: float = DEFAULT_MARGIN,
              context_bytes: int = CONTEXT_BYTES) -> Plan:
    """The plan for the probed command under ``policy``."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin {margin}: give a share of the card in [0, 1), e.g. 0.1")
    fit, fit_alloc = fit_memory(record.points, "peak_reserved"), fit_memory(record.points, "peak_allocated")
    capacity = capacity_of(record, context_bytes)
    batch, accum = int(record.requested[KNOB_BATCH]), int(record.requested[KNOB_GRAD_ACCUM])
    length = max((p.length for p in record.points), default=record.worst_row)  # the worst row, as probed
    command = _config(record, fit, batch, batch * accum, length)
    verdict = _judge(command.peak, capacity, margin)
    mean = _mean_length(record)
    typical = fit.predict(batch * mean, mean) if fit and mean else None
    return Plan(capacity=capacity, margin=margin, command=command, verdict=verdict,
                headroom=None if capacity is None or command.peak is None else capacity - command.peak,
                best=_best(record, fit, batch * accum, length, capacity, margin),
                ladder_first=_ladder_first(policy, record, fit, length, capacity, margin),
                fit=fit, fit_allocated=fit_alloc, typical_peak=typical, device=record.device,
                notes=tuple(record.notes) + _fit_notes(fit, record))


def _mean_length(record: ProbeRecord) -> float | None:
    prof = record.profile or {}
    count, total = prof.get("count"), prof.get("total_tokens")
    return total / count if count and total else None


def _fit_notes(fit: MemoryFit | None, record: ProbeRecord) -> tuple[str, ...]:
    if record.cuda and fit is None:
        return ("fewer than two configurations fit: no memory model",)
    return ()
