"""The user's own trackers (``report_to``): oomguard's metrics in them, and one tracker run across attempts.

Two things, both through the trainer's own integrations (TensorBoard, W&B, MLflow, … whatever
``report_to`` names), never a tracker client of oomguard's:

- ``oomguard/*`` metrics (attempt, restarts, orders in force, and the memory monitor's figures) are
  added to each ``logs`` dict *before* the integration callbacks read it: the callback sits in
  front of the first of them in the handler. ``trainer_state.json``'s ``log_history`` is appended
  before ``on_log`` runs, so the child's own files stay what the command would have written. With
  no reporting integration in use nothing is added (the console's log lines stay the command's).
- which tracker run this attempt writes (the TensorBoard log dir, the W&B run id, the MLflow run
  id) is reported once per attempt as a ``tracker_observed`` event; the supervisor hands the same
  run to the next attempt through each tracker's own environment variable, so one run spans the
  night (``oomguard/supervisor/trackers.py``).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.integrations import INTEGRATION_TO_CALLBACK

from oomguard.guard.env import GuardEnv
from oomguard.guard.writer import EventWriter
from oomguard.protocol import Event

__all__ = ["TrackerCallback", "install_tracker_callback", "reporting_callbacks",
           "tracker_runs"]

_REPORTING = tuple({cls for cls in INTEGRATION_TO_CALLBACK.values() if isinstance(cls, type)})


def reporting_callbacks(callbacks: list[Any]) -> list[Any]:
    """The ``report_to`` integration callbacks among ``callbacks``, in handler order."""
    return [cb for cb in callbacks if isinstance(cb, _REPORTING)]


def _wandb_run_id(cb: Any) -> str | None:
    run = getattr(getattr(cb, "_wandb", None), "run", None) if getattr(cb, "_initialized", False) else None
    return getattr(run, "id", None)  # private attributes: listed in guard/trainer_patches.py


def _mlflow_run_id(cb: Any) -> str | None:
    if not getattr(cb, "_initialized", False):
        return None
    try:
        active = cb._ml_flow.active_run()
    except Exception:  # noqa: BLE001 - a tracker we cannot read is not ours to break
        return None
    return getattr(getattr(active, "info", None), "run_id", None)


def tracker_runs(callbacks: list[Any]) -> dict[str, str]:
    """``{"tensorboard_dir": …, "wandb_run_id": …, "mlflow_run_id": …}`` for the trackers in use."""
    found: dict[str, str] = {}
    for cb in reporting_callbacks(callbacks):
        name = type(cb).__name__
        value = None
        if name == "TensorBoardCallback":
            value, key = getattr(cb, "logging_dir", None), "tensorboard_dir"
        elif name == "WandbCallback":
            value, key = _wandb_run_id(cb), "wandb_run_id"
        elif name == "MLflowCallback":
            value, key = _mlflow_run_id(cb), "mlflow_run_id"
        if value:
            found[key] = str(value)
    return found


class TrackerCallback(TrainerCallback):
    """Adds ``oomguard/*`` to the logs the ``report_to`` integrations receive; reports their runs once."""

    def __init__(self, env: GuardEnv, handler: Any, monitor: Any = None):
        self.env, self.handler, self.monitor = env, handler, monitor
        self.events = EventWriter(env.run_dir, env.rank)
        self.reported = False

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"oomguard/attempt": self.env.attempt, "oomguard/restarts": self.env.attempt - 1,
                                 "oomguard/changes_in_force": len(self.env.knobs)}
        if self.monitor is not None:
            self.monitor.add_log_fields(out)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        callbacks = list(getattr(self.handler, "callbacks", []))
        if logs is None or not reporting_callbacks(callbacks):
            return
        logs.update(self.metrics())
        if not self.reported and state.is_world_process_zero and self.env.active:
            runs = tracker_runs(callbacks)
            if runs:
                self.events.emit(Event.TRACKER_OBSERVED.value, attempt=self.env.attempt, step=state.global_step, **runs)
            self.reported = True


def install_tracker_callback(trainer: Any, env: GuardEnv, monitor: Any = None) -> TrackerCallback | None:
    """Put a TrackerCallback in front of the first integration callback (none in use: nothing)."""
    handler = trainer.callback_handler
    if any(isinstance(cb, TrackerCallback) for cb in handler.callbacks):
        return None
    reporting = reporting_callbacks(handler.callbacks)
    if not reporting:
        return None
    cb = TrackerCallback(env, handler, monitor)
    handler.callbacks.insert(handler.callbacks.index(reporting[0]), cb)
    return cb
