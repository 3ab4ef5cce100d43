"""The live one-line status: attempt, rung, step, memory — read from the child's events."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .journal import Journal

GIB = 2**30
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
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a half-written last line waits for next time
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
        print(self.line(), file=sys.stderr, flush=True)
