"""RewarmCallback: after a NaN rollback, re-enter warm-up (issue 19, the nan_loss ladder's ``rewarm_steps``).

The resumed attempt's first N optimizer steps train at (k+1)/N of the learning rate the schedule gives
for that step, k = 0 … N-1: the weights went back to a finite checkpoint, and a full-size first update
from there is what diverged. The scale goes onto the optimizer's param groups at the step's start and
comes off right after ``optimizer.step()`` (before the scheduler's step), so any scheduler, chainable
or not, sees its own values. One ``rewarm`` event (rank 0) gives the learning rate the optimizer really
held on the first step next to the schedule's: the supervisor checks the change from it (Trust rule 3).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from oomguard.guard.writer import EventWriter
from oomguard.protocol import Event

__all__ = ["RewarmCallback", "rewarm_factor"]


def rewarm_factor(k: int, steps: int) -> float:
    """The share of the schedule's rate at the attempt's k-th optimizer step (0-based). Pure."""
    return 1.0 if steps <= 0 or k >= steps else (k + 1) / steps


class RewarmCallback(TrainerCallback):
    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0, attempt: int = 1, steps: int = 0):
        self.journal = EventWriter(run_dir, rank)
        self.attempt, self.steps = attempt, steps
        self.start: int | None = None
        self.scheduled: list[float] | None = None  # the groups' rates before this step's scale

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = state.global_step

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        k = state.global_step - (self.start or 0)
        if optimizer is None or not self.steps or k >= self.steps:
            return
        factor = rewarm_factor(k, self.steps)
        self.scheduled = [g["lr"] for g in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self.scheduled):
            group["lr"] = lr * factor
        if k == 0:
            self.journal.emit(Event.REWARM.value, attempt=self.attempt, step=state.global_step + 1,
                              steps=self.steps, factor=factor, lr=[g["lr"] for g in optimizer.param_groups],
                              scheduled=list(self.scheduled))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and self.scheduled is not None:
            for group, lr in zip(optimizer.param_groups, self.scheduled):
                group["lr"] = lr  # the scheduler's step sees its own rate
            self.scheduled = None
