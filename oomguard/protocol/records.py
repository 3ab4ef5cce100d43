"""Value types both sides share: the failure vocabulary, the child's error record, injected faults."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import time
from pathlib import Path
from typing import Any

from .io import atomic_write_json
from .layout import rank_file

__all__ = ["FailureKind", "Phase", "RunStatus", "ErrorRecord", "write_error_record", "read_error_records",
           "INJECTABLE", "Fault", "parse_inject"]


class FailureKind(str, enum.Enum):
    CUDA_OOM = "cuda_oom"
    RESUME_OOM = "resume_oom"
    EVAL_OOM = "eval_oom"
    NAN_LOSS = "nan_loss"
    HOST_OOM = "host_oom"
    HANG = "hang"
    CRASH = "crash"


class Phase(str, enum.Enum):
    """Where in the child a failure happened."""

    STARTUP = "startup"  # imports, model load, before the trainer exists
    CHECKPOINT_LOAD = "checkpoint_load"  # resuming, before the first step
    FORWARD_BACKWARD = "forward_backward"
    OPTIMIZER_STEP = "optimizer_step"
    EVAL = "eval"
    SAVE = "save"
    UNKNOWN = "unknown"


class RunStatus(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    GAVE_UP = "gave_up"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """What the child writes to OOMGUARD_ERROR_FILE just before it dies.

    ``step`` is the last *completed* optimizer step (global_step), ``saved_checkpoint``
    the checkpoint the child wrote on the way down (None when it could not or must not:
    an OOM inside optimizer.step()), ``last_finite_step`` the newest step whose loss and
    gradients were finite (for NaN rollback).
    """

    kind: FailureKind
    phase: Phase = Phase.UNKNOWN
    step: int | None = None
    detail: str = ""
    rank: int = 0
    saved_checkpoint: str | None = None
    last_finite_step: int | None = None
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    traceback: str = ""
    time: float = dataclasses.field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        d["phase"] = self.phase.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ErrorRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["kind"] = FailureKind(kw["kind"])
        kw["phase"] = Phase(kw.get("phase", Phase.UNKNOWN.value))
        return cls(**kw)


def write_error_record(path: str | os.PathLike[str], record: ErrorRecord) -> Path:
    target = rank_file(path, record.rank)
    atomic_write_json(target, record.to_dict())
    return target


def read_error_records(path: str | os.PathLike[str]) -> list[ErrorRecord]:
    """All ranks' records next to ``path``, earliest first (the root cause leads)."""
    p = Path(path)
    found = []
    for candidate in sorted(p.parent.glob(f"{p.stem}*{p.suffix}")):
        try:
            found.append(ErrorRecord.from_dict(json.loads(candidate.read_text())))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a torn or foreign file is not evidence
    return sorted(found, key=lambda r: r.time)


INJECTABLE = ("cuda_oom", "nan", "inf", "crash", "hang", "host_oom", "resume_oom", "eval_oom")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind@step=N[,rank=R][,attempt=A]``; fires once per run.

    Data-dependent faults (issue 19, culprit batches) fire on every micro-batch that matches, in every
    attempt, never remembered: ``cuda_oom@tokens=N`` whenever a training micro-batch holds more than N
    tokens (``input_ids.numel()``: splitting the batch really avoids it), ``nan@row=R`` (or ``inf@row=R``)
    whenever a training micro-batch holds row R of the train dataset (quarantining R really avoids it)."""

    kind: str
    step: int | None = None
    rank: int | None = None
    attempt: int | None = None
    tokens: int | None = None
    row: int | None = None

    @property
    def data_dependent(self) -> bool:
        return self.tokens is not None or self.row is not None

    @property
    def key(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in (("tokens", self.tokens), ("row", self.row)) if v is not None)
        return f"{self.kind}@step={self.step},rank={self.rank},attempt={self.attempt}{extra}"


_FAULT_ARGS = ("step", "rank", "attempt", "tokens", "row")
_DATA_ARG = {"cuda_oom": "tokens", "nan": "row", "inf": "row"}  # the data-dependent argument each kind takes


def _fault_args(part: str, args: str) -> dict[str, int]:
    kw: dict[str, int] = {}
    for arg in filter(None, (a.strip() for a in args.split(","))):
        key, eq, val = arg.partition("=")
        if not eq or key not in _FAULT_ARGS or not val.strip().isdigit():
            raise ValueError(f"bad fault argument {arg!r} in {part!r}; use step=N, rank=R, attempt=A, "
                             "tokens=N (cuda_oom) or row=R (nan, inf)")
        if key in kw:  # "step=3,step=4" would silently keep the last one
            raise ValueError(f"duplicate fault argument {key!r} in {part!r}; give each of step, rank, "
                             "attempt at most once (two faults: separate them with ';')")
        kw[key] = int(val)
    return kw


def parse_inject(spec: str) -> list[Fault]:
    """'cuda_oom@step=5;nan@step=9' -> faults. Raises ValueError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        kind, _, args = part.partition("@")
        kind = kind.strip()
        if kind not in INJECTABLE:
            raise ValueError(f"unknown fault {kind!r} in {part!r}; known: {', '.join(INJECTABLE)}")
        kw = _fault_args(part, args)
        for arg in ("tokens", "row"):
            if arg in kw and _DATA_ARG.get(kind) != arg:
                raise ValueError(f"fault argument {arg!r} in {part!r} does not apply to {kind}; use "
                                 "cuda_oom@tokens=N or nan@row=R")
        faults.append(Fault(kind=kind, **kw))
    return faults
