"""On the way down: the emergency checkpoint after an OOM, the error record, exit 1."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from oomguard.bootstrap.fast_exit import GuardExit
from oomguard.guard import trainer_patches as internals
from oomguard.guard.callbacks.phase import PhaseTrackerCallback
from oomguard.guard.device import stats as device
from oomguard.guard.env import GuardEnv
from oomguard.guard.recorder import CaughtFailure, build_record, free_cuda_memory, write_record
from oomguard.guard.writer import EventWriter
from oomguard.protocol import Phase

__all__ = ["die", "emergency_save"]


def die(trainer, env: GuardEnv, tracker: PhaseTrackerCallback, failure: CaughtFailure, *,
        last_finite_step: int | None) -> None:
    """Say what failed on stderr, save what is safe, write the error record, exit 1: a ``SystemExit`` that
    skips the interpreter's teardown once nothing of the user's is left to run (``bootstrap/fast_exit``)."""
    # a newline first: the child's own progress bar (tqdm, on stderr) may have left its line open
    sys.stderr.write(f"\noomguard: training failed ({failure.kind.value} in {failure.phase.value} "
                     f"after step {trainer.state.global_step}, rank {env.rank}):\n{failure.traceback}")
    journal = EventWriter(env.run_dir, env.rank)
    saved, note = None, ""
    if failure.oom:
        free_cuda_memory()
        saved, note = emergency_save(trainer, env, tracker, failure.phase, journal)
    record = build_record(failure, step=trainer.state.global_step, rank=env.rank, saved_checkpoint=saved,
                          last_finite_step=last_finite_step, memory=device.memory_snapshot(), note=note)
    path = write_record(env.error_file, record)
    if path is not None:
        journal.emit("error_recorded", step=record.step, kind=record.kind.value, phase=record.phase.value,
                     path=str(path), saved_checkpoint=saved)
    sys.stdout.flush()
    sys.stderr.flush()
    raise GuardExit(1)


def _refusal(trainer, env: GuardEnv, phase: Phase) -> str | None:
    """Why no emergency checkpoint may be written now, or None."""
    if phase not in (Phase.FORWARD_BACKWARD, Phase.EVAL):
        why = ("the OOM hit inside optimizer.step(): weights and optimizer state may be half-updated"
               if phase == Phase.OPTIMIZER_STEP else f"the OOM hit in phase {phase.value}: nothing new to save")
        return f"no emergency checkpoint: {why}"
    if env.rank != 0:
        return f"no emergency checkpoint from rank {env.rank}: rank 0 saves"
    sharded = getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)
    if env.world_size > 1 and sharded:
        return "no emergency checkpoint: a sharded (FSDP/DeepSpeed) save needs every rank"
    if trainer.state.global_step == 0:
        return "no emergency checkpoint: no optimizer step completed"
    return None


def emergency_save(trainer, env: GuardEnv, tracker: PhaseTrackerCallback, phase: Phase,
                   journal: EventWriter) -> tuple[str | None, str]:
    """Save ``checkpoint-<global_step>`` after an OOM where the weights are a completed step.

    Returns (checkpoint path or None, why not). Never after an OOM inside ``optimizer.step()``.
    """
    why = _refusal(trainer, env, phase)
    if why is not None:
        return None, why
    target = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    if target.exists():
        return str(target), f"{target.name} already existed (regular save); not rewritten"
    return _save(trainer, target, journal)


def _save(trainer, target: Path, journal: EventWriter) -> tuple[str | None, str]:
    trainer.model.zero_grad(set_to_none=True)  # the failed step's partial gradients are useless
    free_cuda_memory()
    started = time.monotonic()
    try:
        internals.save_checkpoint(trainer)
    except Exception as exc:
        failure = CaughtFailure.capture(exc, Phase.SAVE)
        return None, f"emergency checkpoint failed: {failure.exc_type}: {failure.message}"
    seconds = round(time.monotonic() - started, 3)
    journal.emit("emergency_save", step=trainer.state.global_step, path=str(target), seconds=seconds)
    return str(target), f"emergency checkpoint {target.name} written in {seconds}s"
