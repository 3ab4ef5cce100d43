"""The run directory's state: ``run.json`` (rewritten atomically) and ``events.jsonl``.

DESIGN §3 is the contract. Everything a morning reader needs is here; the console
summary is rendered from it (``oomguard.report``), never from in-memory state.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import numbers
import os
import shlex
import stat
import time
from pathlib import Path
from typing import Any

import psutil

from ..errors import RunDirError
from ..protocol import (ATTEMPTS_DIR, EVENTS_JSONL, HEARTBEAT, LOCK_FILE, POLICY_COPY, RUN_JSON, SECRET_MASK,
                        FailureKind, RunStatus, atomic_write_json, emit_event, read_jsonl, redact,
                        redact_argv, secret_values)

FILE_MODE, DIR_MODE = 0o600, 0o700  # the run dir holds commands, logs and tracebacks: owner only, any umask


@dataclasses.dataclass
class AttemptRecord:
    n: int
    started: float
    knobs: dict[str, Any]
    rung: dict[str, Any] | None = None  # {"ladder": kind, "index": i} applied before this attempt
    resumed_from: str | None = None
    command: list[str] = dataclasses.field(default_factory=list)
    delivered: dict[str, str] = dataclasses.field(default_factory=dict)
    ended: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    failure: dict[str, Any] | None = None  # {kind, step, phase, detail, rank}
    max_step: int | None = None
    decision: dict[str, Any] | None = None  # what the supervisor decided after it
    pid: int | None = None  # the child's pid = its process group (it leads its own session)
    pid_started: float | None = None  # the child's start time, seconds since the epoch (pid reuse check)
    interrupted: str | None = None  # why it ended without a verdict: "SIGTERM", "SIGINT", "supervisor died"
    orders: dict[str, Any] = dataclasses.field(default_factory=dict)  # what OOMGUARD_KNOBS asked the child to set
    observed: dict[str, Any] | None = None  # the child's recipe_observed payload (in force, else as built)
    verified: dict[str, str] = dataclasses.field(default_factory=dict)  # ordered knob -> verified|not_applied|unverified
    resumed_step: int | None = None  # the step of resumed_from


@dataclasses.dataclass
class RunRecord:
    status: str
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
    give_up: str | None = None
    root_cause: str | None = None
    attempts: list[AttemptRecord] = dataclasses.field(default_factory=list)
    requested_source: str = "command"  # "observed": read in the child; "command": only its flags are known
    orders: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the next attempt asks the child to set
    capabilities: dict[str, str] = dataclasses.field(default_factory=dict)  # knob -> how a change reaches the child
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)  # knob -> why a change of it cannot land
    start_from_policy: bool = False
    supervisor: dict[str, Any] | None = None  # {pid, started}: who holds the run now (RunLock checks it)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        anames = {f.name for f in dataclasses.fields(AttemptRecord)}
        kw["attempts"] = [AttemptRecord(**{k: v for k, v in a.items() if k in anames})
                          for a in d.get("attempts", [])]
        return cls(**kw)


class Journal:
    """Owns one run dir while the supervisor holds its lock.

    What it writes is redacted (``protocol.redact``): the in-memory record keeps the real
    command (it is what runs), run.json and events.jsonl get ``***`` for secret values."""

    def __init__(self, run_dir: Path, record: RunRecord):
        self.run_dir = run_dir
        self.record = record
        record.supervisor = supervisor_identity()

    @property
    def events_path(self) -> Path:
        return self.run_dir / EVENTS_JSONL

    def attempt_dir(self, n: int) -> Path:
        return self.run_dir / ATTEMPTS_DIR / f"{n:03d}"

    def _secrets(self) -> list[str]:
        found = secret_values(self.record.command)
        for a in self.record.attempts:
            found += secret_values(a.command)
        return sorted(set(found), key=len, reverse=True)  # longest first: no half-masked overlap

    def save(self) -> None:
        self.record.updated = time.time()
        atomic_write_json(self.run_dir / RUN_JSON, redact(self.record.to_dict(), self._secrets()))
        self._secure()

    def event(self, name: str, **fields: Any) -> None:
        emit_event(self.run_dir, name, source="supervisor", **redact(fields, self._secrets()))

    def events(self) -> list[dict[str, Any]]:
        """The journal's readable events: torn lines and lines of the wrong types are left out
        (a reader comparing ``time`` or ``step`` must not crash on a foreign or damaged line)."""
        return [e for e in read_jsonl(self.events_path) if event_problem(e) is None]

    def set_status(self, status: RunStatus) -> None:
        self.record.status = status.value
        self.save()

    def _secure(self) -> None:
        """Owner-only modes whatever the umask: the run dir, its state files and the newest
        attempt's files (older ones were secured when they were newest)."""
        paths = [(self.run_dir, DIR_MODE), (self.run_dir / ATTEMPTS_DIR, DIR_MODE)]
        paths += [(self.run_dir / f, FILE_MODE) for f in (RUN_JSON, EVENTS_JSONL, POLICY_COPY, LOCK_FILE, HEARTBEAT)]
        if self.record.attempts:
            newest = self.attempt_dir(self.record.attempts[-1].n)
            paths.append((newest, DIR_MODE))
            paths += [(p, FILE_MODE) for p in _files_in(newest)]
        for path, mode in paths:
            _chmod(path, mode)


def _files_in(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return []


def _chmod(path: Path, mode: int) -> None:
    try:
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
    except FileNotFoundError:
        pass  # not written (yet): secured when it is


# --- reading back what is on disk: wrong types are reported, never crash a reader ----------
def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def event_problem(e: dict[str, Any]) -> str | None:
    """Why a parsed journal line is unusable (``time`` not a number, ``step`` not an integer, ...)."""
    if not isinstance(e.get("event"), str):
        return f"event {e.get('event')!r} is not a name"
    if not _is_number(e.get("time")):
        return f"time {e.get('time')!r} is not a number (seconds since the epoch)"
    for key in ("step", "attempt", "rank"):
        if e.get(key) is not None and not _is_int(e[key]):
            return f"{key} {e[key]!r} is not an integer"
    return None


def _attempt_problems(i: int, a: Any) -> list[tuple[str, str, bool]]:
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
    if isinstance(a.get("failure"), dict) and not isinstance(a["failure"].get("kind"), str):
        out.append((f"{where}.failure.kind", f"{a['failure'].get('kind')!r} is not a failure kind", True))
    rung = (a.get("decision") or {}).get("rung") if isinstance(a.get("decision"), dict) else None
    if rung is not None:
        out += _rung_problems(f"{where}.decision.rung", rung)
    return out


def _rung_problems(where: str, rung: Any) -> list[tuple[str, str, bool]]:
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


def record_problems(d: Any) -> list[tuple[str, str, bool]]:
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
    for k in ("started", "updated", "ended"):
        if d.get(k) is not None and not _is_number(d[k]):
            out.append((k, f"{d[k]!r} is not a number (seconds since the epoch)", True))
    if isinstance(d.get("attempts"), list):
        for i, a in enumerate(d["attempts"]):
            out += _attempt_problems(i, a)
    return out


_REAL_COMMANDS: dict[str, list[str]] = {}  # run dir -> the argv this process was given (secrets included)


def remember_command(run_dir: Path, command: list[str]) -> None:
    """The command ``oomguard run`` was given for ``run_dir``: run.json holds it redacted, so a
    continued run takes its secret values from here (memory only), never from disk."""
    _REAL_COMMANDS[str(Path(run_dir).absolute())] = list(command)


def masked_secrets(command: list[str]) -> bool:
    """Whether a recorded command lost secret values to redaction (it cannot be run as is)."""
    return any(a == SECRET_MASK or a.endswith("=" + SECRET_MASK) for a in command)


def read_run_json(path: Path) -> Any:
    """The parsed file; RunDirError (exit 2) naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RunDirError(f"{path}: run.json is unreadable ({exc}); move the run dir aside "
                          "or pass a new --run-dir") from exc


def load_record(run_dir: Path) -> RunRecord | None:
    """The run's record, or None for a new (missing or empty) dir; RunDirError otherwise."""
    path = run_dir / RUN_JSON
    if path.exists():
        data = read_run_json(path)
        problems = record_problems(data)
        if problems:
            raise RunDirError("\n".join(f"{path}: {where}: {what}" for where, what, _ in problems)
                              + "\nfix run.json by hand, move the run dir aside, or pass a new --run-dir")
        try:
            record = RunRecord.from_dict(data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RunDirError(f"{path}: run.json is unreadable ({exc!r}); move the run dir aside "
                              "or pass a new --run-dir") from exc
        return _with_real_command(run_dir, record)
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: not an oomguard run dir (no {RUN_JSON}) and not empty; "
                          "pass an empty or new --run-dir")
    return None


def _with_real_command(run_dir: Path, record: RunRecord) -> RunRecord:
    real = _REAL_COMMANDS.get(str(Path(run_dir).absolute()))
    if real is not None and redact_argv(real) == redact_argv(record.command):
        record.command = list(real)  # the same command: its secret values come back from memory
    return record


def command_text(command: list[str]) -> str:
    return shlex.join(redact_argv(command))


# --- the supervisor that holds a run dir ------------------------------------------------
def supervisor_identity(pid: int | None = None) -> dict[str, Any]:
    """pid and start time (s since the epoch, psutil's): a pid alone may have been reused."""
    pid = os.getpid() if pid is None else pid
    try:
        return {"pid": pid, "started": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "started": None}


def holder_alive(holder: Any) -> bool:
    """Whether ``{pid, started}`` is a live process other than this one, the same process
    (start time within 1 s) and not a zombie."""
    if not isinstance(holder, dict) or not _is_int(holder.get("pid")) or holder["pid"] == os.getpid():
        return False
    try:
        proc = psutil.Process(holder["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = holder.get("started")
        return not _is_number(started) or abs(proc.create_time() - started) <= 1.0
    except psutil.Error:
        return False


def _recorded_holder(run_dir: Path) -> Any:
    """The supervisor run.json names as the run's holder (None: no readable record)."""
    try:
        data = json.loads((run_dir / RUN_JSON).read_bytes())
    except (OSError, ValueError):
        return None
    return data.get("supervisor") if isinstance(data, dict) else None


def check_not_in_use(run_dir: Path) -> None:
    """RunDirError naming the live supervisor of ``run_dir``, if any; creates and writes nothing
    (asked before other checks: "in use by pid N" is the message that tells what to do)."""
    holder = _recorded_holder(run_dir)
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 128, 0).decode(errors="replace").split() or ["another process"]
            raise RunDirError(f"{run_dir}: in use by supervisor pid {pid[0]}; wait for it to finish, stop it, "
                              "or pass another --run-dir") from None
        finally:
            os.close(fd)
    if holder_alive(holder):
        raise RunDirError(f"{run_dir}: in use by supervisor pid {holder['pid']} (alive, named in {RUN_JSON}; "
                          f"its {LOCK_FILE} was deleted or replaced); wait for it to finish, stop it "
                          f"(kill {holder['pid']}), or pass another --run-dir")


class RunLock:
    """An exclusive flock on ``<run-dir>/.lock``, plus proof that the supervisor run.json names is
    dead: a deleted or replaced ``.lock`` must not let two supervisors (two children) share a run."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 128, 0).decode(errors="replace").split() or ["another process"]
            os.close(fd)
            raise RunDirError(f"{self.path.parent}: in use by supervisor pid {holder[0]}; wait for it "
                              "to finish, stop it, or pass another --run-dir") from None
        holder = _recorded_holder(self.path.parent)
        if holder_alive(holder):
            os.close(fd)
            raise RunDirError(f"{self.path.parent}: in use by supervisor pid {holder['pid']} (alive, named in "
                              f"{RUN_JSON}; its {LOCK_FILE} was deleted or replaced); wait for it to finish, "
                              f"stop it (kill {holder['pid']}), or pass another --run-dir") from None
        me = supervisor_identity()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{me['pid']} {me['started']}\n".encode(), 0)
        self.fd = fd
        return self

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise RunDirError(f"{self.path}: cannot create the lock file ({exc.strerror}); make "
                              f"{self.path.parent} a writable directory or pass another --run-dir") from None
        os.fchmod(fd, FILE_MODE)
        return fd

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
