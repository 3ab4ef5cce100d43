"""PressureCheckpointCallback: save once when memory growth will hit the cap within K steps."""

from __future__ import annotations

from transformers import TrainerCallback

from oomguard.guard.callbacks.monitor import MemoryMonitorCallback

__all__ = ["PressureCheckpointCallback"]


class PressureCheckpointCallback(TrainerCallback):
    """Reads the growth projection of a MemoryMonitorCallback (placed before it in the list).

    ``within_steps`` is generous because the projection runs late: on an H200 a leak of
    960 MiB/step was projected to hit the cap at step 15 and died at step 12 (peaks grow by the
    leak, the failing allocation comes on top). An adapter checkpoint costs ~0.25 s.
    """

    def __init__(self, monitor: MemoryMonitorCallback, *, within_steps: int = 10):
        if within_steps < 1:
            raise ValueError(f"within_steps={within_steps} must be >= 1 (optimizer steps of warning)")
        self.monitor = monitor
        self.within_steps = within_steps
        self.saved_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        growth = self.monitor.growth
        if self.saved_at is not None or growth is None or growth.steps_left is None:
            return
        if growth.steps_left <= self.within_steps:
            control.should_save = True
            self.saved_at = state.global_step
            self.monitor.journal.emit("pressure_save", step=state.global_step, projected_step=growth.projected_step,
                                      slope_bytes_per_step=growth.slope, cap=growth.cap)
        return control
