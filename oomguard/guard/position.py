"""The data position after a resume whose effective batch changed (DESIGN §5, §7; issue 5 case c).

HF resumes by skipping ``global_step × accumulation`` batches of the *new* dataloader: exact only
when ``per-device batch × accumulation`` is unchanged. When a rung must change it (per-device batch
already 1), HF re-trains or skips samples. Here the position is derived from the ledger instead:

- the interrupted epoch's order (on file in the ledger) minus the samples its steps ≤ the
  checkpoint's step consumed is what the train sampler yields first (exactly once, order kept);
- HF's own skip is turned off (``ignore_data_skip``), so nothing is skipped twice;
- with ``max_steps`` the sample budget is kept: the steps left are recounted at the new effective
  batch (the LR schedule spans the new step count; the LR per step is not rescaled);
- one ``effective_batch_changed`` event states the change, the samples seen and the step count.

What HF's loop cannot do exactly is said in the event's ``warnings`` (never silently).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from oomguard.guard.ledger import StepSamples, ledger_file, order_file, read_ledger, read_orders, \
    remaining_in_epoch
from oomguard.protocol import CKPT_TRAINER_STATE, CKPT_TRAINING_ARGS


@dataclasses.dataclass(frozen=True)
class Batch:
    """Samples per optimizer step on one rank = ``per_device × accumulation``."""

    per_device: int
    accumulation: int

    @property
    def effective(self) -> int:
        return self.per_device * self.accumulation


@dataclasses.dataclass(frozen=True)
class PositionPlan:
    step: int  # the checkpoint's global step
    epoch: int  # the epoch it stopped in (the ledger's)
    old: Batch
    new: Batch
    seen_total: int  # samples consumed by steps ≤ step, this rank
    seen_in_epoch: int
    remaining: tuple[int, ...]  # the epoch's unseen rows, in its order
    max_steps: tuple[int, int] | None  # (before, after) when the run is bounded by max_steps
    warnings: tuple[str, ...] = ()

    def event(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "effective_batch": [self.old.effective, self.new.effective],
                "per_device_train_batch_size": [self.old.per_device, self.new.per_device],
                "gradient_accumulation_steps": [self.old.accumulation, self.new.accumulation],
                "samples_seen": self.seen_total, "samples_seen_in_epoch": self.seen_in_epoch,
                "remaining_in_epoch": len(self.remaining),
                "max_steps": list(self.max_steps) if self.max_steps else None,
                "lr_rule": "LR per step unchanged; the schedule spans the new step count",
                "warnings": list(self.warnings)}


class PositionUnknown(ValueError):
    """The ledger cannot say where the data stood at the checkpoint's step."""


def plan_position(entries: Sequence[StepSamples], orders: dict[int, Sequence[int]], *, step: int, old: Batch,
                  new: Batch, max_steps: int, dataset_rows: int) -> PositionPlan:
    """Where the data continues after ``step`` with ``new`` instead of ``old``. Pure.

    Raises PositionUnknown when the ledger lacks step ``step`` or its epoch's order.
    """
    done = [e for e in entries if e.step <= step]
    last = next((e for e in done if e.step == step), None)
    if last is None:
        raise PositionUnknown(f"the ledger has no record of step {step} (it has {len(done)} steps up to it)")
    if last.epoch not in orders:
        raise PositionUnknown(f"the ledger has no sampler order for epoch {last.epoch}")
    in_epoch = Counter(i for e in done if e.epoch == last.epoch for i in e.samples)
    remaining = tuple(remaining_in_epoch(orders[last.epoch], in_epoch))
    bounded = None
    if max_steps > 0:  # keep the sample budget: the steps left, counted at the new effective batch
        budget = (max_steps - step) * old.effective
        bounded = (max_steps, step + math.ceil(budget / new.effective))
    warnings = _inexact(step=step, epoch=last.epoch, remaining=len(remaining), new=new,
                        steps_left=(bounded[1] - step) if bounded else None, dataset_rows=dataset_rows)
    return PositionPlan(step=step, epoch=last.epoch, old=old, new=new, seen_total=sum(len(e.samples) for e in done),
                        seen_in_epoch=sum(in_epoch.values()), remaining=remaining, max_steps=bounded,
                        warnings=tuple(warnings))


def _inexact(*, step: int, epoch: int, remaining: int, new: Batch, steps_left: int | None,
             dataset_rows: int) -> list[str]:
    """What HF's epoch loop will do differently from the ledger's position (stated, not hidden)."""
    warnings = []
    batches = math.ceil(dataset_rows / new.per_device)
    per_epoch = max(math.ceil(batches / new.accumulation), 1)
    if step // per_epoch != epoch:
        warnings.append(f"HF counts step {step} as epoch {step // per_epoch} at the new batch, the ledger as "
                        f"epoch {epoch}: the number of later epochs HF runs may differ by one")
    reaches_end = steps_left is None or steps_left * new.effective >= remaining
    if reaches_end and remaining % new.effective:
        warnings.append(f"the epoch's last {remaining % new.effective} samples form a short step, which HF "
                        "takes only at its own epoch end: they are trained without an optimizer step")
    return warnings


def checkpoint_args(checkpoint: Path):
    """The TrainingArguments a checkpoint was trained with (its ``training_args.bin``), or None if unreadable."""
    import torch

    try:  # our own checkpoint: the pickled TrainingArguments HF wrote beside the weights
        return torch.load(checkpoint / CKPT_TRAINING_ARGS, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a missing or foreign file means "unknown", not a failure
        return None


def checkpoint_batch(checkpoint: Path) -> Batch | None:
    """The batch a checkpoint was trained with, or None if unreadable."""
    try:
        args = checkpoint_args(checkpoint)
        return Batch(int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps))
    except (AttributeError, TypeError, ValueError):
        return None


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
                            "resume use packing_strategy 'bfd' with the built-in recipe, turn packing off, or "
                            "order the policy's batch rung before its max_seq_length rung")
    return change


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / CKPT_TRAINER_STATE).read_text())["global_step"])


def apply_position(trainer, ledger, checkpoint: Path, run_dir: Path, rank: int, journal) -> PositionPlan | None:
    """Continue at the exact next sample when the effective batch changed; None when it did not."""
    old = checkpoint_batch(checkpoint)
    args = trainer.args
    new = Batch(int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps))
    if old is None or old.effective == new.effective or not hasattr(trainer.train_dataset, "__len__"):
        return None  # unchanged: HF's own skip is exact (checked by test_resume_samples)
    step = checkpoint_step(checkpoint)
    try:
        plan = plan_position(read_ledger(ledger_file(run_dir, rank)), read_orders(order_file(run_dir, rank)),
                             step=step, old=old, new=new, max_steps=int(args.max_steps),
                             dataset_rows=len(trainer.train_dataset))
    except PositionUnknown as exc:
        journal.emit("resume_position_unknown", checkpoint=str(checkpoint), step=step,
                     effective_batch=[old.effective, new.effective],
                     detail=f"{exc}; HF's own skip is used, which re-trains or skips samples when the effective "
                            "batch changes: keep the ledger under the run dir to resume sample-exactly")
        return None
    args.ignore_data_skip = True  # the sampler starts at the exact next sample: HF must not skip as well
    if plan.max_steps:
        args.max_steps = plan.max_steps[1]
    if plan.remaining:
        ledger.resume_epoch, ledger.resume_order = plan.epoch, list(plan.remaining)
    else:  # the epoch ended at this step: an empty first pass would make HF stop training
        ledger.resume_epoch = plan.epoch + 1
    journal.emit("effective_batch_changed", checkpoint=str(checkpoint), **plan.event())
    return plan


# --- a packed dataset re-packed at another max_length (issue 5 case b) ------------------------------------
EXAMPLE_ID = "oomguard_example_id"  # the column that carries each raw example's index through TRL's preparation
EXACT_STRATEGIES = ("bfd",)  # each example lands whole in one row; "wrapped"/"bfd_split" cut examples across rows


def tokenized_examples(trainer, raw):
    """The raw dataset tokenized as the trainer would, untruncated and unpacked, with :data:`EXAMPLE_ID`."""
    args = copy.copy(trainer.args)
    args.max_length, args.shuffle_dataset = None, False  # lengths before packing truncates; raw order kept
    with_id = raw.add_column(EXAMPLE_ID, list(range(len(raw))))
    return trainer._prepare_dataset(with_id, trainer.processing_class, args, False, None, "oomguard-ledger")


def packed_rows(tokens, max_length: int, args) -> list[tuple[int, ...]]:
    """The example ids of each row TRL's packing makes from ``tokens`` at ``max_length``.

    Packing looks only at lengths, so packing rows of ``[id] * length`` spells out which examples each
    real row holds (``seq_lengths`` marks where each starts). Shuffles are replayed as TRL does them.
    """
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    dummy = [[int(i)] * len(ids) for i, ids in zip(tokens[EXAMPLE_ID], tokens["input_ids"])]
    dataset = Dataset.from_dict({"input_ids": dummy, "labels": dummy})
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    packed = pack_dataset(dataset, max_length, args.packing_strategy, {"num_proc": args.dataset_num_proc})
    if args.shuffle_dataset:
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
    raw, args, step = getattr(trainer, "_oomguard_raw_dataset", None), trainer.args, checkpoint_step(checkpoint)
    try:
        if raw is None or args.packing_strategy not in EXACT_STRATEGIES:
            raise PositionUnknown(f"the raw dataset is not reachable (trainer._oomguard_raw_dataset) or the packing "
                                  f"strategy {args.packing_strategy!r} is not one of {EXACT_STRATEGIES}")
        tokens = tokenized_examples(trainer, raw)
        new_rows = packed_rows(tokens, change[1], args)
        why = rows_mismatch(new_rows, tokens, trainer.train_dataset, change[1])
        if why:
            raise PositionUnknown(f"the re-packing does not reproduce TRL's rows at max_length {change[1]}: {why}")
        plan = plan_packed(read_ledger(ledger_file(run_dir, rank)), read_orders(order_file(run_dir, rank)),
                           packed_rows(tokens, change[0], args), step=step, max_length=change)
        first = _append_rows(trainer, tokens, plan.remaining, change[1])
    except PositionUnknown as exc:
        state_packed_length_change(trainer, checkpoint, journal, reason=str(exc))
        return False
    args.ignore_data_skip = True  # the sampler starts at the exact next example: HF must not skip as well
    if first:
        ledger.resume_epoch, ledger.resume_order = plan.epoch, list(range(len(new_rows), len(new_rows) + len(first)))
    else:  # the epoch ended at this step: an empty first pass would make HF stop training
        ledger.resume_epoch = plan.epoch + 1
    journal.emit("packed_position_reindexed", checkpoint=str(checkpoint), step=step, epoch=plan.epoch,
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
    from trl.data_utils import pack_dataset

    if not examples:
        return []
    position = {int(i): k for k, i in enumerate(tokens[EXAMPLE_ID])}
    subset = tokens.select([position[i] for i in examples])
    args, full = trainer.args, trainer.train_dataset
    quiet = copy.copy(args)
    quiet.shuffle_dataset = False  # the order of the unseen examples is the ledger's
    rows = packed_rows(subset, max_length, quiet)
    packed = pack_dataset(subset.select_columns(["input_ids", "labels"]), max_length, args.packing_strategy,
                          {"num_proc": args.dataset_num_proc})
    why = rows_mismatch(rows, subset, packed, max_length)
    if why:
        raise PositionUnknown(f"packing the unseen examples at max_length {max_length} does not match: {why}")
    trainer.train_dataset = concatenate_datasets([full, packed.cast(full.features)])
    make_sampler = trainer._get_train_sampler
    trainer._get_train_sampler = lambda *a, **k: make_sampler(full)  # later epochs: the re-packed rows only
    return rows
