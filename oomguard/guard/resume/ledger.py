"""The ledger of samples seen: which training-set rows each optimizer step consumed, per rank.

``<run_dir>/ledger/rank<k>.jsonl``, one line per optimizer step:
``{"step": 7, "attempt": 2, "epoch": 0, "samples": [[412, 1], [17, 3]], "tokens": [512, 384]}`` — the rows
(indices of the trainer's ``train_dataset``) in the order consumed, as runs ``[first, length]`` of
consecutive indices (compact for sequential samplers; a shuffled order costs one pair per row), and the
tokens (``input_ids.numel()``) of each micro-batch. Rows the supervisor quarantined (issue 19,
:mod:`oomguard.guard.culprit`) were handed out but not trained: they are in ``samples`` (the position
counts them) and again in ``skipped``; the rows a step trained are ``samples`` less ``skipped``.

A step that a later attempt trains again (it resumed from an older checkpoint) is superseded
by that attempt's line: :func:`read_ledger` keeps the newest attempt's record per step.

Recording (:class:`SampleLedgerCallback`): the train dataloader's sampler is wrapped to log
the indices it hands out, in order; every micro-batch the trainer consumes takes the next
``batch size`` of them. Prefetching and dataloader workers do not matter: the stream's order
is the consumption order. On a resume HF skips batches of the new sampler stream by drawing
them; the callback starts its pointer past those.

Several ranks (torchrun, accelerate): every rank draws the whole sampler order, and accelerate's
``BatchSamplerShard`` deals its batches to the ranks in turn (or slices each, with ``split_batches``).
The stream is then what the shard deals to *this* rank, recorded at the shard; the sampler's full
order still goes to the orders file. Each rank's ledger holds the rows that rank trained.

Each epoch's full sampler order is kept too, in ``rank<k>.orders.jsonl`` (one line per epoch and
attempt), so a resume whose effective batch changed can continue at the exact next sample of the
interrupted epoch (:mod:`oomguard.guard.resume.position` sets :attr:`SampleLedgerCallback.resume_order`).
The ``epoch`` of a step is the epoch whose order handed out its first sample (HF's own epoch count
goes wrong once the effective batch changes).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from transformers import TrainerCallback

from oomguard import protocol
from oomguard.guard import trainer_patches as internals
from oomguard.guard.culprit import CulpritStep, install_culprit

__all__ = ["SampleLedgerCallback", "StepSamples", "append_order", "append_step", "compress", "expand",
           "install_ledger", "ledger_file", "ledger_of", "order_file", "read_ledger", "read_orders",
           "remaining_in_epoch", "samples_seen"]


@dataclass(frozen=True)
class StepSamples:
    step: int
    attempt: int
    epoch: int
    samples: tuple[int, ...]
    tokens: tuple[int, ...] = ()  # per micro-batch, input_ids.numel()
    skipped: tuple[int, ...] = ()  # quarantined rows among samples: handed out, not trained

    @property
    def trained(self) -> tuple[int, ...]:
        """``samples`` less the ``skipped`` rows (each skipped occurrence once)."""
        left = Counter(self.skipped)
        out = []
        for i in self.samples:
            if left[i] > 0:
                left[i] -= 1
            else:
                out.append(i)
        return tuple(out)


def compress(indices: Sequence[int]) -> list[list[int]]:
    """[5, 6, 7, 2, 3] -> [[5, 3], [2, 2]]: runs of consecutive indices, order kept. Pure."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([int(i), 1])
    return runs


def expand(runs: Iterable[Sequence[int]]) -> list[int]:
    """The inverse of :func:`compress`."""
    return [first + k for first, length in runs for k in range(length)]


def ledger_file(run_dir: str | Path, rank: int = 0) -> Path:
    return protocol.ledger_file(run_dir, rank)


def order_file(run_dir: str | Path, rank: int = 0) -> Path:
    return protocol.ledger_file(run_dir, rank, kind="orders")


def append_order(path: Path, *, epoch: int, attempt: int, order: Sequence[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    protocol.append_jsonl(path, {"epoch": epoch, "attempt": attempt, "order": compress(order)})


def read_orders(path: str | Path) -> dict[int, tuple[int, ...]]:
    """epoch -> the sampler order of that epoch (the newest attempt's record wins)."""
    newest: dict[int, tuple[int, tuple[int, ...]]] = {}
    for line in protocol.read_jsonl(path):
        try:
            epoch, attempt, order = int(line["epoch"]), int(line["attempt"]), tuple(expand(line["order"]))
        except (KeyError, TypeError, ValueError):
            continue
        if epoch not in newest or attempt >= newest[epoch][0]:
            newest[epoch] = (attempt, order)
    return {e: order for e, (_, order) in newest.items()}


def append_step(to: str | Path | protocol.Appender, entry: StepSamples) -> None:
    """One step's line, to a ledger file (by path) or to one kept open (the callback's, every step)."""
    line = {"step": entry.step, "attempt": entry.attempt, "epoch": entry.epoch, "samples": compress(entry.samples)}
    if entry.tokens:
        line["tokens"] = list(entry.tokens)
    if entry.skipped:
        line["skipped"] = compress(entry.skipped)
    out = to if isinstance(to, protocol.Appender) else protocol.Appender(to)
    try:
        out.append(line)
    except FileNotFoundError:  # the run's first line (or its folder was removed): make the folder, once
        Path(out.path).parent.mkdir(parents=True, exist_ok=True)
        out.append(line)


def read_ledger(path: str | Path) -> list[StepSamples]:
    """Steps in order; a step recorded by several attempts keeps the newest attempt's record."""
    newest: dict[int, StepSamples] = {}
    for line in protocol.read_jsonl(path):
        try:
            entry = StepSamples(int(line["step"]), int(line["attempt"]), int(line.get("epoch", 0)),
                                tuple(expand(line["samples"])), tuple(int(t) for t in line.get("tokens") or ()),
                                tuple(expand(line.get("skipped") or ())))
        except (KeyError, TypeError, ValueError):
            continue  # a foreign or torn line is not evidence
        if entry.step not in newest or entry.attempt >= newest[entry.step].attempt:
            newest[entry.step] = entry
    return [newest[s] for s in sorted(newest)]


def samples_seen(entries: Iterable[StepSamples], *, up_to_step: int | None = None) -> Counter[int]:
    """The multiset of rows consumed by steps ≤ ``up_to_step`` (all steps when None)."""
    seen: Counter[int] = Counter()
    for e in entries:
        if up_to_step is None or e.step <= up_to_step:
            seen.update(e.samples)
    return seen


def remaining_in_epoch(order: Sequence[int], seen_this_epoch: Counter[int]) -> list[int]:
    """``order`` (an epoch's sampler order) without the rows already consumed in it, order kept. Pure.

    This is the sample-exact position after any rung: derived from samples seen, not from
    ``global_step × batch``.
    """
    left = Counter(seen_this_epoch)
    out = []
    for i in order:
        if left[i] > 0:
            left[i] -= 1
        else:
            out.append(i)
    return out


class _RecordingSampler:
    """Wraps a sampler: yields what it yields (or, once, the ledger's ``resume_order``) and appends
    each index to the ledger's stream; a fresh epoch's full order goes to the orders file."""

    def __init__(self, inner, ledger: "SampleLedgerCallback"):
        self._inner, self._ledger = inner, ledger

    def __iter__(self) -> Iterator[int]:
        ledger = self._ledger
        epoch = ledger.begin_epoch()
        if ledger.resume_order is not None:  # the rest of an interrupted epoch: its order is on file
            order, ledger.resume_order = list(ledger.resume_order), None
        else:
            order = [int(i) for i in self._inner]  # an epoch's order is drawn up front by torch's samplers
            ledger.record_order(epoch, order)
        if ledger.sharded:  # the stream is what the shard deals to this rank (_record_dealt)
            yield from order
            return
        ledger.pass_ends.append(len(ledger.stream) + len(order))
        for i in order:
            ledger.stream.append(i)
            yield i

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:  # set_epoch, data_source, generator …
        return getattr(self._inner, name)


def _batch_size(inputs: Any) -> int | None:
    """Rows in a batch, or None when it cannot be told. Collators return mappings that are not
    dicts (transformers' ``BatchEncoding`` is a ``UserDict``: a wrapped HF Trainer script with
    DataCollatorForLanguageModeling crashed on it, found by scripts/bench_recovery.py)."""
    if not isinstance(inputs, Mapping):
        return None
    for key in ("input_ids", "inputs_embeds", "labels"):
        value = inputs.get(key)
        if value is not None and hasattr(value, "shape"):
            return int(value.shape[0])
    return None


class SampleLedgerCallback(TrainerCallback):
    """Writes one ledger line per optimizer step (see the module doc). Use :func:`install_ledger`."""

    def __init__(self, run_dir: str | Path, *, rank: int = 0, attempt: int = 1):
        self.path = ledger_file(run_dir, rank)
        self._file = protocol.Appender(self.path)  # one line per step, kept open
        self.orders_path = order_file(run_dir, rank)
        self.attempt = attempt
        self.stream: list[int] = []  # indices in the order the sampler handed them out
        self.pointer = 0  # how many of them the trainer has consumed
        self.pending: list[int] = []  # consumed by the step in progress
        self.epoch = 0
        self.epoch_starts: list[tuple[int, int]] = []  # (offset in stream, epoch) per sampler pass
        self.pass_ends: list[int] = []  # offset in stream where each sampler pass ends
        self.first_epoch = 0  # the epoch of this attempt's first sampler pass
        self.resume_epoch: int | None = None  # set with resume_order: the epoch it continues
        self.resume_order: list[int] | None = None  # yielded instead of the sampler's first pass
        self.culprit: CulpritStep | None = None  # the step in flight, split and quarantine (guard.culprit)
        self.sharded = False  # accelerate deals batches to several ranks: the stream is this rank's share
        self.batch_ends: list[int] = []  # sharded: offset in the stream after each batch dealt to this rank

    def begin_epoch(self) -> int:
        """The epoch of a new sampler pass (the first pass is ``first_epoch``, each next one +1)."""
        epoch = self.first_epoch + len(self.epoch_starts)
        self.epoch_starts.append((len(self.stream), epoch))
        return epoch

    def record_order(self, epoch: int, order: Sequence[int]) -> None:
        append_order(self.orders_path, epoch=epoch, attempt=self.attempt, order=order)

    def epoch_at(self, offset: int) -> int | None:
        """The epoch of the sample at ``offset`` in the stream (None before any pass)."""
        found = [epoch for start, epoch in self.epoch_starts if start <= offset]
        return found[-1] if found else None

    def rows_in_batch(self, batch_size: int) -> int:
        """Rows of the next micro-batch when its tensors cannot tell (padding-free packing concatenates
        the rows into one sequence): a full batch, or the rest of the sampler pass (its last batch)."""
        if self.sharded:  # the batch this rank was dealt next says it
            end = next((e for e in self.batch_ends if e > self.pointer), self.pointer + batch_size)
            return end - self.pointer
        end = next((e for e in self.pass_ends if e > self.pointer), self.pointer + batch_size)
        return min(batch_size, end - self.pointer)

    def consumed(self, n: int) -> list[int]:
        """The next ``n`` rows of the stream, taken by the micro-batch now training."""
        taken = self.stream[self.pointer:self.pointer + n]
        if len(taken) < n:
            raise RuntimeError(f"oomguard ledger: the trainer consumed {n} samples but the sampler handed out "
                               f"only {len(taken)} more; the train dataloader was not built by get_train_dataloader")
        self.pending.extend(taken)
        self.pointer += n
        return taken

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.resume_epoch is not None:
            self.first_epoch = self.resume_epoch
        elif state.global_step > 0 and train_dataloader is not None:
            # HF resumes in epoch global_step // steps-per-epoch and, unless ignore_data_skip, draws
            # (and drops) that epoch's trained batches from the new sampler stream
            batches = len(train_dataloader)
            ga = args.gradient_accumulation_steps
            per_epoch = max(batches // ga + int(batches % ga > 0), 1)
            self.first_epoch = state.global_step // per_epoch
            if not args.ignore_data_skip:
                self.pointer = (state.global_step % per_epoch) * ga * args.per_device_train_batch_size

    def on_step_begin(self, args, state, control, **kwargs):
        epoch = self.epoch_at(self.pointer)
        self.epoch = epoch if epoch is not None else int(state.epoch or 0)

    def on_step_end(self, args, state, control, **kwargs):
        tokens, skipped = self.culprit.step_ended(state.global_step) if self.culprit else ((), ())
        append_step(self._file, StepSamples(state.global_step, self.attempt, self.epoch, tuple(self.pending),
                                           tokens, skipped))
        self.pending = []


def install_ledger(trainer, run_dir: str | Path, *, rank: int = 0, attempt: int = 1) -> SampleLedgerCallback:
    """Record samples seen by ``trainer``: wrap its sampler and count each training_step's batch."""
    ledger = SampleLedgerCallback(run_dir, rank=rank, attempt=attempt)
    ledger.culprit = culprit = install_culprit(trainer, run_dir, rank=rank, attempt=attempt)
    make_loader, step = trainer.get_train_dataloader, trainer.training_step

    def get_train_dataloader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)
        holder = _sampler_holder(loader)
        if holder is None:
            raise RuntimeError(f"oomguard ledger: cannot find the sampler of {type(loader).__name__}; "
                               "set OOMGUARD ledger off or use a map-style dataset with a sampler")
        shard = getattr(loader, "batch_sampler", None)
        if shard is not holder and getattr(shard, "num_processes", 1) > 1:
            ledger.sharded = True
            _record_dealt(shard, ledger)
        if not isinstance(holder.sampler, _RecordingSampler):
            holder.sampler = _RecordingSampler(holder.sampler, ledger)
        return loader

    def training_step(model, inputs, *args, **kwargs):
        padding_free = getattr(trainer, "padding_free", False)  # TRL's: the batch's rows are one sequence
        rows = None if padding_free else _batch_size(inputs)
        # unknown batch layout: count the configured batch (wrong only for a short last batch)
        taken = ledger.consumed(ledger.rows_in_batch(internals.train_batch_size(trainer)) if rows is None else rows)
        return culprit.train(trainer, step, model, inputs, taken, *args, **kwargs)

    trainer.get_train_dataloader, trainer.training_step = get_train_dataloader, training_step
    trainer.add_callback(ledger)
    _ledgers[trainer] = ledger
    return ledger


_ledgers: "weakref.WeakKeyDictionary[Any, SampleLedgerCallback]" = weakref.WeakKeyDictionary()


def ledger_of(trainer) -> SampleLedgerCallback | None:
    """The ledger :func:`install_ledger` put on ``trainer``, or None."""
    return _ledgers.get(trainer)


_RECORDING_SHARDS: dict[type, type] = {}


def _record_dealt(shard, ledger: SampleLedgerCallback) -> None:
    """Make accelerate's ``BatchSamplerShard`` (or any batch sampler that deals to ranks) append each
    batch it yields to this rank to the ledger's stream. Its class becomes a recording subclass (the
    DataLoader forbids replacing its batch sampler); everything else it does is unchanged."""
    base = type(shard)
    if base not in _RECORDING_SHARDS.values():
        if base not in _RECORDING_SHARDS:
            def __iter__(self):
                for batch in base.__iter__(self):
                    recorder = self._oomguard_ledger
                    recorder.stream.extend(int(i) for i in batch)
                    recorder.batch_ends.append(len(recorder.stream))
                    yield batch

            _RECORDING_SHARDS[base] = type(f"Recording{base.__name__}", (base,), {"__iter__": __iter__})
        shard.__class__ = _RECORDING_SHARDS[base]
    shard._oomguard_ledger = ledger


def _sampler_holder(loader):
    """The batch sampler object whose ``.sampler`` yields dataset indices (accelerate nests it)."""
    current = getattr(loader, "batch_sampler", None)
    for _ in range(4):
        if current is None:
            return None
        if hasattr(current, "sampler") and not hasattr(current, "batch_sampler"):
            return current
        current = getattr(current, "batch_sampler", None)
    return None
