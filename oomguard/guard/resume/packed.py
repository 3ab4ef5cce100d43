"""The data position after a ``max_length`` change with packing on (DESIGN §5, §7; issue 5 case b).

TRL re-packs the dataset at the new length, so the rows of the checkpoint's run hold other examples
than the new rows, and HF's skip of ``global_step × accumulation`` batches lands on other examples.
With the raw training dataset (captured by the bootstrap when the Trainer was built,
:mod:`oomguard.guard.resume.raw_data`) the examples each old row held are known: the interrupted
epoch's unseen examples are packed at the new length and trained first, exactly once. Where that
cannot be done, a ``resume_position_inexact`` event says so.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from pathlib import Path
from typing import Sequence

from oomguard.guard import trainer_patches as internals
from oomguard.guard.resume.ledger import (
    StepSamples,
    ledger_file,
    order_file,
    read_ledger,
    read_orders,
    remaining_in_epoch,
)
from oomguard.guard.resume.position import PositionUnknown, checkpoint_args, checkpoint_step
from oomguard.guard.resume.raw_data import raw_dataset

__all__ = ["EXACT_STRATEGIES", "EXAMPLE_ID", "PackedPlan", "apply_packed_position", "packed_length_change",
           "packed_rows", "plan_packed", "rows_mismatch", "state_packed_length_change", "tokenized_examples"]


def packed_length_change(old_args, new_args) -> tuple[int, int] | None:
    """(old, new) ``max_length`` when a packed dataset is re-packed at another length, else None. Pure."""
    old_length, new_length = getattr(old_args, "max_length", None), getattr(new_args, "max_length", None)
    if not getattr(new_args, "packing", False) or old_length is None or old_length == new_length:
        return None
    return int(old_length), int(new_length)


def state_packed_length_change(trainer, checkpoint: Path, journal, *, reason: str = "") -> tuple[int, int] | None:
    """Say so when a ``max_length`` change re-packed the data and :func:`apply_packed_position` could not
    map the examples seen: HF's resume is then not sample-exact.

    The ledger records rows of the packed dataset; at another length the rows hold other examples,
    and HF skips ``global_step × accumulation`` batches of the *new* rows (DESIGN §7), re-training
    some examples and skipping others. The resume goes on with HF's skip and the journal states it.
    """
    change = packed_length_change(checkpoint_args(checkpoint), trainer.args)
    if change is not None:
        journal.emit("resume_position_inexact", checkpoint=str(checkpoint), step=checkpoint_step(checkpoint),
                     max_length=list(change), packing=True, reason=reason,
                     detail=f"max_length changed {change[0]} -> {change[1]} with packing on and the examples seen "
                            "could not be mapped to the new rows (see reason): HF's skip of the trained batches "
                            "lands on other examples (some are trained twice, some skipped); for a sample-exact "
                            "resume use packing_strategy 'bfd' and build the Trainer under oomguard (the bootstrap "
                            "keeps the raw train_dataset), turn packing off, or "
                            "order the policy's batch rung before its max_seq_length rung")
    return change


EXAMPLE_ID = "oomguard_example_id"  # the column that carries each raw example's index through TRL's preparation
EXACT_STRATEGIES = ("bfd",)  # each example lands whole in one row; "wrapped"/"bfd_split" cut examples across rows


def tokenized_examples(trainer, raw):
    """The raw dataset tokenized as the trainer would, untruncated and unpacked, with :data:`EXAMPLE_ID`."""
    args = copy.copy(trainer.args)
    args.max_length, args.shuffle_dataset = None, False  # lengths before packing truncates; raw order kept
    with_id = raw.add_column(EXAMPLE_ID, list(range(len(raw))))
    return internals.prepare_sft_dataset(trainer, with_id, args, "oomguard-ledger")


def packed_rows(tokens, max_length: int, args) -> list[tuple[int, ...]]:
    """The example ids of each row TRL's packing makes from ``tokens`` at ``max_length``.

    Packing looks only at lengths, so packing rows of ``[id] * length`` spells out which examples each
    real row holds (``seq_lengths`` marks where each starts). Shuffles are replayed as TRL does them.
    """
    from datasets import Dataset

    dummy = [[int(i)] * len(ids) for i, ids in zip(tokens[EXAMPLE_ID], tokens["input_ids"])]
    dataset = Dataset.from_dict({"input_ids": dummy, "labels": dummy})
    shuffle = getattr(args, "shuffle_dataset", False)  # SFTConfig has it from trl 1.x; trl 0.x never shuffled here
    if shuffle:
        dataset = dataset.shuffle(seed=args.seed)
    packed = internals.pack_dataset(dataset, max_length, args.packing_strategy, args.dataset_num_proc)
    if shuffle:
        packed = packed.shuffle(seed=args.seed)
    rows = []
    for ids, lengths in zip(packed["input_ids"], packed["seq_lengths"]):
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        rows.append(tuple(int(ids[s]) for s in starts))
    return rows


def rows_mismatch(rows: Sequence[Sequence[int]], tokens, real, max_length: int) -> str | None:
    """Why ``rows`` (example ids per row) do not spell out the ``real`` packed rows, or None when they do."""
    if len(rows) != len(real):
        return f"{len(rows)} rows mapped, the packed dataset has {len(real)}"
    by_id = dict(zip(tokens[EXAMPLE_ID], tokens["input_ids"]))
    for k, (row, ids) in enumerate(zip(rows, real["input_ids"])):
        if [t for i in row for t in by_id[i][:max_length]] != list(ids):
            return f"row {k} holds other tokens than examples {list(row)}"
    return None


@dataclasses.dataclass(frozen=True)
class PackedPlan:
    step: int
    epoch: int
    max_length: tuple[int, int]
    examples_seen_in_epoch: int
    remaining: tuple[int, ...]  # the epoch's unseen example ids, in the order of its unseen old rows


def plan_packed(entries: Sequence[StepSamples], orders: dict[int, Sequence[int]], old_rows: Sequence[Sequence[int]],
                *, step: int, max_length: tuple[int, int]) -> PackedPlan:
    """The interrupted epoch's unseen examples, from the rows (at the old length) its steps ≤ ``step`` consumed. Pure.

    Raises PositionUnknown when the ledger lacks the step or its epoch's order, or the order is not over ``old_rows``.
    """
    done = [e for e in entries if e.step <= step]
    last = next((e for e in done if e.step == step), None)
    if last is None or last.epoch not in orders:
        raise PositionUnknown(f"the ledger has no record of step {step} or of its epoch's sampler order")
    order = orders[last.epoch]
    if sorted(order) != list(range(len(old_rows))):
        raise PositionUnknown(f"epoch {last.epoch}'s sampler order covers {len(order)} rows, the re-packing at "
                              f"max_length {max_length[0]} makes {len(old_rows)}: the mapping does not match")
    in_epoch = Counter(i for e in done if e.epoch == last.epoch for i in e.samples)
    left = remaining_in_epoch(order, in_epoch)
    return PackedPlan(step=step, epoch=last.epoch, max_length=max_length,
                      examples_seen_in_epoch=sum(len(old_rows[r]) for r in set(in_epoch)),
                      remaining=tuple(i for r in left for i in old_rows[r]))


def _mappable_raw(trainer):
    """The captured raw dataset when the packed rows can be mapped back to it; else PositionUnknown."""
    raw, strategy = raw_dataset(trainer), getattr(trainer.args, "packing_strategy", None)
    if raw is None:
        raise PositionUnknown("the raw training dataset is not known (the Trainer was not built under the "
                              "oomguard bootstrap, nor given to remember_raw_dataset)")
    if not (hasattr(raw, "add_column") and hasattr(raw, "select") and hasattr(raw, "__len__")):
        raise PositionUnknown(f"the raw training dataset is a {type(raw).__name__}, not a map-style datasets.Dataset")
    if strategy not in EXACT_STRATEGIES:
        raise PositionUnknown(f"the packing strategy {strategy!r} is not one of {EXACT_STRATEGIES}")
    return raw


def _plan_reindex(trainer, checkpoint: Path, run_dir: Path, rank: int, change: tuple[int, int]):
    """(tokens, rows at the new length, plan, first rows appended); raises PositionUnknown."""
    args = trainer.args
    try:
        tokens = tokenized_examples(trainer, _mappable_raw(trainer))
    except PositionUnknown:
        raise
    except Exception as exc:  # noqa: BLE001 - a dataset TRL cannot re-tokenize here: stated, not fatal
        raise PositionUnknown(f"re-tokenizing the raw dataset failed: {type(exc).__name__}: {exc}") from None
    new_rows = packed_rows(tokens, change[1], args)
    why = rows_mismatch(new_rows, tokens, trainer.train_dataset, change[1])
    if why:
        raise PositionUnknown(f"the re-packing does not reproduce TRL's rows at max_length {change[1]}: {why}")
    plan = plan_packed(read_ledger(ledger_file(run_dir, rank)), read_orders(order_file(run_dir, rank)),
                       packed_rows(tokens, change[0], args), step=checkpoint_step(checkpoint), max_length=change)
    return new_rows, plan, _append_rows(trainer, tokens, plan.remaining, change[1])


def apply_packed_position(trainer, ledger, checkpoint: Path, run_dir: Path, rank: int, journal) -> bool:
    """After a ``max_length`` change with packing on, train first the interrupted epoch's unseen examples,
    packed at the new length, exactly once. True when done; otherwise False, and the journal says why.

    The unseen examples' rows are appended to ``train_dataset`` and handed out first (the ledger's
    ``resume_order``); the sampler itself keeps drawing from the re-packed dataset, so later epochs are
    unchanged. HF's skip is off (``ignore_data_skip``).
    """
    change = packed_length_change(checkpoint_args(checkpoint), trainer.args)
    if change is None:
        return False
    try:
        new_rows, plan, first = _plan_reindex(trainer, checkpoint, run_dir, rank, change)
    except PositionUnknown as exc:
        state_packed_length_change(trainer, checkpoint, journal, reason=str(exc))
        return False
    args = trainer.args
    args.ignore_data_skip = True  # the sampler starts at the exact next example: HF must not skip as well
    if first:
        ledger.resume_epoch, ledger.resume_order = plan.epoch, list(range(len(new_rows), len(new_rows) + len(first)))
    else:  # the epoch ended at this step: an empty first pass would make HF stop training
        ledger.resume_epoch = plan.epoch + 1
    journal.emit("packed_position_reindexed", checkpoint=str(checkpoint), step=plan.step, epoch=plan.epoch,
                 max_length=list(change), examples_seen_in_epoch=plan.examples_seen_in_epoch,
                 remaining_in_epoch=len(plan.remaining), rows=len(new_rows), first_rows_at=len(new_rows),
                 first_rows=[list(r) for r in first],
                 max_steps=int(args.max_steps) if args.max_steps > 0 else None,
                 detail=f"the interrupted epoch's {len(plan.remaining)} unseen examples, packed at max_length "
                        f"{change[1]} into {len(first)} rows (indices {len(new_rows)}.. of train_dataset, listed in "
                        "first_rows), are trained first, once; later epochs use the re-packed dataset. max_steps "
                        "still counts optimizer steps (a step now holds other examples), it is not recounted")
    return True


def _append_rows(trainer, tokens, examples: Sequence[int], max_length: int) -> list[tuple[int, ...]]:
    """Pack ``examples`` (in that order) at ``max_length`` and append the rows to ``train_dataset``;
    the train sampler stays over the rows it had. Returns the new rows' example ids."""
    from datasets import concatenate_datasets

    if not examples:
        return []
    position = {int(i): k for k, i in enumerate(tokens[EXAMPLE_ID])}
    subset = tokens.select([position[i] for i in examples])
    args, full = trainer.args, trainer.train_dataset
    quiet = copy.copy(args)
    quiet.shuffle_dataset = False  # the order of the unseen examples is the ledger's
    rows = packed_rows(subset, max_length, quiet)
    # the columns the trainer's packed rows have (trl 1.x: input_ids, labels; trl 0.24: no labels)
    columns = [c for c in full.column_names if c in subset.column_names and c != "seq_lengths"]
    packed = internals.pack_dataset(subset.select_columns(columns), max_length,
                                    args.packing_strategy, args.dataset_num_proc)
    why = rows_mismatch(rows, subset, packed, max_length)
    if why:
        raise PositionUnknown(f"packing the unseen examples at max_length {max_length} does not match: {why}")
    trainer.train_dataset = concatenate_datasets([full, packed.cast(full.features)])
    internals.keep_train_sampler_over(trainer, full)  # later epochs: the re-packed rows only
    return rows
