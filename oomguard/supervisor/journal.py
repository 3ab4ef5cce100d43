"""The run directory's state: ``run.json`` (rewritten atomically) and ``events.jsonl``.

DESIGN §3 is the contract. Everything a morning reader needs is here; the console
summary is rendered from it (``oomguard.report``), never from in-memory state. The record's
types are the protocol's (``oomguard.protocol.run_record``), re-exported here.
"""

from __future__ import annotations

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
from ..protocol import (
    ATTEMPTS_DIR,
    EVENTS_JSONL,
    HEARTBEAT,
    LOCK_FILE,
    POLICY_COPY,
    RUN_JSON,
    SECRET_MASK,
    RunStatus,
    atomic_write_json,
    emit_event,
    read_jsonl,
    redact,
    redact_argv,
    secret_values,
)
from ..protocol.run_record import AttemptRecord, RunRecord, record_problems

__all__ = ["AttemptRecord", "DIR_MODE", "FILE_MODE", "Journal", "RunLock", "RunRecord", "check_not_in_use",
           "command_text", "event_problem", "holder_alive", "load_record", "masked_secrets", "read_run_json",
           "record_problems", "remember_command", "supervisor_identity"]

FILE_MODE, DIR_MODE = 0o600, 0o700  # the run dir holds commands, logs and tracebacks: owner only, any umask


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

    def event(self, name: str, **fields: Any) -> None:  # name: a protocol.Event (a str enum)
        emit_event(self.run_dir, name, source="supervisor", **redact(fields, self._secrets()))

    def events(self) -> list[dict[str, Any]]:
        """The journal's readable events: torn lines and lines of the wrong types are left out
        (a reader comparing ``time`` or ``step`` must not crash on a foreign or damaged line)."""
        return [e for e in read_jsonl(self.events_path) if event_problem(e) is None]

    def set_status(self, status: RunStatus) -> None:
        self.record.status = status
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
