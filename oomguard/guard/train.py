"""guarded_train: run ``trainer.train`` and, if it dies, save what is safe, record why, exit 1."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from oomguard.guard import device
from oomguard.guard.cache import CacheClearerCallback
from oomguard.guard.env import GuardEnv
from oomguard.guard.faults import FaultInjectionCallback
from oomguard.guard.heartbeat import HeartbeatCallback
from oomguard.guard.journal import Journal
from oomguard.guard.monitor import MemoryMonitorCallback
from oomguard.guard.nan import NanGuardCallback
from oomguard.guard.in_force import RecipeCallback
from oomguard.guard.phase import PhaseTrackerCallback
from oomguard.guard.pressure import PressureCheckpointCallback
from oomguard.guard.profile import DataProfileCallback
from oomguard.guard.shutdown import ShutdownCallback
from oomguard.guard.recorder import Failure, build_record, free_cuda_memory, write_record
from oomguard.guard.resume import prepare_resume
from oomguard.protocol import Phase

GUARD_TYPES = (PhaseTrackerCallback, FaultInjectionCallback, HeartbeatCallback, DataProfileCallback,
               MemoryMonitorCallback, PressureCheckpointCallback, CacheClearerCallback, NanGuardCallback,
               RecipeCallback)


def guard_callbacks(env: GuardEnv, *, nan_skip_steps: int = 0) -> list[TrainerCallback]:
    """The full set, configured from ``env``, in the order they must run."""
    monitor = MemoryMonitorCallback(env.run_dir, rank=env.rank, cap_bytes=env.vram_limit)
    return [
        PhaseTrackerCallback(),
        FaultInjectionCallback(env.faults, env.run_dir, rank=env.rank, attempt=env.attempt),
        HeartbeatCallback(env.run_dir, rank=env.rank),
        DataProfileCallback(env.run_dir, rank=env.rank),
        monitor,  # before pressure (reads its projection) and the clearer (reads stats before a clear)
        PressureCheckpointCallback(monitor),
        CacheClearerCallback(env.run_dir, rank=env.rank),
        NanGuardCallback(env.run_dir, rank=env.rank, skip_steps=nan_skip_steps),
        RecipeCallback(env),  # on_train_begin: an ordered learning_rate over the restored schedule; recipe in force
        ShutdownCallback(env.run_dir, rank=env.rank),  # last: its on_train_end exits after the save
    ]


def _find(trainer, kind: type) -> Any:
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind)), None)


def _install(trainer, env: GuardEnv) -> PhaseTrackerCallback:
    """Add the guard's callbacks if none are present, the phase tracker always, and the wrappers."""
    if _find(trainer, GUARD_TYPES) is None:
        for cb in guard_callbacks(env):
            trainer.add_callback(cb)
    tracker = _find(trainer, PhaseTrackerCallback)
    if tracker is None:
        tracker = PhaseTrackerCallback()
        trainer.add_callback(tracker)
    if not getattr(trainer, "_oomguard_wrapped", False):
        _wrap(trainer, "evaluate", lambda f, *a, **k: _within(tracker, Phase.EVAL, f, *a, **k))
        _wrap(trainer, "_save_checkpoint", lambda f, *a, **k: _within(tracker, Phase.SAVE, f, *a, **k))
        nan_guard = _find(trainer, NanGuardCallback)
        if nan_guard is not None:
            _wrap(trainer, "training_step", lambda f, *a, **k: _observed(nan_guard, f(*a, **k)))
        trainer._oomguard_wrapped = True
    return tracker


def _wrap(trainer, name: str, around) -> None:
    original = getattr(trainer, name)
    setattr(trainer, name, functools.wraps(original)(functools.partial(around, original)))


def _within(tracker: PhaseTrackerCallback, phase: Phase, f, *args, **kwargs):
    with tracker.during(phase):
        return f(*args, **kwargs)


def _observed(nan_guard: NanGuardCallback, loss):
    nan_guard.observe_loss(loss)
    return loss


def _run(trainer, tracker: PhaseTrackerCallback, resume: str | None, env: GuardEnv,
         train_fn=None) -> TrainOutput | Failure:
    try:
        # issue 5: convert the checkpoint for changed knobs (rank cut, scaler, CPU-first load)
        resume = prepare_resume(trainer, resume, env)
        return (train_fn or trainer.train)(resume_from_checkpoint=resume)
    except Exception as exc:  # KeyboardInterrupt/SystemExit pass: a supervisor kill is not a crash
        failure = Failure.capture(exc, tracker.phase)
    # Out of the except block: the exception, its traceback and the failed step's tensors are gone.
    return failure


def guarded_train(trainer, *, env: GuardEnv, resume_from_checkpoint: str | None = None,
                  train_fn=None) -> TrainOutput:
    """``trainer.train`` under the guard. ``resume_from_checkpoint`` None means ``env.resume_from``.

    On failure: free memory, emergency-save after a forward/backward or eval OOM (rank 0),
    write the error record, print the traceback to stderr and ``sys.exit(1)``.
    ``train_fn(resume_from_checkpoint=...)`` replaces ``trainer.train`` (the bootstrap passes the
    unpatched method, so a user's own ``trainer.train()`` call runs under the same guard).
    """
    tracker = _install(trainer, env)
    resume = resume_from_checkpoint if resume_from_checkpoint is not None else env.resume_from
    tracker.phase = Phase.CHECKPOINT_LOAD if resume else Phase.STARTUP
    outcome = _run(trainer, tracker, resume, env, train_fn)
    if isinstance(outcome, Failure):
        _die(trainer, env, tracker, outcome)
    return outcome


def _die(trainer, env: GuardEnv, tracker: PhaseTrackerCallback, failure: Failure) -> None:
    sys.stderr.write(f"oomguard: training failed ({failure.kind.value} in {failure.phase.value} "
                     f"after step {trainer.state.global_step}, rank {env.rank}):\n{failure.traceback}")
    journal = Journal(env.run_dir, env.rank)
    saved, note = None, ""
    if failure.oom:
        free_cuda_memory()
        saved, note = emergency_save(trainer, env, tracker, failure.phase, journal)
    nan_guard = _find(trainer, NanGuardCallback)
    record = build_record(failure, step=trainer.state.global_step, rank=env.rank, saved_checkpoint=saved,
                          last_finite_step=nan_guard.last_finite_step if nan_guard else None,
                          memory=device.memory_snapshot(), note=note)
    path = write_record(env.error_file, record)
    if path is not None:
        journal.emit("error_recorded", step=record.step, kind=record.kind.value, phase=record.phase.value,
                     path=str(path), saved_checkpoint=saved)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(1)


def emergency_save(trainer, env: GuardEnv, tracker: PhaseTrackerCallback, phase: Phase,
                   journal: Journal) -> tuple[str | None, str]:
    """Save ``checkpoint-<global_step>`` after an OOM where the weights are a completed step.

    Returns (checkpoint path or None, why not). Never after an OOM inside ``optimizer.step()``.
    """
    step = trainer.state.global_step
    if phase not in (Phase.FORWARD_BACKWARD, Phase.EVAL):
        why = ("the OOM hit inside optimizer.step(): weights and optimizer state may be half-updated"
               if phase == Phase.OPTIMIZER_STEP else f"the OOM hit in phase {phase.value}: nothing new to save")
        return None, f"no emergency checkpoint: {why}"
    if env.rank != 0:
        return None, f"no emergency checkpoint from rank {env.rank}: rank 0 saves"
    if env.world_size > 1 and (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)):
        return None, "no emergency checkpoint: a sharded (FSDP/DeepSpeed) save needs every rank"
    if step == 0:
        return None, "no emergency checkpoint: no optimizer step completed"
    target = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    if target.exists():
        return str(target), f"{target.name} already existed (regular save); not rewritten"
    return _save(trainer, tracker, target, journal)


def _save(trainer, tracker: PhaseTrackerCallback, target: Path, journal: Journal) -> tuple[str | None, str]:
    trainer.model.zero_grad(set_to_none=True)  # the failed step's partial gradients are useless
    free_cuda_memory()
    started = time.monotonic()
    try:
        trainer._save_checkpoint(trainer.model, trial=None)
    except Exception as exc:
        failure = Failure.capture(exc, Phase.SAVE)
        return None, f"emergency checkpoint failed: {failure.exc_type}: {failure.message}"
    seconds = round(time.monotonic() - started, 3)
    journal.emit("emergency_save", step=trainer.state.global_step, path=str(target), seconds=seconds)
    return str(target), f"emergency checkpoint {target.name} written in {seconds}s"
