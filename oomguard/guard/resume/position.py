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

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

from oomguard.guard.resume.ledger import (
    StepSamples,
    ledger_file,
    order_file,
    read_ledger,
    read_orders,
    remaining_in_epoch,
)
from oomguard.protocol import CKPT_TRAINER_STATE, CKPT_TRAINING_ARGS

__all__ = ["Batch", "PositionPlan", "PositionUnknown", "apply_position", "checkpoint_args", "checkpoint_batch",
           "checkpoint_step", "plan_position"]


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
    seen_total: int  # samples consumed by steps ≤ step (every rank's, when several share the sampler)
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
    # several ranks: the rows seen are every rank's (each ledger holds its own share of each step), and
    # the rest of the epoch, the same on every rank, is dealt to them again by the sampler's shard
    ranks = range(max(int(getattr(args, "world_size", 1) or 1), 1)) if ledger.sharded else (rank,)
    try:
        plan = plan_position([e for r in ranks for e in read_ledger(ledger_file(run_dir, r))],
                             read_orders(order_file(run_dir, rank)),
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
