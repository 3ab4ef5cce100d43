"""The child's progress as the supervisor sees it: measured from its ``step`` events (one per
completed optimizer step, protocol.Event.STEP), shown as a live status line (attempt, the rung in
words, step / max_steps, steps/s, ETA, memory vs cap), and the heartbeats' ages (hang detection)."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..policy.narrative import KIND_WORDS
from ..policy.sanity import lr_note
from ..protocol import HEARTBEAT, Event, FailureKind, rank_of_file
from .console import say

if TYPE_CHECKING:
    from .journal import Journal

__all__ = ["completed_step", "retry_words", "rung_words", "grown_words", "change_words", "duration_words",
           "ProgressTail", "HeartbeatClock", "READ_CHUNK", "RATE_WINDOW"]

GIB = 2**30
TOKEN_COUNTS = ("num_tokens", "num_input_tokens_seen")  # running totals trainers log (TRL, HF)
READ_CHUNK = 1024 * 1024  # bytes of events.jsonl read per tick: a runaway writer cannot blow our memory
RATE_WINDOW = 20  # step events the steps/s rate is measured over


def completed_step(event: Mapping[str, Any]) -> int | None:
    """The optimizer step an event says was completed (a ``step`` event's ``step``), or None: every
    other event is not progress (``nan_detected`` and ``fault_injected`` even name a step not done)."""
    step = event.get("step")
    ok = event.get("event") == Event.STEP.value and isinstance(step, int) and not isinstance(step, bool)
    return step if ok else None


_SHORT = {"per_device_train_batch_size": "batch", "gradient_accumulation_steps": "accumulation",
          "max_seq_length": "length", "lora_r": "LoRA r", "lora_alpha": "LoRA alpha", "learning_rate": "LR",
          "max_grad_norm": "clip norm", "precision": "precision"}


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def change_words(change: Mapping[str, Any]) -> str:
    """``{"knob": "gradient_accumulation_steps", "old": 2, "new": 4}`` -> ``accumulation ×2``."""
    knob, old, new = str(change.get("knob")), change.get("old"), change.get("new")
    name = _SHORT.get(knob, knob)
    numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (old, new))
    if knob == "gradient_accumulation_steps" and numbers and old and new % old == 0 and new > old:
        return f"{name} ×{new // old}"
    return f"{name} {_fmt(old)} → {_fmt(new)}" if old is not None else f"{name} {_fmt(new)}"


def _plain(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def rung_words(rung: Any, changes: Sequence[Any]) -> str:
    """"after CUDA OOM: batch 8 → 4, accumulation ×2"; "as requested" before any rung."""
    rung = _plain(rung)
    if not isinstance(rung, Mapping):
        return "as requested"
    try:
        kind = KIND_WORDS[FailureKind(rung.get("ladder"))]
    except ValueError:
        kind = str(rung.get("ladder"))
    words = [change_words(c) for c in map(_plain, changes) if isinstance(c, Mapping)]
    return f"after {kind}: {', '.join(words) if words else 'same knobs'}"


def retry_words(failure: Any, first: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """A retry with no new rung: "after a crash: same knobs", and what earlier rungs changed since attempt 1
    ("(batch 4 → 2, accumulation ×2 since attempt 1)"), so a later attempt never reads "as requested"."""
    try:
        kind = KIND_WORDS[FailureKind(failure.get("kind"))] if isinstance(failure, Mapping) else "an interruption"
    except ValueError:
        kind = str(failure.get("kind"))
    since = [change_words({"knob": k, "old": first.get(k), "new": v}) for k, v in now.items() if first.get(k) != v]
    return f"after {kind}: same knobs" + (f" ({', '.join(since)} since attempt 1)" if since else "")


def grown_words(changes: Sequence[Any]) -> str:
    """A grow-back's attempt (issue 18 item 5): "grown back: batch 4 → 8, accumulation 2 → 1"."""
    words = [change_words(c) for c in map(_plain, changes) if isinstance(c, Mapping)]
    return f"grown back: {', '.join(words) if words else 'same knobs'}"


def duration_words(seconds: float) -> str:
    """42 -> "42 s", 312 -> "5 min 12 s", 7300 -> "2 h 01 min"."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressTail:
    """Reads ``events.jsonl`` from where it left off; prints a status line when a step moves."""

    def __init__(self, journal: "Journal", attempt: int, echo: bool = True, every_s: float = 15.0):
        self.journal, self.attempt, self.echo, self.every_s = journal, attempt, echo, every_s
        self.offset = journal.events_path.stat().st_size if journal.events_path.exists() else 0
        self.step: int | None = None
        self.max_steps: int | None = None
        self.times: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_WINDOW)
        self.tokens: collections.deque[tuple[float, float]] = collections.deque(maxlen=RATE_WINDOW)
        self.memory: dict[str, Any] = {}
        self.cap: int | None = None  # bytes: the emulated card's limit (vram_limit), else the GPU's size
        self.last_print = 0.0
        self.last_step_printed: int | None = None
        self.lr_noted = False

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
            if isinstance(event, dict):
                self.take(event)

    def take(self, event: Mapping[str, Any]) -> None:
        """Learn from one event of this attempt."""
        name = event.get("event")
        if (step := completed_step(event)) is not None and event.get("attempt", self.attempt) == self.attempt:
            if self.step is None or step > self.step:
                self.step = step
                if isinstance(event.get("time"), (int, float)):
                    self.times.append((float(event["time"]), step))
            if isinstance(event.get("max_steps"), int):
                self.max_steps = event["max_steps"]
        elif name == Event.TRAINER_LOG.value and event.get("attempt", self.attempt) == self.attempt:
            self._take_tokens(event)
        elif name == Event.MEMORY.value:
            self.memory = dict(event)
        elif name == Event.VRAM_LIMIT.value and isinstance(event.get("limit"), int):
            self.cap = event["limit"]
        elif name == Event.RECIPE_OBSERVED.value and self.attempt == 1 and event.get("attempt") == 1:
            self._note_lr(event)

    def _note_lr(self, event: Mapping[str, Any]) -> None:
        """Attempt 1's learning rate against its class's range: said once at the start, journaled."""
        if self.lr_noted:
            return
        self.lr_noted = True
        knobs = event.get("knobs") if isinstance(event.get("knobs"), Mapping) else {}
        lr, lora = knobs.get("learning_rate"), bool(event.get("lora"))
        note = lr_note(lr, lora)
        if note:
            self.journal.event(Event.LR_NOTE, attempt=1, learning_rate=float(lr), lora=lora, note=note)
            say(f"note: {note}")

    def _take_tokens(self, event: Mapping[str, Any]) -> None:
        """The trainer's own running token count: TRL's ``num_tokens``, HF's ``num_input_tokens_seen``."""
        logs = event.get("logs") if isinstance(event.get("logs"), Mapping) else {}
        seen = next((logs[k] for k in TOKEN_COUNTS if isinstance(logs.get(k), (int, float))), None)
        if seen is not None and isinstance(event.get("time"), (int, float)):
            if not self.tokens or seen > self.tokens[-1][1]:
                self.tokens.append((float(event["time"]), float(seen)))

    def token_rate(self) -> float | None:
        """Tokens per second over the last logs that counted them (None: the trainer does not count)."""
        if len(self.tokens) < 2:
            return None
        (t0, n0), (t1, n1) = self.tokens[0], self.tokens[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def rate(self) -> float | None:
        """Steps per second over the last RATE_WINDOW step events of this attempt."""
        if len(self.times) < 2:
            return None
        (t0, s0), (t1, s1) = self.times[0], self.times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def _cap(self) -> int | None:
        if self.cap is not None:
            return self.cap
        gpu = self.journal.record.gpu or {}
        total = gpu.get("total_gib") if isinstance(gpu, Mapping) else None
        return int(total * GIB) if isinstance(total, (int, float)) and total > 0 else None

    def _memory_words(self) -> str | None:
        used = next((self.memory.get(k) for k in ("step_peak", "allocated") if isinstance(self.memory.get(k), int)),
                    None)
        if used is None:
            return None
        cap = self._cap()
        return f"memory {used / GIB:.1f} / {cap / GIB:.1f} GiB" if cap else f"memory {used / GIB:.1f} GiB"

    def _rung(self) -> str:
        attempts = self.journal.record.attempts
        if not attempts:
            return "as requested"
        if attempts[-1].rung is None and len(attempts) > 1:
            from .grow_back import grown_attempts  # here: grow_back imports this module

            if attempts[-1].n in grown_attempts(self.journal.record):
                return grown_words(_plain(attempts[-2].decision).get("changes") or ())
            return retry_words(_plain(attempts[-2].failure), attempts[0].knobs, attempts[-1].knobs)
        before = _plain(attempts[-2].decision) if len(attempts) > 1 else None
        changes = before.get("changes") or () if isinstance(before, Mapping) else ()
        return rung_words(attempts[-1].rung, changes)

    def line(self) -> str:
        step = "-" if self.step is None else str(self.step)
        parts = [f"attempt {self.attempt}", self._rung(),
                 f"step {step}/{self.max_steps}" if self.max_steps else f"step {step}"]
        rate = self.rate()
        if rate:
            parts.append(f"{rate:.2f} steps/s" if rate >= 0.1 else f"{1 / rate:.0f} s/step")
            if (tokens := self.token_rate()) is not None:
                parts.append(f"{tokens:,.0f} tokens/s")
            if self.max_steps and self.step is not None and self.max_steps > self.step:
                parts.append(f"ETA {duration_words((self.max_steps - self.step) / rate)}")
        if (memory := self._memory_words()) is not None:
            parts.append(memory)
        return " · ".join(parts)

    def tick(self) -> None:
        self._read_new()
        now = time.monotonic()
        if not self.echo or self.step == self.last_step_printed or now - self.last_print < self.every_s:
            return
        self.last_print, self.last_step_printed = now, self.step
        say(self.line())


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
            rank = rank_of_file(hb.name, HEARTBEAT)
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
