"""Grow back in the supervisor (issue 18 item 5; the rule is ``policy/grow.py``'s).

While an attempt runs, :class:`GrowWatch` takes the child's journaled memory samples (``memory`` events'
``step_peak``) and the cap (the child's ``vram_limit`` event, else ``--vram-limit``, else the card's memory); when
the policy says grow it writes ``<run_dir>/grow_request.json`` naming the attempt, and the child's shutdown callback
saves at its next step end, journals ``grow_stopped`` and exits 0. :meth:`GrowWatch.finish` turns that stop into the
decision the loop carries out (the next attempt resumes from that checkpoint with the batch before the rung), and
for an attempt that grew, says whether the child shows the batch in force (Trust rule 3: ``grew back`` is said
only then; otherwise ``grow back not applied``). One node only: ``node_loop`` never builds a watch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ..policy.grow import below_streak, decide_grow, grow_target, grow_words
from ..policy.records import Decision, DecisionAction, GrowTarget, MemoryPoint
from ..protocol import GROW_REQUEST_JSON, STAGE_IN_FORCE, Event, atomic_write_json, parse_size
from ..protocol.run_record import RunRecord
from .history import attempt_views
from .journal import AttemptRecord, Journal
from .observation import VERIFIED, Observation, observation_of, verify
from .progress import GIB, ProgressTail
from .resume_point import survey_checkpoints
from .spec import RunSpec, say

__all__ = ["Grown", "GrowTail", "GrowWatch", "clear_request", "grown_attempts", "memory_point"]


@dataclasses.dataclass(frozen=True)
class Grown:
    """An attempt's knobs came from a grow-back: the decision and its words (for the verdict's line)."""

    decision: Decision
    words: str


def grown_attempts(record: RunRecord) -> set[int]:
    """The attempts that ran a grow-back: the one before ended without a failure yet with a retry decision, and
    they ran its batch (a continued run that never carried the decision out did not grow)."""
    pairs = zip(record.attempts, record.attempts[1:])
    return {a.n for before, a in pairs if before.failure is None and before.decision is not None
            and before.decision.action is DecisionAction.RETRY
            and all(a.knobs.get(c.knob) == c.new for c in before.decision.changes)}


def memory_point(event: Mapping[str, Any]) -> MemoryPoint | None:
    """A ``memory`` event's step peak (bytes), or None (a CPU sample: host RSS only). Where the guard journals
    ``window_peak`` (the highest step peak since its previous sample), the unsampled steps count too."""
    step, peak, window = event.get("step"), event.get("step_peak"), event.get("window_peak")
    if event.get("event") != Event.MEMORY.value or not isinstance(step, int) or not isinstance(peak, int):
        return None
    return MemoryPoint(step, max(peak, window if isinstance(window, int) else 0), int(event.get("rank") or 0))


def _cap(spec: RunSpec) -> int | None:
    """Bytes: ``--vram-limit``, else the card's memory (the child's ``vram_limit`` event overrides both)."""
    if spec.vram_limit:
        return parse_size(spec.vram_limit)
    total = spec.gpu.total_gib if spec.gpu is not None else None
    return int(total * GIB) if isinstance(total, (int, float)) and total > 0 else None


class GrowWatch:
    """One attempt's grow-back watch (see the module doc); ``grown``: how this attempt's knobs came, if by a
    grow-back."""

    def __init__(self, spec: RunSpec, journal: Journal, attempt: AttemptRecord, grown: Grown | None = None):
        self.spec, self.journal, self.attempt, self.grown = spec, journal, attempt, grown
        self.target = self._target()
        self.cap = _cap(spec)
        self.samples: list[MemoryPoint] = []
        self.requested: Decision | None = None
        self.words = ""
        self.verdict: bool | None = None  # a grown attempt: whether the child showed the grown batch
        self._recipe: dict[str, Mapping[str, Any]] = {}
        self._fresh = False  # samples since the last check
        clear_request(spec.run_dir)

    def _target(self) -> GrowTarget | None:
        record = self.journal.record
        views = attempt_views(record)
        views[-1] = dataclasses.replace(views[-1], culprit=self.attempt.culprit)
        return grow_target(self.spec.policy, views, grown_attempts(record))

    def take(self, event: Mapping[str, Any]) -> None:
        """Learn from one event (the tail reads every new one)."""
        name = event.get("event")
        if event.get("time", 0) < self.attempt.started:
            return
        if (point := memory_point(event)) is not None:
            self.samples.append(point)
            self._fresh = True
        elif name == Event.VRAM_LIMIT.value and isinstance(event.get("limit"), int):
            self.cap = event["limit"]
        elif name == Event.RECIPE_OBSERVED.value and event.get("attempt") == self.attempt.n \
                and not event.get("rank"):
            self._recipe[str(event.get("stage"))] = event

    def check(self) -> None:
        """After new events: ask for the stop once the policy says grow; verify a grown attempt once in force."""
        if self.target is not None and self.requested is None and self._fresh:
            self._fresh = False
            decision = decide_grow(self.spec.policy, self.target, self.samples, self.cap)
            if decision is not None:
                self._request(decision)
        if self.grown is not None and self.verdict is None and STAGE_IN_FORCE in self._recipe:
            self._verify(list(self._recipe.values()))

    def _request(self, decision: Decision) -> None:
        rule = self.spec.policy.limits.grow_back
        steps, high = below_streak(self.samples, int(self.cap or 0), rule.below_fraction)
        step = max(s.step for s in self.samples)
        self.requested, self.words = decision, grow_words(decision.changes, steps, rule.below_fraction)
        atomic_write_json(self.spec.run_dir / GROW_REQUEST_JSON,
                          {"attempt": self.attempt.n, "step": step, "reason": decision.reason})
        self.journal.event(Event.GROW_BACK_REQUESTED, attempt=self.attempt.n, step=step, steps_below=steps,
                           peak=high, cap=int(self.cap or 0), below_fraction=rule.below_fraction,
                           knobs=dict(decision.knobs), changes=[c.to_dict() for c in decision.changes],
                           reason=decision.reason)
        say(self.spec, f"growing back at the next step end: {self.words}; the child saves a checkpoint and stops, "
                       "the next attempt resumes from it")

    def finish(self, clean: bool) -> Decision | None:
        """At the attempt's end: the request cleared; a grown attempt's verdict, if not said yet; the grow
        decision (resume point filled in) when the child stopped for it and the attempt ended ``clean`` (no
        failure, no stop signal), else None."""
        clear_request(self.spec.run_dir)
        events = self.journal.events()
        if self.grown is not None and self.verdict is None:
            seen = observation_of(events, self.attempt.n, self.attempt.started)
            self._verify([r for r in (seen.built, seen.in_force) if r is not None])
        stop = next((e for e in events if e.get("event") == Event.GROW_STOPPED.value
                     and e.get("attempt") == self.attempt.n and e.get("time", 0) >= self.attempt.started), None)
        if self.requested is None or stop is None or not clean:
            return None
        resume = self._resume_point(str(stop.get("path") or ""), events)
        where = f"resuming from {Path(resume).name}" if resume else "no complete checkpoint: starting fresh"
        decision = dataclasses.replace(self.requested, resume_from=resume,
                                       reason=f"{self.requested.reason}; the child stopped at step "
                                              f"{stop.get('step')}, {where}")
        self.attempt.decision = decision
        self.journal.save()
        return decision

    def _resume_point(self, path: str, events: list[dict[str, Any]]) -> str | None:
        """The checkpoint the child saved on request when it is complete, else the newest complete one."""
        complete = survey_checkpoints(self.journal, events).complete
        named = [s for s in complete if path and Path(s.path).resolve() == Path(path).resolve()]
        chosen = named[0] if named else max(complete, key=lambda s: s.step, default=None)
        return str(chosen.path) if chosen is not None else None

    def _verify(self, reports: list[Mapping[str, Any]]) -> None:
        """Trust rule 3 for a grown attempt: the grown batch and accumulation against the child's recipe."""
        seen = Observation(built=next((r for r in reports if r.get("stage") != STAGE_IN_FORCE), None),
                           in_force=next((r for r in reports if r.get("stage") == STAGE_IN_FORCE), None))
        decision, words = self.grown.decision, self.grown.words
        checks = verify({c.knob: c.new for c in decision.changes}, seen)
        self.verdict = bool(checks) and all(c.status is VERIFIED for c in checks)
        why = None if self.verdict else "; ".join(c.why for c in checks if c.status is not VERIFIED) or "no change"
        self.journal.event(Event.GROW_BACK, attempt=self.attempt.n, verified=self.verdict, knobs=dict(decision.knobs),
                           changes=[c.to_dict() for c in decision.changes], resumed_from=self.attempt.resumed_from,
                           reason=decision.reason, why=why)
        say(self.spec, f"grew back: {words} (in force in the child)" if self.verdict
            else f"grow back not applied: {words} was asked, but {why}")


def clear_request(run_dir: Path) -> None:
    """No request outlives its attempt (the child ignores one naming another attempt anyway)."""
    try:
        (run_dir / GROW_REQUEST_JSON).unlink()
    except FileNotFoundError:
        pass


class GrowTail(ProgressTail):
    """The status line's tail, also feeding a :class:`GrowWatch` (one read of events.jsonl per tick)."""

    def __init__(self, journal: Journal, attempt: int, echo: bool, watch: GrowWatch):
        super().__init__(journal, attempt, echo)
        self.watch = watch

    def take(self, event: Mapping[str, Any]) -> None:
        super().take(event)
        self.watch.take(event)

    def tick(self) -> None:
        super().tick()
        self.watch.check()
