"""The child's progress as the supervisor sees it: the live one-line status (attempt, rung,
step, memory — read from the child's events) and the heartbeats' ages (hang detection)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..protocol import HEARTBEAT
from .ranks import rank_of_heartbeat

if TYPE_CHECKING:
    from .journal import Journal

GIB = 2**30
READ_CHUNK = 1024 * 1024  # bytes of events.jsonl read per tick: a runaway writer cannot blow our memory
# child events whose ``step`` is a completed optimizer step (nan_detected and fault_injected
# name the step being attempted, so they are not progress)
COMPLETED_STEP_EVENTS = frozenset({"step", "memory", "checkpoint_saved", "emergency_save", "cache_cleared",
                                   "pressure_save", "shutdown_saved", "error_recorded"})


def completed_step(event: dict[str, Any]) -> int | None:
    """The optimizer step an event says was completed, or None (not a progress event)."""
    step = event.get("step")
    return step if event.get("event") in COMPLETED_STEP_EVENTS and isinstance(step, int) else None


class ProgressTail:
    """Reads ``events.jsonl`` from where it left off; prints a status line when a step moves."""

    def __init__(self, journal: "Journal", attempt: int, echo: bool, every_s: float = 15.0):
        self.journal, self.attempt, self.echo, self.every_s = journal, attempt, echo, every_s
        self.offset = journal.events_path.stat().st_size if journal.events_path.exists() else 0
        self.step: int | None = None
        self.memory: dict[str, Any] = {}
        self.last_print = 0.0
        self.last_step_printed: int | None = None

    def _read_new(self) -> None:
        try:
            with self.journal.events_path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read(READ_CHUNK)
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written last line waits for next time
        if not complete and len(chunk) == READ_CHUNK:
            complete = chunk  # one line longer than a chunk is no event: skip it (its pieces do not parse)
        self.offset += len(complete)
        for raw in complete.splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if (step := completed_step(event)) is not None:
                self.step = max(self.step or 0, step)
            if event.get("event") == "memory":
                self.memory = event

    def line(self) -> str:
        rung = self.journal.record.attempts[-1].rung if self.journal.record.attempts else None
        parts = [f"attempt {self.attempt}", f"rung {rung['ladder']}#{rung['index']}" if rung else "rung -",
                 f"step {self.step if self.step is not None else '-'}"]
        alloc = self.memory.get("allocated")
        if isinstance(alloc, (int, float)):
            parts.append(f"{alloc / GIB:.2f} GiB allocated")
        return "[oomguard] " + " · ".join(parts)

    def tick(self) -> None:
        self._read_new()
        now = time.monotonic()
        if not self.echo or self.step == self.last_step_printed or now - self.last_print < self.every_s:
            return
        self.last_print, self.last_step_printed = now, self.step
        try:
            print(self.line(), file=sys.stderr, flush=True)
        except (OSError, ValueError):
            self.echo = False  # our stderr went away (`| head` exited, terminal closed): keep supervising


class HeartbeatClock:
    """How long each rank's heartbeat has not moved, on the supervisor's own monotonic clock.

    A file's mtime is the child's wall clock: comparing it with ours turns an NTP step or a
    suspended VM into a false hang (clock forward) or no detection at all (clock back). Only
    whether an mtime *changed* is trusted; when it did is read from ``clock``. Before any
    heartbeat of this attempt moves, the child as a whole is timed from its launch: a hang
    in model load, dataset map, rendezvous or an optimizer load is a hang too."""

    def __init__(self, heartbeat_dir: Path, clock: Callable[[], float] = time.monotonic):
        self.dir, self.clock = Path(heartbeat_dir), clock
        self.started = clock()
        self.seen = self._mtimes()  # rank -> mtime (ns) at launch: a previous attempt's, not a beat
        self.moved: dict[int, float] = {}  # rank -> our clock when its mtime last changed

    def _mtimes(self) -> dict[int, int]:
        found = {}
        for hb in self.dir.glob(f"{HEARTBEAT}*"):
            rank = rank_of_heartbeat(hb.name)
            try:
                if rank is not None:
                    found[rank] = hb.stat().st_mtime_ns
            except FileNotFoundError:
                continue
        return found

    def ages(self) -> dict[int, float]:
        """Seconds since each rank that beat this attempt last beat; ``{0: since launch}`` before
        any did. A rank file untouched this attempt (a previous run's wider world) is not waited on."""
        now = self.clock()
        for rank, mtime in self._mtimes().items():
            if self.seen.get(rank) != mtime:
                self.seen[rank], self.moved[rank] = mtime, now
        if not self.moved:
            return {0: now - self.started}
        return {rank: now - when for rank, when in self.moved.items()}
