"""PhaseTrackerCallback: where in the step the child is, for the error record."""

from __future__ import annotations

import contextlib
from typing import Iterator

from transformers import TrainerCallback

from oomguard.protocol import Phase

__all__ = ["PhaseTrackerCallback"]


class PhaseTrackerCallback(TrainerCallback):
    """startup → checkpoint_load → forward_backward → optimizer_step → …; eval and save are set
    by ``guarded_train``'s wrappers around ``trainer.evaluate`` / ``trainer._save_checkpoint``
    (``on_save`` fires only after the save is done)."""

    def __init__(self) -> None:
        self.phase = Phase.STARTUP

    @contextlib.contextmanager
    def during(self, phase: Phase) -> Iterator[None]:
        """Set ``phase`` for a block; on an exception the phase stays (the record reads it)."""
        before, self.phase = self.phase, phase
        yield
        self.phase = before

    def on_step_begin(self, args, state, control, **kwargs):
        self.phase = Phase.FORWARD_BACKWARD

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.phase = Phase.OPTIMIZER_STEP

    def on_step_end(self, args, state, control, **kwargs):
        # global_step now names the weights: between steps (logging, the next batch's
        # transfer) a failure is a forward/backward one and an emergency save is exact.
        self.phase = Phase.FORWARD_BACKWARD
