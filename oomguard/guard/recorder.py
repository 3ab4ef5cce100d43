"""The error record the child writes on its way down (DESIGN §3, protocol.ErrorRecord)."""

from __future__ import annotations

import traceback as tb
from dataclasses import dataclass
from pathlib import Path

import torch

from oomguard import protocol
from oomguard.guard.callbacks.nan import NonFiniteLossError
from oomguard.protocol import ErrorRecord, FailureKind, Phase

__all__ = ["CaughtFailure", "build_record", "classify_exception", "free_cuda_memory", "is_oom", "write_record"]

# Phases where a GPU OOM has its own kind and its own remedy (DESIGN §4).
_OOM_KIND_BY_PHASE = {Phase.CHECKPOINT_LOAD: FailureKind.RESUME_OOM, Phase.EVAL: FailureKind.EVAL_OOM}


is_oom = protocol.is_oom  # the one rule (protocol.text); kept here, where the guard's callers import it


def classify_exception(exc_type: str, message: str, phase: Phase) -> FailureKind:
    """FailureKind of an exception, from its type name, message and the phase it hit. Pure."""
    if exc_type.endswith(NonFiniteLossError.__name__):
        return FailureKind.NAN_LOSS
    if is_oom(exc_type, message):
        return _OOM_KIND_BY_PHASE.get(phase, FailureKind.CUDA_OOM)
    return FailureKind.CRASH


@dataclass(frozen=True)
class CaughtFailure:
    """An exception reduced to text: holding it keeps none of the failed step's tensors alive.

    (Not the run record's ``Failure``, which is the supervisor's view of an attempt's end.)"""

    exc_type: str
    message: str
    traceback: str
    phase: Phase
    kind: FailureKind
    last_finite_step: int | None = None  # from NonFiniteLossError

    @classmethod
    def capture(cls, exc: BaseException, phase: Phase) -> "CaughtFailure":
        exc_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        # str(exc) alone misses OOMs wrapped by another exception; search the whole chain.
        message = f"{exc}\n{text}"
        kind = classify_exception(exc_type, message, phase)
        return cls(exc_type=exc_type, message=str(exc), traceback=text, phase=phase, kind=kind,
                   last_finite_step=getattr(exc, "last_finite_step", None))

    @property
    def oom(self) -> bool:
        return self.kind in (FailureKind.CUDA_OOM, FailureKind.RESUME_OOM, FailureKind.EVAL_OOM)


def build_record(failure: CaughtFailure, *, step: int | None, rank: int, saved_checkpoint: str | None,
                 last_finite_step: int | None, memory: dict, note: str = "") -> ErrorRecord:
    detail = f"{failure.exc_type}: {failure.message}".strip()
    if note:
        detail = f"{detail}\n{note}"
    return ErrorRecord(
        kind=failure.kind, phase=failure.phase, step=step, detail=detail[:4000], rank=rank,
        saved_checkpoint=saved_checkpoint,
        last_finite_step=failure.last_finite_step if failure.last_finite_step is not None else last_finite_step,
        memory=memory, traceback=failure.traceback[-20000:])


def write_record(error_file: Path | None, record: ErrorRecord) -> Path | None:
    """Write the record where the supervisor looks (rank k: ``error.rank<k>.json``); None outside oomguard."""
    if error_file is None:
        return None
    return protocol.write_error_record(error_file, record)


def free_cuda_memory() -> None:
    """After the failed step's references are gone: return its blocks to the driver."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()

