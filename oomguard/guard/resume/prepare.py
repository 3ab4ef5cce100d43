"""Resume preparation: make a checkpoint loadable by a trainer whose knobs changed (DESIGN §5, §7).

Entry point: :func:`prepare_resume` — ``guarded_train`` calls it just before ``trainer.train``:

    resume = prepare_resume(trainer, checkpoint, env)   # may return a different path
    trainer.train(resume_from_checkpoint=resume)

What it does, the changes recorded as journal events:
- under oomguard (a run dir), installs the sample ledger (:mod:`ledger`), on fresh runs too;
- the effective batch changed: the data continues at the exact next sample (:mod:`position`);
- ``max_length`` changed with packing on: the examples seen are mapped to the re-packed rows and the
  unseen ones trained first (:mod:`packed`); where that cannot be done, an event says so;
- keeps the trainable parameters' dtype across the adapter load (PEFT upcasts bf16 to fp32);
- from attempt 2 (oomguard's own resume, never the command's own on attempt 1): trains at the args' batch,
  not the checkpoint's (transformers < 5.2 takes the checkpoint's), and on transformers < 4.47 with
  torch >= 2.6 loads the RNG state under later transformers' numpy allowlist;
- oomguard's own failure placing the data is said (``guard_degraded``) and the resume goes on;
- ``lora_r``/``lora_alpha`` changed: the adapter is cut by truncated SVD (:mod:`adapter`), the
  optimizer state of the cut tensors is reset (entries dropped; the LR schedule is kept);
- the GradScaler state of an fp16 checkpoint when this attempt is not fp16 (HF crashes on it);
- bf16 asked on a GPU without it (compute capability < 8.0): refused, naming the card;
- resume mode ``optimizer_on_cpu`` (the supervisor's decision after a ``resume_oom``,
  ``OOMGUARD_RESUME_MODE``): the optimizer state is loaded to CPU first.
The original checkpoint is never modified: changes go to a copy (unchanged files hard-linked)
under ``<run_dir>/resume/`` (or ``<checkpoints>/.oomguard-resume/`` outside oomguard).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from oomguard.guard import trainer_patches as internals
from oomguard.guard.env import GuardEnv
from oomguard.guard.notices import warn_once
from oomguard.guard.recorder import is_oom
from oomguard.guard.resume.adapter import apply_cut, lora_change
from oomguard.guard.resume.ledger import install_ledger, ledger_of
from oomguard.guard.resume.packed import apply_packed_position, state_packed_length_change
from oomguard.guard.resume.position import apply_position
from oomguard.guard.writer import EventWriter
from oomguard.protocol import Event, ResumeMode

__all__ = ["PrecisionError", "RESUME_DIR", "SCALER", "bf16_refusal", "check_precision", "prepare_resume",
           "resume_mode_of"]

SCALER = "scaler.pt"
RESUME_DIR = "resume"  # under the run dir: the converted copies, one per attempt and rank


class PrecisionError(RuntimeError):
    """The precision asked for cannot run on this device."""


def bf16_refusal(bf16: bool, card: str | None, capability: tuple[int, int] | None) -> str | None:
    """Why bf16 cannot run on ``card`` (None: it can, or no GPU is in use). Pure."""
    if not bf16 or capability is None or tuple(capability) >= (8, 0):
        return None
    return (f"bf16 was asked for, but the GPU {card!r} has compute capability {capability[0]}.{capability[1]} "
            "and bf16 needs 8.0 or newer (Ampere+); train in fp16 or fp32 instead (an oomguard policy for this "
            "card should say capabilities: {bf16: false}, so its bf16 rungs are skipped)")


def check_precision(args) -> None:
    """Raise PrecisionError when ``args.bf16`` is set on a CUDA GPU without bf16."""
    if not getattr(args, "bf16", False) or getattr(args, "use_cpu", False) or not torch.cuda.is_available():
        return
    index = torch.cuda.current_device()
    why = bf16_refusal(True, torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))
    if why:
        raise PrecisionError(why)


def prepare_resume(trainer, checkpoint: str | None, env: GuardEnv) -> str | None:
    """The checkpoint ``trainer.train`` should resume from (``checkpoint`` itself or a converted copy).

    Raises PrecisionError or LoraCutError (the message says what and how to fix it).
    """
    check_precision(trainer.args)
    if env.run_dir is not None and ledger_of(trainer) is None:
        install_ledger(trainer, env.run_dir, rank=env.rank, attempt=env.attempt)
    if not checkpoint:
        return None
    internals.keep_trainable_dtypes(trainer)
    if env.attempt > 1:  # oomguard's own resume; attempt 1 resumes as the user's stack would (Trust rule 1)
        internals.keep_args_batch_size(trainer)
        internals.allow_numpy_rng_state(trainer)
    journal = EventWriter(env.run_dir, env.rank)
    source = Path(checkpoint)
    if resume_mode_of(env) == ResumeMode.OPTIMIZER_ON_CPU:
        _load_optimizer_on_cpu_first(trainer, source, journal)
    _place_data(trainer, source, env, journal)
    lora = lora_change(trainer.model, source)
    drop_scaler = (source / SCALER).is_file() and not getattr(trainer.args, "fp16", False)
    if lora is None and not drop_scaler:
        return checkpoint
    target = _resume_copy(source, env, skip={SCALER} if drop_scaler else set())
    if drop_scaler:
        journal.emit("scaler_dropped", checkpoint=str(source), copy=str(target),
                     detail=f"{SCALER} is fp16 GradScaler state; this attempt is not fp16, so the copy has none")
    if lora is not None:
        apply_cut(source, target, lora, journal)
    return str(target)


def _place_data(trainer, source: Path, env: GuardEnv, journal: EventWriter) -> None:
    """Where the data continues: a re-packed dataset is mapped by examples, otherwise by rows.

    oomguard's own failure here (not an OOM) must not end the user's run, nor be read as a damaged
    checkpoint: it is said (``guard_degraded``) and the resume goes on at HF's own position."""
    try:
        _place_data_exactly(trainer, source, env, journal)
    except Exception as exc:
        if is_oom(type(exc).__name__, str(exc)):
            raise
        journal.emit(Event.GUARD_DEGRADED.value, part="exact resume position",
                     error=f"{type(exc).__name__}: {exc}"[:500],
                     consequence="the run resumes where transformers places it (global_step x the current "
                                 "effective batch): samples may repeat or be skipped if the batch or packing "
                                 "changed; please report this error to oomguard")
        warn_once("degraded:exact resume position", f"oomguard: the exact resume position failed "
                  f"({type(exc).__name__}: {exc}); the run resumes at transformers' own position", stacklevel=2)


def _place_data_exactly(trainer, source: Path, env: GuardEnv, journal: EventWriter) -> None:
    ledger = ledger_of(trainer)
    if ledger is None:
        state_packed_length_change(trainer, source, journal, reason="no sample ledger (no run dir)")
    elif not apply_packed_position(trainer, ledger, source, env.run_dir, env.rank, journal):
        apply_position(trainer, ledger, source, env.run_dir, env.rank, journal)


# --- the copy ---------------------------------------------------------------------------
def _resume_copy(source: Path, env: GuardEnv, *, skip: set[str]) -> Path:
    """A fresh copy of ``source`` without ``skip``; files hard-linked where possible (read-only use)."""
    if env.run_dir is not None:
        base = env.run_dir / RESUME_DIR / f"attempt-{env.attempt:03d}-rank{env.rank}"
    else:
        base = source.parent / ".oomguard-resume" / f"attempt-{env.attempt:03d}-rank{env.rank}"
    target = base / source.name
    if target.exists():
        shutil.rmtree(target)  # our own leftover from this attempt number, never a user's checkpoint
    shutil.copytree(source, target, copy_function=_link_or_copy,
                    ignore=lambda d, names: [n for n in names if Path(d) == source and n in skip])
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- the resume mode: optimizer state to CPU first ------------------------------------------------
def resume_mode_of(env: GuardEnv) -> ResumeMode:
    """The supervisor's resume mode (``OOMGUARD_RESUME_MODE``, decided by ``policy.decide()``); unset is normal:
    the child never infers it from an earlier attempt's files."""
    return env.resume_mode if env.resume_mode is not None else ResumeMode.NORMAL


def _load_optimizer_on_cpu_first(trainer, source: Path, journal: EventWriter) -> None:
    """``optimizer.load_state_dict`` then moves each tensor to its parameter's device one at a time:
    the device never holds the whole serialized state next to the live one (the load spike)."""
    from oomguard.guard.recorder import free_cuda_memory

    internals.load_optimizer_on_cpu(trainer, before=free_cuda_memory)
    journal.emit("resume_cpu_first", checkpoint=str(source),
                 detail="the supervisor chose resume mode optimizer_on_cpu after the last attempt ran out of "
                        "memory loading this checkpoint: optimizer state is loaded to CPU first, then moved to "
                        "the device tensor by tensor")
