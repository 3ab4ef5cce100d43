"""The contract between the supervisor and the child (DESIGN §3). Stdlib only.

Both sides import this module: env var names, run-directory file names, the
failure vocabulary, the child's error record, and the small JSON helpers
(atomic write, append-one-line, torn-line-tolerant read).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

# --- environment given to the child (contract) --------------------------------
ENV_RUN_DIR = "OOMGUARD_RUN_DIR"
ENV_ATTEMPT = "OOMGUARD_ATTEMPT"
ENV_ERROR_FILE = "OOMGUARD_ERROR_FILE"
ENV_KNOBS = "OOMGUARD_KNOBS"  # JSON object of knob -> value oomguard asks the child to set ({} on attempt 1)
ENV_RESUME_FROM = "OOMGUARD_RESUME_FROM"  # checkpoint dir, or "" for a fresh start
ENV_VRAM_LIMIT = "OOMGUARD_VRAM_LIMIT"  # e.g. "24GiB"; "" for none
ENV_INJECT = "OOMGUARD_INJECT"  # e.g. "cuda_oom@step=5;nan@step=9"
# additions beyond DESIGN §3 (additive, documented in the README)
ENV_CHECKPOINT_DIR = "OOMGUARD_CHECKPOINT_DIR"  # where the child writes checkpoint-N/
# Files of an HF Trainer checkpoint that both sides read
CKPT_TRAINER_STATE = "trainer_state.json"  # written last; holds global_step
CKPT_TRAINING_ARGS = "training_args.bin"
ENV_SUPERVISOR_PID = "OOMGUARD_SUPERVISOR_PID"  # the child stops if this process dies

# --- run directory (contract) -------------------------------------------------
RUN_JSON = "run.json"
EVENTS_JSONL = "events.jsonl"
POLICY_COPY = "policy.yaml"
ATTEMPTS_DIR = "attempts"
HEARTBEAT = "heartbeat"
LEDGER_DIR = "ledger"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
KNOBS_JSON = "knobs.json"
ERROR_JSON = "error.json"
LOCK_FILE = ".lock"

# --- knob names (contract): the registry (oomguard/knobs.py) is their one home ---------
from oomguard.knobs import (BATCH as KNOB_BATCH, CORE as CORE_KNOBS, GRAD_ACCUM as KNOB_GRAD_ACCUM,  # noqa: E402
                            LORA_ALPHA as KNOB_LORA_ALPHA, LORA_R as KNOB_LORA_R,
                            MAX_SEQ_LENGTH as KNOB_MAX_SEQ_LENGTH, PRECISION as KNOB_PRECISION, PRECISIONS)


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


def error_file_for_rank(path: str | os.PathLike[str], rank: int) -> Path:
    """Rank 0 writes the file itself; rank k>0 writes ``error.rank<k>.json`` beside it."""
    p = Path(path)
    return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def write_error_record(path: str | os.PathLike[str], record: ErrorRecord) -> Path:
    target = error_file_for_rank(path, record.rank)
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


# --- JSON files -----------------------------------------------------------------
def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write tmp, fsync, rename: a reader sees the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def append_jsonl(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """Append one line with a single O_APPEND write (no interleaving between writers)."""
    line = (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer was killed mid-line: do not glue onto its torn line
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield each parseable object; a torn or garbled line (a kill mid-write) is skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def emit_event(run_dir: str | os.PathLike[str], event: str, **fields: Any) -> None:
    """Append an event to ``<run_dir>/events.jsonl`` (used by both sides)."""
    record = {"time": time.time(), "event": event, **fields}
    append_jsonl(Path(run_dir) / EVENTS_JSONL, record)


def touch(path: str | os.PathLike[str]) -> None:
    p = Path(path)
    try:
        os.utime(p)
    except FileNotFoundError:
        p.touch()


# --- small parsers shared by both sides -----------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "ki": 2**10,
               "m": 1000**2, "mb": 1000**2, "mib": 2**20, "mi": 2**20,
               "g": 1000**3, "gb": 1000**3, "gib": 2**30, "gi": 2**30,
               "t": 1000**4, "tb": 1000**4, "tib": 2**40, "ti": 2**40}


def parse_size(text: str, *, require_unit: bool = False) -> int:
    """'24GiB' -> bytes. 'G' alone is taken as GiB (as nvidia-smi users mean it).

    ``require_unit``: a bare number is refused (the CLI's ``--vram-limit 24`` meant 24 GiB, not
    24 bytes); the child side keeps accepting what the supervisor already checked."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write it like 24GiB, 16GB or 15.5GiB")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if require_unit and not unit:
        raise ValueError(f"size {text!r} has no unit (it would be read as {text.strip()} bytes); "
                         f"write it with one, like {text.strip()}GiB or {text.strip()}GB")
    if unit in ("g", "m", "k", "t"):
        unit += "ib"
    value = int(number * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


INJECTABLE = ("cuda_oom", "nan", "inf", "crash", "hang", "host_oom", "resume_oom", "eval_oom")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind@step=N[,rank=R][,attempt=A]``; fires once per run."""

    kind: str
    step: int | None = None
    rank: int | None = None
    attempt: int | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}@step={self.step},rank={self.rank},attempt={self.attempt}"


def parse_inject(spec: str) -> list[Fault]:
    """'cuda_oom@step=5;nan@step=9' -> faults. Raises ValueError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in (spec or "").split(";"))):
        kind, _, args = part.partition("@")
        kind = kind.strip()
        if kind not in INJECTABLE:
            raise ValueError(f"unknown fault {kind!r} in {part!r}; known: {', '.join(INJECTABLE)}")
        kw: dict[str, int] = {}
        for arg in filter(None, (a.strip() for a in args.split(","))):
            key, eq, val = arg.partition("=")
            if not eq or key not in ("step", "rank", "attempt") or not val.strip().isdigit():
                raise ValueError(f"bad fault argument {arg!r} in {part!r}; use step=N, rank=R or attempt=A")
            if key in kw:  # "step=3,step=4" would silently keep the last one
                raise ValueError(f"duplicate fault argument {key!r} in {part!r}; give each of step, rank, "
                                 "attempt at most once (two faults: separate them with ';')")
            kw[key] = int(val)
        faults.append(Fault(kind=kind, **kw))
    return faults


# --- secrets in command lines (never written into the run dir) -----------------------
SECRET_MASK = "***"
_SECRET_WORDS = ("token", "key", "secret", "password", "passwd")
_ENV_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_MIN_SCRUB = 6  # chars: a shorter secret value is masked in argv only (scrubbing "1" everywhere ruins the journal)


def is_secret_name(name: str) -> bool:
    """``hub_token``, ``api-key``, ``HF_TOKEN``, ``db.password``: a word of the name ends in a secret
    word. Word-wise so that ``--tokenizer_name`` or ``--max_tokens`` are not taken for secrets."""
    words = re.split(r"[-_.]+", name.lower())
    return any(w.endswith(_SECRET_WORDS) for w in words if w)


def _secret_slots(argv: list[str]) -> dict[int, str]:
    """index -> the redacted form of that argument (``--x ***``'s value, ``--x=***``, ``X_KEY=***``)."""
    slots: dict[int, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("-") and is_secret_name(arg.lstrip("-").partition("=")[0]):
            name, eq, _ = arg.partition("=")
            if eq:
                slots[i] = f"{name}={SECRET_MASK}"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                slots[i + 1] = SECRET_MASK  # "--hub_token VALUE"; a bare switch before a flag has no value
        elif (m := _ENV_ASSIGN.match(arg)) and is_secret_name(m.group(1)):
            slots[i] = f"{m.group(1)}={SECRET_MASK}"
    return slots


def redact_argv(argv: Any) -> list[str]:
    """``argv`` with every secret value replaced by ``***`` (for files, never for what runs)."""
    argv = [str(a) for a in argv]
    slots = _secret_slots(argv)
    return [slots.get(i, a) for i, a in enumerate(argv)]


def secret_values(argv: Any) -> list[str]:
    """The secret values ``argv`` holds (long enough to be scrubbed out of any text)."""
    argv = [str(a) for a in argv]
    values = []
    for i, redacted in _secret_slots(argv).items():
        value = argv[i][len(redacted) - len(SECRET_MASK):] if redacted != SECRET_MASK else argv[i]
        if len(value) >= _MIN_SCRUB and value != SECRET_MASK:
            values.append(value)
    return values


def redact(obj: Any, secrets: list[str] = ()) -> Any:  # type: ignore[assignment]
    """A copy of a JSON-shaped ``obj`` fit for the run dir: every all-string list is redacted as an
    argv, and each of ``secrets`` is replaced by ``***`` inside every string (a traceback, a reason)."""
    if isinstance(obj, str):
        for value in secrets:
            obj = obj.replace(value, SECRET_MASK)
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(x, str) for x in obj):
            return [redact(x, secrets) for x in redact_argv(obj)]
        return [redact(x, secrets) for x in obj]
    return obj


# One list of the messages that mean "the GPU ran out of memory" (DESIGN §4).
OOM_PATTERNS = (
    r"CUDA out of memory",
    r"torch\.OutOfMemoryError",
    r"torch\.cuda\.OutOfMemoryError",
    r"CUDA error: out of memory",
    r"CUBLAS_STATUS_ALLOC_FAILED",
    r"CUDNN_STATUS_(?:ALLOC_FAILED|NOT_ENOUGH_WORKSPACE)",
    r"cudaErrorMemoryAllocation",
    r"out of memory at line \d+ in file",  # bitsandbytes native: "Error out of memory at line N in file F"
    r"HIP out of memory",
    r"NCCL.*(?:out of memory|Cuda failure 'out of memory')",
)
_OOM_RE = re.compile("|".join(OOM_PATTERNS), re.IGNORECASE)


def find_oom(text: str) -> str | None:
    """The first line of ``text`` that reports a GPU OOM, or None."""
    for line in text.splitlines():
        if _OOM_RE.search(line):
            return line.strip()
    return None


# --- bootstrap (issue 4; additive) ------------------------------------------------
# The in-child bootstrap (oomguard/bootstrap/) that guards an unchanged Trainer command.
ENV_BOOTSTRAP = "OOMGUARD_BOOTSTRAP"  # "0"/"off"/"false": no PYTHONPATH injection, nothing patched
ENV_BOOTSTRAP_SKIP = "OOMGUARD_BOOTSTRAP_SKIP"  # comma list of parts to leave alone, e.g. "knobs,resume"
ENV_DELIVERED = "OOMGUARD_DELIVERED"  # JSON knob -> "flag" | "placeholder" | "in_process" (how each order travels)
EVENT_BOOTSTRAP_TRAINER = "bootstrap_trainer"  # the child patched a Trainer it built (each rank writes one)

# --- faithful wrap (issue 12): what the child really runs, and whether a change landed ----------
# The child's observation of its recipe, one per rank and stage (``knobs`` uses registry names):
#   stage "built":    when its Trainer is constructed (after oomguard's orders, before training);
#   stage "in_force": at train begin, after a checkpoint's optimizer/scheduler state is loaded.
# Fields: attempt, rank, stage, knobs {knob: value}, fields {knob: where it lives}, world_size,
# effective_batch, output_dir (absolute), trainer, args_class, lr_scheduler_type, optim, lora (bool).
EVENT_RECIPE_OBSERVED = "recipe_observed"
STAGE_BUILT = "built"
STAGE_IN_FORCE = "in_force"
EVENT_CHANGE_VERIFIED = "change_verified"  # supervisor: an ordered change shows in the child (knob, expected, observed)
EVENT_CHANGE_NOT_APPLIED = "change_not_applied"  # supervisor: it does not (knob, expected, observed, why)
ENV_OBSERVE = "OOMGUARD_OBSERVE"  # comma list of policy-declared knob names the child reports too

# --- one vocabulary (issue 14) ---------------------------------------------------------------
ENV_RESUME_MODE = "OOMGUARD_RESUME_MODE"  # a ResumeMode value, decided by policy.decide(); "" = normal


class ResumeMode(str, enum.Enum):
    """How the child loads the checkpoint it resumes from (the supervisor's decision)."""

    NORMAL = "normal"
    OPTIMIZER_ON_CPU = "optimizer_on_cpu"  # after a resume_oom: map the optimizer state to CPU first


# The guard's per-step events: one ``step`` per completed optimizer step (fields: step = global_step
# now completed, max_steps, epoch, attempt; rank added by the writer), one ``trainer_log`` per
# Trainer ``on_log`` (fields: step, logs = {name: number} as the trainer logged them: loss,
# learning_rate, grad_norm, ...).
EVENT_STEP = "step"
EVENT_TRAINER_LOG = "trainer_log"
