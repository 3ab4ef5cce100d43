"""HeartbeatCallback: touch ``<run_dir>/heartbeat`` (rank k: ``heartbeat.rank<k>``) so hangs show, and
journal one ``step`` event per completed optimizer step, one ``trainer_log`` event per Trainer log and
one ``checkpoint_saved`` event per regular checkpoint.

The events are the measured progress the supervisor and the report read (issue 14): each is one
``O_APPEND`` line to a file kept open, cheap next to an optimizer step. The heartbeat moves at most every
``BEAT_EVERY_S`` (the supervisor's hang timeout is seconds to minutes; a step of tens of milliseconds
need not touch the file each time, issue 17).
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from oomguard import protocol
from oomguard.guard.writer import EventWriter

__all__ = ["HeartbeatCallback", "heartbeat_path", "numeric_logs"]

BEAT_EVERY_S = 0.5  # seconds: the heartbeat's resolution (the policy's hang_timeout_s is far longer)
_OWN_PREFIX = "oomguard/"  # the guard's own metrics, added to the same logs dict by its other callbacks


def heartbeat_path(run_dir: str | Path, rank: int) -> Path:
    return protocol.rank_file(Path(run_dir) / protocol.HEARTBEAT, rank)  # heartbeat, heartbeat.rank<k>


def numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The numbers the trainer logged (``loss``, ``learning_rate``, ``grad_norm`` …) as floats (a NaN stays
    NaN); bools, text and the guard's own ``oomguard/*`` entries are left out. Pure."""
    out: dict[str, float] = {}
    for name, value in (logs or {}).items():
        if str(name).startswith(_OWN_PREFIX) or isinstance(value, bool):
            continue
        if hasattr(value, "item") and not isinstance(value, numbers.Number):
            try:
                value = value.item()  # a 0-d tensor or numpy scalar
            except Exception:  # noqa: BLE001 - a value we cannot read is not a number
                continue
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[str(name)] = float(value)
    return out


class HeartbeatCallback(TrainerCallback):
    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0, attempt: int = 1):
        self.path = heartbeat_path(run_dir, rank) if run_dir else None
        self._beat = protocol.Beat(self.path) if self.path is not None else None  # kept open: no path lookup
        self._beaten = -BEAT_EVERY_S  # time.monotonic() of the last beat
        self.events = EventWriter(run_dir, rank)
        self.attempt = attempt

    def beat(self, *, now: bool = False) -> None:
        """Move the heartbeat, unless it moved less than BEAT_EVERY_S ago (``now``: whatever the time)."""
        t = time.monotonic()
        if self._beat is None or (not now and t - self._beaten < BEAT_EVERY_S):
            return
        self._beaten = t
        try:
            self._beat.touch()
        except OSError:
            pass  # a missed beat is better than a dead run; the supervisor waits hang_timeout

    def on_train_begin(self, args, state, control, **kwargs):
        self.beat(now=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.beat()
        max_steps = getattr(state, "max_steps", None)
        epoch = getattr(state, "epoch", None)
        self.events.emit(protocol.EVENT_STEP, step=int(state.global_step),
                         max_steps=int(max_steps) if max_steps and max_steps > 0 else None,
                         epoch=round(float(epoch), 6) if epoch is not None else None, attempt=self.attempt)

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers_logged = numeric_logs(logs)
        if numbers_logged:
            self.events.emit(protocol.EVENT_TRAINER_LOG, step=int(state.global_step), logs=numbers_logged)

    def on_save(self, args, state, control, **kwargs):
        """``checkpoint_saved`` for each regular save (HF calls ``on_save`` right after ``_save_checkpoint``);
        rank 0 only: every rank gets the call, one directory is written."""
        if self.events.rank != 0:
            return
        path = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if path.is_dir():
            self.events.emit(protocol.Event.CHECKPOINT_SAVED.value, step=int(state.global_step), path=str(path))

    def on_substep_end(self, args, state, control, **kwargs):
        self.beat()  # long gradient accumulation is progress too

    def on_prediction_step(self, args, state, control, **kwargs):
        self.beat()
