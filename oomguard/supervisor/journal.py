"""The run directory's state: ``run.json`` (rewritten atomically) and ``events.jsonl``.

DESIGN §3 is the contract. Everything a morning reader needs is here; the console
summary is rendered from it (``oomguard.report``), never from in-memory state.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from pathlib import Path
from typing import Any

from ..errors import RunDirError
from ..protocol import (ATTEMPTS_DIR, EVENTS_JSONL, LOCK_FILE, RUN_JSON, RunStatus, atomic_write_json,
                        emit_event, read_jsonl)


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
    """Owns one run dir while the supervisor holds its lock."""

    def __init__(self, run_dir: Path, record: RunRecord):
        self.run_dir = run_dir
        self.record = record

    @property
    def events_path(self) -> Path:
        return self.run_dir / EVENTS_JSONL

    def attempt_dir(self, n: int) -> Path:
        return self.run_dir / ATTEMPTS_DIR / f"{n:03d}"

    def save(self) -> None:
        self.record.updated = time.time()
        atomic_write_json(self.run_dir / RUN_JSON, self.record.to_dict())

    def event(self, name: str, **fields: Any) -> None:
        emit_event(self.run_dir, name, source="supervisor", **fields)

    def events(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.events_path))

    def set_status(self, status: RunStatus) -> None:
        self.record.status = status.value
        self.save()


def load_record(run_dir: Path) -> RunRecord | None:
    """The run's record, or None for a new (missing or empty) dir; RunDirError otherwise."""
    path = run_dir / RUN_JSON
    if path.exists():
        import json

        try:
            return RunRecord.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as exc:
            raise RunDirError(f"{path}: run.json is unreadable ({exc}); move the run dir aside "
                              "or pass a new --run-dir") from exc
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: not an oomguard run dir (no {RUN_JSON}) and not empty; "
                          "pass an empty or new --run-dir")
    return None


class RunLock:
    """An exclusive flock on ``<run-dir>/.lock``: two supervisors never share a run dir."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"{self.path.parent}: in use by supervisor pid {holder}; wait for it "
                              "to finish, stop it, or pass another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
