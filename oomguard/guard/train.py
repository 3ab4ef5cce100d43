"""guarded_train: run ``trainer.train`` and, if it dies, save what is safe, record why, exit 1.

The one way the guard goes onto a Trainer: the bootstrap calls :func:`guarded_train` from its patched
``Trainer.train`` (every wrapped script, the built-in recipe included); a script may call it itself
(then the bootstrap's patch sees :func:`is_guarded` and does not guard twice).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

from transformers import TrainerCallback
from transformers.trainer_utils import TrainOutput

from oomguard.bootstrap.failsafe import failsafe
from oomguard.guard import trainer_patches as internals
from oomguard.guard.callbacks import (
    CacheClearerCallback,
    DataProfileCallback,
    FaultInjectionCallback,
    HeartbeatCallback,
    MemoryMonitorCallback,
    NanGuardCallback,
    PhaseTrackerCallback,
    PressureCheckpointCallback,
    RecipeCallback,
    RewarmCallback,
    ShutdownCallback,
    install_tracker_callback,
)
from oomguard.guard.emergency import die, emergency_save
from oomguard.guard.env import GuardEnv
from oomguard.guard.recorder import CaughtFailure
from oomguard.guard.resume.prepare import prepare_resume
from oomguard.protocol import Phase

__all__ = ["GUARD_TYPES", "emergency_save", "guard_callbacks", "guarded_train", "install_guard", "is_guarded"]

GUARD_TYPES = (PhaseTrackerCallback, FaultInjectionCallback, HeartbeatCallback, DataProfileCallback,
               MemoryMonitorCallback, PressureCheckpointCallback, CacheClearerCallback, NanGuardCallback,
               RecipeCallback, RewarmCallback)

_wrapped: "weakref.WeakSet[Any]" = weakref.WeakSet()  # trainers whose methods the guard wrapped
_running: "weakref.WeakSet[Any]" = weakref.WeakSet()  # trainers inside guarded_train now


def guard_callbacks(env: GuardEnv, *, nan_skip_steps: int | None = None) -> list[TrainerCallback]:
    """The full set, configured from ``env``, in the order they must run (``nan_skip_steps`` None: the
    policy's, from ``env``)."""
    monitor = MemoryMonitorCallback(env.run_dir, rank=env.rank, cap_bytes=env.vram_limit)
    return [
        PhaseTrackerCallback(),
        FaultInjectionCallback(env.faults, env.run_dir, rank=env.rank, attempt=env.attempt),
        HeartbeatCallback(env.run_dir, rank=env.rank, attempt=env.attempt),
        DataProfileCallback(env.run_dir, rank=env.rank),
        monitor,  # before pressure (reads its projection) and the clearer (reads stats before a clear)
        PressureCheckpointCallback(monitor),
        CacheClearerCallback(env.run_dir, rank=env.rank, monitor=monitor),
        NanGuardCallback(env.run_dir, rank=env.rank,
                         skip_steps=env.nan_skip_steps if nan_skip_steps is None else nan_skip_steps),
        RecipeCallback(env),  # on_train_begin: an ordered learning_rate over the restored schedule; recipe in force
        RewarmCallback(env.run_dir, rank=env.rank, attempt=env.attempt, steps=env.rewarm_steps),
        ShutdownCallback(env.run_dir, rank=env.rank, attempt=env.attempt),  # last: on_train_end exits after saving
    ]


def _find(trainer, kind: type | tuple[type, ...]) -> Any:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind)), None)


def has_guard_callbacks(trainer) -> bool:
    return _find(trainer, GUARD_TYPES) is not None


def install_guard(trainer, env: GuardEnv) -> PhaseTrackerCallback:
    """Add the guard's callbacks if none are present, the phase tracker always, and the wrappers (once)."""
    if not has_guard_callbacks(trainer):
        for cb in guard_callbacks(env):
            trainer.add_callback(cb)
    tracker = _find(trainer, PhaseTrackerCallback)
    if tracker is None:
        tracker = PhaseTrackerCallback()
        trainer.add_callback(tracker)
    install_tracker_callback(trainer, env, _find(trainer, MemoryMonitorCallback))  # in front of report_to's
    if trainer not in _wrapped:
        internals.wrap_instance_method(trainer, "evaluate", lambda f, *a, **k: _within(tracker, Phase.EVAL, f, *a, **k))
        internals.wrap_instance_method(trainer, internals.SAVE_CHECKPOINT,
                                       lambda f, *a, **k: _within(tracker, Phase.SAVE, f, *a, **k))
        nan_guard = _find(trainer, NanGuardCallback)
        if nan_guard is not None:
            internals.wrap_instance_method(trainer, "training_step",
                                           lambda f, *a, **k: _observed(nan_guard, f(*a, **k)))
        _wrapped.add(trainer)
    return tracker


def _within(tracker: PhaseTrackerCallback, phase: Phase, f, *args, **kwargs):
    with tracker.during(phase):
        return f(*args, **kwargs)


def _observed(nan_guard: NanGuardCallback, loss):
    nan_guard.observe_loss(loss)
    return loss


def is_guarded(trainer) -> bool:
    """True while ``trainer`` runs inside :func:`guarded_train` (its ``train`` must not be guarded again)."""
    return trainer in _running


@contextlib.contextmanager
def _guarding(trainer) -> Iterator[None]:
    _running.add(trainer)
    try:
        yield
    finally:
        _running.discard(trainer)


def _run(trainer, tracker: PhaseTrackerCallback, resume: str | None, env: GuardEnv,
         train_fn=None) -> TrainOutput | CaughtFailure:
    try:
        # issue 5: convert the checkpoint for changed knobs (rank cut, scaler, CPU-first load)
        resume = prepare_resume(trainer, resume, env)
        with _guarding(trainer):
            return (train_fn or trainer.train)(resume_from_checkpoint=resume)
    except Exception as exc:  # KeyboardInterrupt/SystemExit pass: a supervisor kill is not a crash
        failure = CaughtFailure.capture(exc, tracker.phase)
    # Out of the except block: the exception, its traceback and the failed step's tensors are gone.
    return failure


def guarded_train(trainer, *, env: GuardEnv, resume_from_checkpoint: str | bool | None = None,
                  train_fn=None) -> TrainOutput:
    """``trainer.train`` under the guard. ``resume_from_checkpoint`` None means ``env.resume_from``
    (False: no checkpoint).

    On failure: free memory, emergency-save after a forward/backward or eval OOM (rank 0),
    write the error record, print the traceback to stderr and exit 1 (``GuardExit``, a ``SystemExit(1)``:
    the fast exit of ``bootstrap/fast_exit.py``).
    ``train_fn(resume_from_checkpoint=...)`` replaces ``trainer.train`` (the bootstrap passes the
    unpatched method, so a user's own ``trainer.train()`` call runs under the same guard).
    """
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else env.resume_from
    tracker = None
    with failsafe("the guard's installation", "this attempt trains without the guard (no error record, no "
                  "emergency checkpoint): a failure is classified from its exit and stderr only"):
        tracker = install_guard(trainer, env)
    if tracker is None:  # oomguard's own failure: the user's training still runs, unguarded
        return (train_fn or trainer.train)(resume_from_checkpoint=resume or None)
    tracker.phase = Phase.CHECKPOINT_LOAD if resume else Phase.STARTUP
    outcome = _run(trainer, tracker, resume, env, train_fn)
    if isinstance(outcome, CaughtFailure):
        nan_guard = _find(trainer, NanGuardCallback)
        die(trainer, env, tracker, outcome, last_finite_step=nan_guard.last_finite_step if nan_guard else None)
    return outcome
