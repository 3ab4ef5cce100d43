"""Culprit batches (issue 19): does a failure belong to one batch, and what would fix only that batch. Pure.

A CUDA OOM is the batch's when the micro-batch that ran out of memory (the child's in-flight record) held
more tokens than every micro-batch that fit at the same memory knobs (the ledger's completed steps, and the
failing step's own micro-batches that finished): the recipe fits, this batch does not. Then the step is
split — trained as ``factor`` smaller chunks with the same rows and the same gradient — with the smallest
power of two that brings its chunks to a size that fit before (at least twice the factor that already failed
at that step); when even one row per chunk failed, or
nothing fit at these knobs, or the micro-batch cannot be split (one row: packed rows at batch 1; padding-free
rows), or ``limits.max_split_steps`` steps are split already, or the ``CONSECUTIVE_SPLITS`` steps right
before the failing one were split (the long rows are not rare any more), the cuda_oom ladder applies.

A non-finite loss is the batch's when it comes back at the same optimizer step with the same rows after
a rollback: the rows of the micro-batches whose loss was non-finite (all of the step's when that is not
known) are quarantined — never trained again, recorded as skipped in the ledger — bounded by
``limits.max_quarantined_rows``. A first NaN is not judged: a learning rate can cause it too (the nan_loss
ladder goes first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from oomguard.policy.records import AttemptView, CulpritOrder, DataProfile, InFlight, InFlightBatch
from oomguard.protocol import KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH

__all__ = ["CONSECUTIVE_SPLITS", "Verdict", "carried_order", "expand_runs", "fitted_at", "in_flight_from_line",
           "judge_nan", "judge_oom", "padded_share", "same_grouping", "same_memory", "split_factor"]


# A culprit is rare: when the steps right before the failing one all had to be split (data sorted or grouped by
# length, long rows from some point on), the next OOM goes to the ladder instead of one restart per step.
CONSECUTIVE_SPLITS = 2


@dataclass(frozen=True)
class Verdict:
    """``culprit``: the failure is the batch's; ``why``: one clause saying so or not; ``step``, ``factor``
    (an OOM: split it so) and ``rows`` (a NaN: quarantine them)."""

    culprit: bool
    why: str
    step: int | None = None
    factor: int = 1
    rows: tuple[int, ...] = ()


def expand_runs(runs: Iterable[Sequence[int]]) -> list[int]:
    """``[[5, 3], [2, 1]]`` -> ``[5, 6, 7, 2]``: the ledger's runs of consecutive rows."""
    return [int(first) + k for first, length in runs for k in range(int(length))]


def in_flight_from_line(line: Mapping[str, Any]) -> InFlight | None:
    """The child's in-flight line as an :class:`InFlight`; None for a torn or foreign one."""
    try:
        batches = tuple(InFlightBatch(tuple(expand_runs(m["rows"])), int(m["tokens"]),
                                      m.get("finite") if isinstance(m.get("finite"), bool) else None)
                        for m in line["micro_batches"])
        return InFlight(int(line["step"]), str(line.get("kind") or "other"), batches,
                        int(line.get("factor") or 1), line.get("unsplittable") or None)
    except (KeyError, TypeError, ValueError):
        return None


# Knobs that change neither a micro-batch's memory nor which rows it holds (a NaN rung's learning rate).
_NEUTRAL = frozenset({"learning_rate"})
# Knobs that regroup the rows into other micro-batches and steps: a split step keeps its rows only without them.
_GROUPING = frozenset({KNOB_BATCH, KNOB_GRAD_ACCUM, KNOB_MAX_SEQ_LENGTH})


def same_memory(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two attempts' knobs give a micro-batch the same memory (they differ at most in _NEUTRAL)."""
    keys = (set(a) | set(b)) - _NEUTRAL
    return all(a.get(k) == b.get(k) for k in keys)


def same_grouping(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two attempts' knobs put the same rows into the same optimizer steps."""
    return all(a.get(k) == b.get(k) for k in _GROUPING)


def fitted_at(attempts: Sequence[AttemptView], knobs: Mapping[str, Any]) -> list[int]:
    """Tokens of every micro-batch that trained (fit) in an attempt whose knobs take the memory ``knobs`` do."""
    return [t for a in attempts if same_memory(a.knobs, knobs) for t in a.fitted_tokens if t > 0]


def padded_share(profile: DataProfile | None, length: float) -> float | None:
    """The share of the data's rows no longer than ``length`` tokens (None: no profile)."""
    if profile is None:
        return None
    return max((q for q, v in profile.quantiles if v <= length), default=0.0)


def split_factor(tokens: int, largest_fit: int, rows: int, failed_factor: int) -> int | None:
    """The smallest power of two >= 2 (and > ``failed_factor``) whose chunks are no larger than the largest
    micro-batch that fit, capped at one row per chunk; None when one row per chunk already failed. Pure."""
    if failed_factor >= rows:
        return None
    need = max(2, failed_factor * 2, 2 ** math.ceil(math.log2(max(tokens / max(largest_fit, 1), 1.0))))
    return min(need, rows)


def _previous_factor(attempts: Sequence[AttemptView], step: int) -> int:
    last = attempts[-1]
    return max(last.in_flight.factor if last.in_flight and last.in_flight.step == step else 1,
               last.culprit.factor(step) if last.culprit else 1)


def _tail_words(width: float, tail: float | None) -> str:
    if tail is None:
        return ""
    where = "the data's longest rows" if tail >= 0.995 else f"longer than {tail:.0%} of the data's rows"
    return f"; padded to {width:.0f} tokens a row, {where}"


def judge_oom(attempts: Sequence[AttemptView], profile: DataProfile | None = None, *,
              max_split_steps: int = 8) -> Verdict:
    """Whether the last attempt's CUDA OOM belongs to its batch, and the split that would fix it (a culprit is
    rare: with ``max_split_steps`` steps split already, the batches are too big, not one of them)."""
    last = attempts[-1]
    flight = last.in_flight
    if flight is None or flight.kind != "oom" or not flight.micro_batches:
        return Verdict(False, "the failing step's rows are unknown (no in-flight record)")
    failed = next((m for m in reversed(flight.micro_batches) if m.finite is None), flight.micro_batches[-1])
    # what fit: completed steps at these memory knobs, and the failing step's own micro-batches that finished
    fitted = fitted_at(attempts, last.knobs) + [m.tokens for m in flight.micro_batches
                                                if m.finite is not None and flight.factor == 1]
    if not fitted:
        return Verdict(False, "no micro-batch fit at these knobs: the recipe itself is too big for the card")
    largest = max(fitted)
    if failed.tokens <= largest:
        return Verdict(False, f"micro-batches as large as this one ({failed.tokens} tokens; up to {largest}) "
                              "fit before at these knobs: the batch is not the cause")
    width = failed.tokens / max(len(failed.rows), 1)
    tail = padded_share(profile, width)
    words = (f"step {flight.step}'s micro-batch of {len(failed.rows)} rows holds {failed.tokens} tokens, "
             f"{failed.tokens / largest:.1f}x the largest that fit at these knobs ({largest}, "
             f"{len(fitted)} micro-batches)" + _tail_words(width, tail))
    if flight.unsplittable:
        return Verdict(False, f"{words}, but it cannot be split ({flight.unsplittable})")
    if len(failed.rows) < 2:
        return Verdict(False, f"{words}, but it holds one row and cannot be split")
    split = dict(last.culprit.split) if last.culprit else {}
    if flight.step not in split and len(split) >= max_split_steps:
        return Verdict(False, f"{words}, but {len(split)} steps are split already (limits.max_split_steps "
                              f"{max_split_steps}): the batches, not one batch, are too big")
    run = [s for s in range(flight.step - CONSECUTIVE_SPLITS, flight.step) if s in split]
    if flight.step not in split and len(run) == CONSECUTIVE_SPLITS:
        return Verdict(False, f"{words}, but the {CONSECUTIVE_SPLITS} steps right before it ({run[0]}-{run[-1]}) "
                              "had to be split too: the batches, not one batch, are too big")
    previous = _previous_factor(attempts, flight.step)
    factor = split_factor(failed.tokens, largest, len(failed.rows), previous)
    if factor is None:
        return Verdict(False, f"{words}, and it ran out of memory at one row per chunk: the recipe is too big")
    return Verdict(True, words, step=flight.step, factor=factor)


def judge_nan(attempts: Sequence[AttemptView], streak: int = 2) -> Verdict:
    """Whether the last attempt's non-finite loss belongs to its rows: the same step and rows failed in the
    attempt before, and the last attempt rolled back to before that step. ``streak``: NaN attempts in a row,
    each right after its rollback (``decision``'s count). When every micro-batch of the step was non-finite,
    the rows are blamed only for a streak of 2 (a first NaN after healthy training, then the same rows again):
    past that, the weights at the rollback point are the suspect (a learning rate off by a factor leaves
    finite but ruined weights in every checkpoint it wrote; H200, 2026-12-01)."""
    last = attempts[-1]
    flight = last.in_flight
    if flight is None or flight.kind != "nan":
        return Verdict(False, "the failing step's rows are unknown (no in-flight record)")
    before = attempts[-2].in_flight if len(attempts) >= 2 else None
    if before is None or before.kind != "nan" or before.step != flight.step:
        return Verdict(False, f"a first non-finite loss at step {flight.step}")
    if sorted(before.rows) != sorted(flight.rows):
        return Verdict(False, f"step {flight.step} failed again, with other rows")
    if last.resumed_step is None or last.resumed_step >= flight.step:
        return Verdict(False, f"step {flight.step} failed again without a rollback before it")
    bad = tuple(sorted({r for m in flight.micro_batches if m.finite is False for r in m.rows}))
    rows = bad or tuple(sorted(set(flight.rows)))
    if len(rows) == len(set(flight.rows)) and streak > 2:
        return Verdict(False, f"step {flight.step} failed again with the same rows, but all of them were non-finite "
                              f"and the NaN came back right after each of {streak - 1} rollbacks in a row: the "
                              "weights, not the rows", step=flight.step)
    which = "the micro-batch(es) whose loss was non-finite" if bad else "all of the step's rows"
    return Verdict(True, f"step {flight.step} diverged again with the same {len(flight.rows)} rows after a "
                         f"rollback: {which} ({len(rows)} rows) are the cause", step=flight.step, rows=rows)


def carried_order(previous: CulpritOrder | None, *, same_knobs: bool, split: tuple[int, int] | None = None,
                  quarantine: Sequence[int] = ()) -> CulpritOrder | None:
    """The run's culprit order after a decision: quarantined rows stay for good; split steps stay only while
    the knobs stay (``same_knobs``: :func:`same_grouping`; a new batch or length regroups the rows); plus
    what this decision adds. Pure."""
    previous = previous or CulpritOrder()
    steps = dict(previous.split) if same_knobs else {}
    if split is not None:
        steps[split[0]] = split[1]
    order = CulpritOrder(split=tuple(sorted(steps.items())),
                         quarantine=tuple(sorted(set(previous.quarantine) | set(quarantine))))
    return order or None
