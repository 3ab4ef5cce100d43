"""The run record: ``run.json`` as typed values (DESIGN §3). Stdlib only.

The supervisor writes it (``supervisor/journal.py``), ``decide()`` reads and writes its members
(a failure, the rung an attempt ran, the decision after it), the report reads it back. ``to_dict``
gives exactly the JSON the run dir has always held; ``from_dict`` is tolerant: unknown keys are
ignored, missing ones take their defaults, and a member a reader can do without (a saved rung whose
ladder is unknown) is dropped. :func:`record_problems` says, per field, what a parsed ``run.json``
breaks and whether any reader can still use it: read a file with both, ``from_dict`` after
``record_problems`` found nothing fatal.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import numbers
import time
from typing import Any, Callable, Mapping, TypeVar

from .env import ENV_CULPRIT, ResumeMode
from .records import FailureKind, Phase, RunStatus

__all__ = ["ResumeClass", "GiveUpReason", "DecisionAction", "SetAsideReason", "RequestedSource", "Failure",
           "RungRef", "KnobChange", "SetAside", "CulpritOrder", "Decision", "AttemptRecord", "RunRecord",
           "record_problems"]

T = TypeVar("T")


class ResumeClass(str, enum.Enum):
    """How a knob change affects resuming from a checkpoint (DESIGN §5)."""

    SAFE = "safe"  # effective batch, LR schedule and data position stay exact
    REINDEX = "reindex"  # data position must be translated (samples seen, not batches)
    TRANSFORM = "transform"  # checkpoint must be converted (LoRA rank cut by SVD)
    NUMERIC = "numeric"  # resumes, but numerics differ (precision, learning rate)
    RESTART = "restart"  # the checkpoint cannot be used: start from scratch


class GiveUpReason(str, enum.Enum):
    LADDER_EXHAUSTED = "ladder_exhausted"
    NO_PROGRESS = "no_progress"
    MAX_ATTEMPTS = "max_attempts"
    WALL_CLOCK = "wall_clock"
    UNRECOVERABLE = "unrecoverable"
    QUARANTINE_LIMIT = "quarantine_limit"  # more rows quarantined than limits.max_quarantined_rows


class DecisionAction(str, enum.Enum):
    RETRY = "retry"
    GIVE_UP = "give_up"


class SetAsideReason(str, enum.Enum):
    """Why a decision moves a checkpoint out of a resume's reach (never deleted)."""

    AFTER_NAN = "after_nan"  # written after the last finite step: its weights may hold the NaN update
    UNLOADABLE = "unloadable"  # the child crashed loading it: damaged in a way no scan sees


class RequestedSource(str, enum.Enum):
    OBSERVED = "observed"  # read in the child (recipe_observed)
    COMMAND = "command"  # only the command's flags are known


def _enum(kind: type[T], value: Any, default: T | None = None) -> T | None:
    """``kind(value)``; ``default`` when value is missing or not one of its names."""
    try:
        return kind(value) if value is not None else default  # type: ignore[call-arg]
    except ValueError:
        return default


def _tolerant(parse: Callable[[Any], T], value: Any) -> T | None:
    """``parse(value)``, or None when value is missing or unusable (a reader does without it)."""
    if not isinstance(value, Mapping):
        return None
    try:
        return parse(value)
    except (ValueError, TypeError, KeyError):
        return None


def _plain(value: Any) -> Any:
    """JSON values, as ``dataclasses.asdict`` + ``json`` have always written them."""
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# --- the members ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Failure:
    """Why an attempt ended. ``step`` is the last completed optimizer step (None: none);
    ``memory_growth`` the steady growth of step peaks (bytes/step) the child saw before it
    failed, None when memory was flat."""

    kind: FailureKind
    step: int | None = None
    phase: Phase = Phase.UNKNOWN
    detail: str = ""
    rank: int = 0
    memory_growth: float | None = None
    usage: bool = False  # the command's own argument parser rejected it before any step (deterministic)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "step": self.step, "phase": self.phase.value,
                               "detail": self.detail, "rank": self.rank}
        if self.memory_growth:
            out["memory_growth"] = self.memory_growth
        if self.usage:
            out["usage"] = True
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Failure":
        kind = _enum(FailureKind, d.get("kind"))
        if kind is None:
            raise ValueError(f"failure kind {d.get('kind')!r} is not one of {', '.join(k.value for k in FailureKind)}")
        return cls(kind=kind, step=d.get("step"), phase=_enum(Phase, d.get("phase"), Phase.UNKNOWN),
                   detail=d.get("detail") or "", rank=d.get("rank") or 0, memory_growth=d.get("memory_growth"),
                   usage=bool(d.get("usage")))


@dataclasses.dataclass(frozen=True)
class RungRef:
    """A rung's position: ``policy.ladders[ladder].rungs[index]``."""

    ladder: FailureKind
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {"ladder": self.ladder.value, "index": self.index}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RungRef":
        index = d["index"]
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"rung index {index!r} is not an integer")
        return cls(ladder=FailureKind(d["ladder"]), index=index)


@dataclasses.dataclass(frozen=True)
class KnobChange:
    """One knob a decision changes: ``old`` -> ``new`` (``old`` None: the child had no value)."""

    knob: str
    old: Any
    new: Any

    def to_dict(self) -> dict[str, Any]:
        return {"knob": self.knob, "old": self.old, "new": self.new}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KnobChange":
        return cls(knob=str(d["knob"]), old=d.get("old"), new=d.get("new"))


@dataclasses.dataclass(frozen=True)
class SetAside:
    """A checkpoint a decision moves out of a resume's reach (the supervisor moves it; never deleted)."""

    path: str
    step: int
    reason: SetAsideReason
    last_good_step: int | None = None  # AFTER_NAN: the last step known finite

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "step": self.step, "reason": self.reason.value,
                "last_good_step": self.last_good_step}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SetAside":
        return cls(path=str(d["path"]), step=int(d["step"]), reason=SetAsideReason(d["reason"]),
                   last_good_step=d.get("last_good_step"))


@dataclasses.dataclass(frozen=True)
class CulpritOrder:
    """What the child does to culprit batches (issue 19), the whole run's so far (``OOMGUARD_CULPRIT``).

    ``split``: (optimizer step, factor) pairs: each micro-batch of that step is trained as ``factor``
    smaller chunks along the batch dimension (same rows, same effective batch, same loss normalisation);
    ``quarantine``: training-set rows (indices of ``train_dataset``) never trained again: the sampler
    still hands them out (the ledger records them as ``skipped``), the step trains without them."""

    split: tuple[tuple[int, int], ...] = ()
    quarantine: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.split or self.quarantine)

    def factor(self, step: int) -> int:
        """The split factor of optimizer ``step`` (1: not split)."""
        return dict(self.split).get(step, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"split": {str(step): factor for step, factor in self.split}, "quarantine": list(self.quarantine)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CulpritOrder":
        split, rows = d.get("split") or {}, d.get("quarantine") or []
        if not isinstance(split, Mapping) or not isinstance(rows, (list, tuple)):
            raise ValueError("a culprit order is {\"split\": {step: factor}, \"quarantine\": [row, ...]}")
        pairs = sorted((int(k), int(v)) for k, v in split.items())
        if any(step < 1 or factor < 1 for step, factor in pairs) or any(
                not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in rows):
            raise ValueError(f"culprit order {dict(d)!r}: steps and factors must be >= 1, rows integers >= 0")
        return cls(split=tuple(pairs), quarantine=tuple(sorted(set(rows))))

    @classmethod
    def from_env(cls, raw: str | None) -> "CulpritOrder":
        """``OOMGUARD_CULPRIT`` -> the order (empty when unset); ValueError naming the variable and the fix."""
        if not (raw or "").strip():
            return cls()
        try:
            value = json.loads(raw)
            if not isinstance(value, Mapping):
                raise ValueError(f"got {type(value).__name__}")
            return cls.from_dict(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{ENV_CULPRIT}={raw[:200]!r} is not a culprit order ({exc}); the supervisor writes "
                             "it as JSON {\"split\": {\"7\": 2}, \"quarantine\": [12]}: unset it to train normally"
                             ) from None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the supervisor does next; ``reason`` is one sentence, root cause first.

    ``quarantine``: checkpoints to move aside before the next attempt; ``resume_mode``: how the next
    child loads its checkpoint (``OOMGUARD_RESUME_MODE``)."""

    action: DecisionAction
    knobs: dict[str, Any]
    rung: RungRef | None
    changes: tuple[KnobChange, ...]
    resume_from: str | None
    resume_class: ResumeClass | None
    reason: str
    give_up: GiveUpReason | None = None
    backoff_s: float = 0.0  # seconds to wait before the next attempt
    truncation_share: float | None = None  # share of training tokens the new max_seq_length cuts
    effective_batch: tuple[int | None, int | None] | None = None  # (before, after): batch*accum*world_size
    lr_note: str | None = None  # set when the effective batch changes
    quarantine: tuple[SetAside, ...] = ()
    resume_mode: ResumeMode = ResumeMode.NORMAL
    rewarm_steps: int = 0  # the next attempt re-enters warm-up over this many optimizer steps (a NaN rollback)
    culprit: CulpritOrder | None = None  # issue 19: the split steps and quarantined rows from the next attempt on

    def to_dict(self) -> dict[str, Any]:
        """Today's ``decision`` shape; ``quarantine``, ``resume_mode`` and ``rewarm_steps`` only when they say
        something."""
        out = {"action": _plain(self.action), "reason": self.reason, "knobs": dict(self.knobs),
               "rung": _plain(self.rung), "changes": _plain(self.changes), "resume_from": self.resume_from,
               "resume_class": _plain(self.resume_class), "give_up": _plain(self.give_up),
               "backoff_s": self.backoff_s, "truncation_share": self.truncation_share,
               "effective_batch": list(self.effective_batch) if self.effective_batch else None,
               "lr_note": self.lr_note}
        if self.quarantine:
            out["quarantine"] = _plain(self.quarantine)
        if self.resume_mode is not ResumeMode.NORMAL:
            out["resume_mode"] = self.resume_mode.value
        if self.rewarm_steps:
            out["rewarm_steps"] = self.rewarm_steps
        if self.culprit:
            out["culprit"] = self.culprit.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Decision":
        action = DecisionAction(d["action"])
        batch = d.get("effective_batch")
        return cls(action=action, knobs=dict(d.get("knobs") or {}), rung=_tolerant(RungRef.from_dict, d.get("rung")),
                   changes=tuple(KnobChange.from_dict(c) for c in d.get("changes") or () if isinstance(c, Mapping)),
                   resume_from=d.get("resume_from"), resume_class=_enum(ResumeClass, d.get("resume_class")),
                   reason=d.get("reason") or "", give_up=_enum(GiveUpReason, d.get("give_up")),
                   backoff_s=d.get("backoff_s") or 0.0, truncation_share=d.get("truncation_share"),
                   effective_batch=tuple(batch) if isinstance(batch, (list, tuple)) else None,  # type: ignore[arg-type]
                   lr_note=d.get("lr_note"),
                   quarantine=tuple(s for q in d.get("quarantine") or () if (s := _tolerant(SetAside.from_dict, q))),
                   resume_mode=_enum(ResumeMode, d.get("resume_mode"), ResumeMode.NORMAL),
                   rewarm_steps=d.get("rewarm_steps") if isinstance(d.get("rewarm_steps"), int) else 0,
                   culprit=_tolerant(CulpritOrder.from_dict, d.get("culprit")))


# --- the record ----------------------------------------------------------------------------
@dataclasses.dataclass
class AttemptRecord:
    n: int
    started: float
    knobs: dict[str, Any]
    rung: RungRef | None = None  # the rung applied before this attempt
    resumed_from: str | None = None
    command: list[str] = dataclasses.field(default_factory=list)
    delivered: dict[str, str] = dataclasses.field(default_factory=dict)
    ended: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    failure: Failure | None = None
    max_step: int | None = None
    decision: Decision | None = None  # what the supervisor decided after it
    pid: int | None = None  # the child's pid = its process group (it leads its own session)
    pid_started: float | None = None  # the child's start time, seconds since the epoch (pid reuse check)
    interrupted: str | None = None  # why it ended without a verdict: "SIGTERM", "SIGINT", "supervisor died"
    orders: dict[str, Any] = dataclasses.field(default_factory=dict)  # what OOMGUARD_KNOBS asked the child to set
    observed: dict[str, Any] | None = None  # the child's recipe_observed payload (in force, else as built)
    verified: dict[str, str] = dataclasses.field(default_factory=dict)  # ordered knob -> a Verdict value
    resumed_step: int | None = None  # the step of resumed_from
    rewarm_steps: int = 0  # optimizer steps this attempt re-entered warm-up over (a NaN rollback's decision)
    culprit: CulpritOrder | None = None  # the split steps / quarantined rows it was told (OOMGUARD_CULPRIT)

    def to_dict(self) -> dict[str, Any]:
        """Every field; ``rewarm_steps`` and ``culprit`` only when they say something."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if not self.rewarm_steps:
            del out["rewarm_steps"]
        if not self.culprit:
            del out["culprit"]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttemptRecord":
        kw = _known(cls, d)
        kw["knobs"] = dict(kw.get("knobs") or {})
        kw["rung"] = _tolerant(RungRef.from_dict, kw.get("rung"))
        kw["failure"] = Failure.from_dict(kw["failure"]) if isinstance(kw.get("failure"), Mapping) else None
        kw["decision"] = _tolerant(Decision.from_dict, kw.get("decision"))
        kw["culprit"] = _tolerant(CulpritOrder.from_dict, kw.get("culprit"))
        return cls(**kw)


@dataclasses.dataclass
class RunRecord:
    status: RunStatus
    command: list[str]
    policy: str
    policy_file: str
    requested: dict[str, Any]  # what attempt 1 really ran, as the child reported it (else its flags)
    config: dict[str, Any]  # the knobs now
    checkpoint_dir: str  # where the child's Trainer saves ("" until known)
    world_size: int = 1
    gpu: dict[str, Any] | None = None
    vram_limit: str | None = None
    inject: str | None = None
    started: float = dataclasses.field(default_factory=time.time)
    updated: float = dataclasses.field(default_factory=time.time)
    ended: float | None = None
    exit_code: int | None = None
    give_up: GiveUpReason | None = None
    root_cause: str | None = None
    attempts: list[AttemptRecord] = dataclasses.field(default_factory=list)
    requested_source: RequestedSource = RequestedSource.COMMAND
    orders: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the next attempt asks the child to set
    capabilities: dict[str, str] = dataclasses.field(default_factory=dict)  # knob -> how a change reaches the child
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)  # knob -> why a change of it cannot land
    start_from_policy: bool = False
    supervisor: dict[str, Any] | None = None  # {pid, started}: who holds the run now (RunLock checks it)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunRecord":
        """The record of a parsed run.json; ValueError when a fatal :func:`record_problems` finding stands."""
        kw = _known(cls, d)
        status = _enum(RunStatus, kw.get("status"))
        if status is None:
            raise ValueError(f"status {kw.get('status')!r} is not one of {', '.join(s.value for s in RunStatus)}")
        kw.update(status=status, give_up=_enum(GiveUpReason, kw.get("give_up")),
                  requested_source=_enum(RequestedSource, kw.get("requested_source"), RequestedSource.COMMAND),
                  attempts=[AttemptRecord.from_dict(a) for a in kw.get("attempts") or ()])
        for name in ("command", "policy", "policy_file", "requested", "config", "checkpoint_dir"):
            kw.setdefault(name, [] if name == "command" else {} if name in ("requested", "config") else "")
        return cls(**kw)


# --- reading back what is on disk: wrong types are reported, never crash a reader ----------
Problem = tuple[str, str, bool]  # (where, what is wrong, fatal: no reader can use the file)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _attempt_problems(i: int, a: Any) -> list[Problem]:
    """(where, problem, fatal) for one attempt; a bad saved decision only stops a continuation."""
    where = f"attempts[{i}]"
    if not isinstance(a, dict):
        return [(where, f"is {type(a).__name__}, expected an object", True)]
    out = [(f"{where}.{k}", f"{a.get(k)!r} is not {what}", True) for k, test, what in (
        ("n", _is_int, "an integer"), ("started", _is_number, "a number"))
        if not test(a.get(k))]
    out += [(f"{where}.{k}", f"{a[k]!r} is not {what}", True) for k, test, what in (
        ("ended", _is_number, "a number"), ("max_step", _is_int, "an integer"))
        if a.get(k) is not None and not test(a[k])]
    out += [(f"{where}.{k}", f"{a[k]!r} is not {what}", True) for k, kind, what in (
        ("failure", dict, "an object"), ("decision", dict, "an object"), ("knobs", dict, "an object"),
        ("command", list, "a list")) if a.get(k) is not None and not isinstance(a[k], kind)]
    if isinstance(a.get("failure"), dict):
        kind = a["failure"].get("kind")
        if not isinstance(kind, str):
            out.append((f"{where}.failure.kind", f"{kind!r} is not a failure kind", True))
        elif _enum(FailureKind, kind) is None:
            out.append((f"{where}.failure.kind", f"unknown failure kind {kind!r} (expected one of "
                                                 f"{', '.join(k.value for k in FailureKind)})", True))
    if a.get("rung") is not None:
        out += _rung_problems(f"{where}.rung", a["rung"])
    decision = a.get("decision") if isinstance(a.get("decision"), dict) else None
    if decision is not None:
        out += _decision_problems(f"{where}.decision", decision)
    return out


def _decision_problems(where: str, decision: Mapping[str, Any]) -> list[Problem]:
    out = []
    if _enum(DecisionAction, decision.get("action")) is None:
        out.append((f"{where}.action", f"unknown action {decision.get('action')!r} (expected one of "
                                       f"{', '.join(a.value for a in DecisionAction)})", False))
    if decision.get("rung") is not None:
        out += _rung_problems(f"{where}.rung", decision["rung"])
    return out


def _rung_problems(where: str, rung: Any) -> list[Problem]:
    kinds = [k.value for k in FailureKind]
    if not isinstance(rung, dict):
        return [(where, f"{rung!r} is not an object", False)]
    out = []
    if rung.get("ladder") not in kinds:
        out.append((f"{where}.ladder", f"unknown ladder {rung.get('ladder')!r} (expected one of "
                                       f"{', '.join(kinds)})", False))
    if not _is_int(rung.get("index")):
        out.append((f"{where}.index", f"{rung.get('index')!r} is not an integer", False))
    return out


def record_problems(d: Any) -> list[Problem]:
    """(where, problem, fatal) for a parsed run.json; fatal: no reader can use the file."""
    if not isinstance(d, dict):
        return [("(top level)", f"is a JSON {type(d).__name__}, expected an object", True)]
    out = [(k, f"{d.get(k)!r} is not {what}", True) for k, kind, what in (
        ("status", str, "a status name"), ("command", list, "a list of arguments"),
        ("attempts", list, "a list"), ("requested", dict, "an object"), ("config", dict, "an object"))
        if k in d and not isinstance(d[k], kind)]
    if d.get("world_size") is not None and not (_is_int(d["world_size"]) and d["world_size"] > 0):
        out.append(("world_size", f"{d['world_size']!r} is not a positive integer", True))
    if "status" not in d:
        out.append(("status", "is missing", True))
    elif isinstance(d["status"], str) and _enum(RunStatus, d["status"]) is None:
        out.append(("status", f"unknown status {d['status']!r} (expected one of "
                              f"{', '.join(s.value for s in RunStatus)})", True))
    for k in ("started", "updated", "ended"):
        if d.get(k) is not None and not _is_number(d[k]):
            out.append((k, f"{d[k]!r} is not a number (seconds since the epoch)", True))
    if isinstance(d.get("attempts"), list):
        for i, a in enumerate(d["attempts"]):
            out += _attempt_problems(i, a)
    return out
