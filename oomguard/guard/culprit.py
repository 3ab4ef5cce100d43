"""Culprit batches in the child (issue 19): the step in flight, a split step, quarantined rows.

The ledger's ``training_step`` wrapper (:func:`oomguard.guard.resume.ledger.install_ledger`) hands every
micro-batch to :meth:`CulpritStep.train` with the training-set rows it holds. There each micro-batch is

- recorded as *in flight* (its rows, its tokens ``input_ids.numel()`` — with dynamic padding the peak
  follows rows × the longest row — and its loss tensor, never synced) until the optimizer step ends; on a
  failure :func:`record_failure` writes the step's micro-batches as one line of
  ``ledger/rank<k>.inflight.jsonl``, the supervisor's evidence of which rows failed (policy.culprit);
- under ``OOMGUARD_CULPRIT`` (the supervisor's :class:`~oomguard.protocol.CulpritOrder`): stripped of its
  quarantined rows (the sampler still hands them out; the ledger records them as ``skipped``), and, on a
  split step, trained as ``factor`` chunks along the batch dimension through the original
  ``training_step`` — the same rows and the same gradient: with a loss normalised by
  ``num_items_in_batch`` each chunk gets the step's own count; with a mean loss divided by the gradient
  accumulation steps each chunk is weighted by its share of the micro-batch's label tokens.

Each split or skip is proven by a child event (``culprit_split``, ``rows_quarantined``; one that cannot be
split: ``culprit_unsplittable``): the supervisor reports a change as made only from those (Trust rule 3).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from oomguard import protocol
from oomguard.guard import trainer_patches as internals
from oomguard.guard.writer import EventWriter
from oomguard.protocol import CulpritOrder, Event

__all__ = ["CulpritStep", "MicroBatch", "chunk_bounds", "culprit_of", "current_rows", "in_flight_file",
           "install_culprit", "label_tokens", "order_from_env", "record_failure", "split_inputs", "take_rows",
           "unsplittable"]

IGNORE_INDEX = -100  # HF's label for "no loss here"


@dataclasses.dataclass
class MicroBatch:
    rows: tuple[int, ...]
    tokens: int  # input_ids.numel(): rows x the padded length
    peak: int = 0  # the tokens one forward held at once (a split chunk's; 0: nothing trained)
    unsplittable: str | None = None  # why it could not be split along dim 0 (None: it could)
    loss: Any = None  # the detached loss tensor; None while it trains (an OOM leaves it None)


def order_from_env(environ: Mapping[str, str] = os.environ) -> CulpritOrder:
    return CulpritOrder.from_env(environ.get(protocol.ENV_CULPRIT))


def in_flight_file(run_dir: str | Path, rank: int = 0) -> Path:
    return protocol.ledger_file(run_dir, rank, kind="inflight")


# --- pure tensor helpers ------------------------------------------------------------------------
def batch_rows(inputs: Any) -> int | None:
    """Rows of a micro-batch (dim 0 of input_ids / inputs_embeds / labels), None when it cannot be told."""
    if not isinstance(inputs, Mapping):
        return None
    for key in ("input_ids", "inputs_embeds", "labels"):
        value = inputs.get(key)
        if value is not None and hasattr(value, "shape") and len(value.shape) > 0:
            return int(value.shape[0])
    return None


def tokens_of(inputs: Any) -> int:
    """``input_ids.numel()`` (padded tokens: what a forward's activations grow with); 0 when unknown."""
    if isinstance(inputs, Mapping):
        for key in ("input_ids", "labels"):
            value = inputs.get(key)
            if isinstance(value, torch.Tensor):
                return int(value.numel())
    return 0


def unsplittable(inputs: Any, *, padding_free: bool = False) -> str | None:
    """Why this micro-batch cannot be split along dim 0, or None."""
    if padding_free:
        return "padding-free rows are concatenated into one sequence"
    rows = batch_rows(inputs)
    if rows is None:
        return "the batch is not a mapping of per-row tensors"
    if rows < 2:
        return "the micro-batch holds one row (packed rows at per-device batch 1)"
    odd = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] != rows]
    return f"tensors {odd} are not per row" if odd else None


def take_rows(inputs: Mapping[str, Any], index: Sequence[int]) -> Any:
    """The micro-batch with only rows ``index`` (dim 0) of every per-row tensor; other values as they are."""
    rows = batch_rows(inputs)
    idx = None
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows:
            if idx is None or idx.device != v.device:
                idx = torch.as_tensor(list(index), dtype=torch.long, device=v.device)
            out[k] = v.index_select(0, idx)
        else:
            out[k] = v
    try:
        return type(inputs)(out)
    except TypeError:
        return out


def chunk_bounds(rows: int, factor: int) -> list[range]:
    """``rows`` split into ``min(factor, rows)`` contiguous near-equal chunks, order kept. Pure."""
    k = max(1, min(factor, rows))
    base, extra = divmod(rows, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def split_inputs(inputs: Mapping[str, Any], factor: int) -> list[tuple[range, Any]]:
    return [(r, take_rows(inputs, r)) for r in chunk_bounds(batch_rows(inputs) or 1, factor)]


def label_tokens(inputs: Mapping[str, Any]) -> int:
    """Tokens a causal LM's mean loss averages over (labels shifted by one, IGNORE_INDEX left out); rows
    when there are no labels."""
    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        return batch_rows(inputs) or 1
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


# --- the step ------------------------------------------------------------------------------------
class CulpritStep:
    """One trainer's in-flight step and the supervisor's culprit order for it (see the module doc)."""

    def __init__(self, order: CulpritOrder, run_dir: str | Path | None, *, rank: int = 0, attempt: int = 1):
        self.order = order
        self.quarantine = frozenset(order.quarantine)
        self.journal = EventWriter(run_dir, rank)
        self.run_dir, self.rank, self.attempt = run_dir, rank, attempt
        self.in_flight: list[MicroBatch] = []
        self.skipped: list[int] = []  # quarantined rows of the step in flight
        self.rows_now: tuple[int, ...] = ()  # rows of the micro-batch (chunk) in training now (faults read it)
        self._split: dict[str, int] = {}  # the split step in flight: micro_batches, chunks, max_chunk_tokens
        self._unsplittable: str | None = None

    def train(self, trainer, step_fn: Callable[..., Any], model, inputs, rows: Sequence[int], *args, **kwargs):
        """``step_fn(model, inputs, ...)`` for this micro-batch, as the culprit order says."""
        step = trainer.state.global_step + 1
        rows = tuple(rows)
        padding_free = bool(getattr(trainer, "padding_free", False))
        entry = MicroBatch(rows, tokens_of(inputs), unsplittable=unsplittable(inputs, padding_free=padding_free))
        self.in_flight.append(entry)
        keep = [i for i, r in enumerate(rows) if r not in self.quarantine]
        if len(keep) < len(rows) and batch_rows(inputs) != len(rows):
            keep = []  # rows that are not dim 0 (padding-free): the whole micro-batch is skipped, and says so
        if len(keep) < len(rows):
            self.skipped.extend(r for i, r in enumerate(rows) if i not in keep)
            if not keep:  # nothing left to train in this micro-batch: no forward, no gradient
                entry.loss = _zero_loss(model)
                return entry.loss
            inputs, rows = take_rows(inputs, keep), tuple(rows[i] for i in keep)
        entry.peak = tokens_of(inputs)
        factor = self.order.factor(step)
        why = unsplittable(inputs, padding_free=padding_free) if factor > 1 else None
        if factor > 1 and why is None:
            entry.loss, entry.peak = self._train_split(trainer, step_fn, model, inputs, rows, factor, *args, **kwargs)
        else:
            if factor > 1:
                self._unsplittable = why
            self.rows_now = rows
            entry.loss = _detached(step_fn(model, inputs, *args, **kwargs))
        return entry.loss

    def _train_split(self, trainer, step_fn, model, inputs, rows, factor, *args, **kwargs):
        num_items = kwargs.get("num_items_in_batch", args[0] if args else None)
        scaled = internals.loss_scaled_for_ga(trainer, num_items)
        total = label_tokens(inputs) if not scaled else 0
        parts = split_inputs(inputs, factor)
        peak = max(tokens_of(chunk) for _, chunk in parts)
        loss = None
        for index, chunk in parts:
            self.rows_now = tuple(rows[i] for i in index)
            if scaled:  # sum of token losses / the step's num_items_in_batch: a chunk's share adds up
                part = step_fn(model, chunk, *args, **kwargs)
            else:  # mean over the micro-batch's label tokens / GA: weight each chunk's mean by its share
                share = label_tokens(chunk) / max(total, 1)
                divisor = trainer.current_gradient_accumulation_steps / share if share else float("inf")
                with internals.gradient_accumulation_divisor(trainer, divisor):
                    part = step_fn(model, chunk, *args, **kwargs)
            part = part.detach()
            loss = part if loss is None else loss + part
        done = self._split
        done["micro_batches"] = done.get("micro_batches", 0) + 1
        done["chunks"] = done.get("chunks", 0) + len(parts)
        done["rows"] = done.get("rows", 0) + len(rows)
        done["max_chunk_tokens"] = max(done.get("max_chunk_tokens", 0), peak)
        done["factor"] = factor
        return loss, peak

    def step_ended(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The finished step's (tokens each micro-batch trained at once, rows skipped); its proof events; the
        next step starts clean."""
        tokens = tuple(m.peak for m in self.in_flight)
        skipped = tuple(self.skipped)
        if self._split:
            self.journal.emit(Event.CULPRIT_SPLIT.value, attempt=self.attempt, step=step, **self._split)
        if self._unsplittable is not None:
            self.journal.emit(Event.CULPRIT_UNSPLITTABLE.value, attempt=self.attempt, step=step,
                              factor=self.order.factor(step), why=self._unsplittable)
        if skipped:
            self.journal.emit(Event.ROWS_QUARANTINED.value, attempt=self.attempt, step=step, rows=list(skipped))
        self.in_flight, self.skipped, self._split, self._unsplittable = [], [], {}, None
        return tokens, skipped

    def failure_line(self, step: int, kind: str) -> dict[str, Any]:
        """The in-flight step as the supervisor reads it (policy.culprit.InFlight)."""
        from oomguard.guard.resume.ledger import compress

        failing = self.in_flight[-1].unsplittable if self.in_flight else None
        return {"attempt": self.attempt, "step": step, "kind": kind, "factor": self.order.factor(step),
                "unsplittable": self._unsplittable or failing,
                "micro_batches": [{"rows": compress(m.rows), "tokens": m.tokens, "finite": _finite(m.loss)}
                                  for m in self.in_flight]}


def _detached(loss: Any) -> Any:
    return loss.detach() if isinstance(loss, torch.Tensor) else loss


def _zero_loss(model) -> torch.Tensor:
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = None
    return torch.zeros((), device=device)


def _finite(loss: Any) -> bool | None:
    """Whether a micro-batch's loss was finite (one sync, only on the way down); None: it never finished."""
    if not isinstance(loss, torch.Tensor):
        return None
    try:
        return bool(torch.isfinite(loss.detach().float()).all())
    except RuntimeError:  # a CUDA error state: not evidence
        return None


_steps: "weakref.WeakKeyDictionary[Any, CulpritStep]" = weakref.WeakKeyDictionary()
_current: list[CulpritStep] = []  # the newest installed (one trainer trains at a time in a process)


def install_culprit(trainer, run_dir: str | Path | None, *, rank: int = 0, attempt: int = 1,
                    order: CulpritOrder | None = None) -> CulpritStep:
    step = CulpritStep(order_from_env() if order is None else order, run_dir, rank=rank, attempt=attempt)
    _steps[trainer] = step
    _current[:] = [step]
    return step


def culprit_of(trainer) -> CulpritStep | None:
    return _steps.get(trainer)


def current_rows() -> tuple[int, ...]:
    """Rows of the micro-batch training now (the data-dependent faults read it); () outside a step."""
    return _current[0].rows_now if _current else ()


def record_failure(trainer, exc: BaseException) -> Path | None:
    """Write the in-flight step of ``trainer`` (failed with ``exc``) to the in-flight ledger; never raises."""
    step = culprit_of(trainer)
    if step is None or step.run_dir is None or not step.in_flight:
        return None
    from oomguard.guard.callbacks.nan import NonFiniteLossError

    message = f"{type(exc).__name__}: {exc}"
    kind = "nan" if isinstance(exc, NonFiniteLossError) else "oom" if protocol.is_oom(
        f"{type(exc).__module__}.{type(exc).__qualname__}", message) else "other"
    try:
        path = in_flight_file(step.run_dir, step.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        protocol.append_jsonl(path, step.failure_line(trainer.state.global_step + 1, kind))
        return path
    except Exception:  # evidence is best effort: the error record and exit stay the child's own
        return None
