"""What the child really runs, taken into the run record (Trust rules 2 and 3).

The child's ``recipe_observed`` reports become ``requested`` (attempt 1), the knobs now, the
checkpoint dir, the capabilities decide() may use, and a verdict on every order
(``change_verified`` / ``change_not_applied``). The pure reading is in ``observation``.
"""

from __future__ import annotations

from typing import Any

from ..protocol import EVENT_CHANGE_NOT_APPLIED, EVENT_CHANGE_VERIFIED, Event
from ..protocol.run_record import RequestedSource
from .command import flags_in_command, placeholders_in
from .history import data_profile
from .journal import AttemptRecord, Journal
from .launch import GuardDelivery, launch_plan
from .observation import Observation, Verdict, capabilities, observation_of, verify
from .spec import RunSpec, say

__all__ = ["checkpoint_dir_from", "observe_attempt", "verify_orders"]

_VERDICT_EVENTS = {Verdict.VERIFIED: EVENT_CHANGE_VERIFIED, Verdict.NOT_APPLIED: EVENT_CHANGE_NOT_APPLIED}


def observe_attempt(spec: RunSpec, journal: Journal, attempt: AttemptRecord, events: list[dict[str, Any]]) -> None:
    """Take what the child reported it runs (Trust rules 2 and 3): the first report is the run's
    ``requested``; every report sets the knobs now, where checkpoints go, what a change can reach;
    each order is checked against it (``change_verified`` / ``change_not_applied``)."""
    record = journal.record
    seen = observation_of(events, attempt.n, attempt.started)
    if seen.seen:
        attempt.observed = seen.payload()
        attempt.knobs = {**{k: v for k, v in attempt.knobs.items() if k not in seen.fields}, **seen.knobs}
        record.config = dict(attempt.knobs)
        if record.requested_source is not RequestedSource.OBSERVED:
            record.requested = {**record.requested, **seen.knobs}
            record.requested_source = RequestedSource.OBSERVED
            journal.event(Event.REQUESTED_OBSERVED, attempt=attempt.n, knobs=record.requested, fields=seen.fields)
        checkpoint_dir_from(journal, seen.output_dir)
    plan = launch_plan(attempt.command)
    flags = flags_in_command(record.command, knobs=list(record.config), extra_flags=spec.extra_flags)
    record.capabilities = capabilities(seen, flags, in_process=plan.delivery is GuardDelivery.BOOTSTRAP,
                                       placeholders=placeholders_in(record.command))
    verify_orders(spec, journal, attempt, seen, events)


def checkpoint_dir_from(journal: Journal, output_dir: str | None) -> None:
    record = journal.record
    if output_dir and output_dir != record.checkpoint_dir:
        journal.event(Event.CHECKPOINT_DIR, path=output_dir, previous=record.checkpoint_dir or None,
                      reported_by="the child's Trainer (args.output_dir)")
        record.checkpoint_dir = output_dir


def verify_orders(spec: RunSpec, journal: Journal, attempt: AttemptRecord, seen: Observation,
                  events: list[dict[str, Any]]) -> None:
    """One verdict per order of ``attempt`` (``AttemptRecord.verified``), journaled; a knob whose change
    did not land is unavailable from now on (the ladder stops using it)."""
    record = journal.record
    profile = data_profile(e for e in events if e.get("time", 0) >= attempt.started)
    for check in verify(attempt.orders, seen, longest_row=profile.max_len if profile else None):
        attempt.verified[check.knob] = check.status.value
        if check.status is Verdict.NOT_APPLIED:
            record.unavailable[check.knob] = check.why
            if check.observed is not None:
                record.config[check.knob] = attempt.knobs[check.knob] = check.observed
        event = _VERDICT_EVENTS.get(check.status)
        if event:
            journal.event(event, attempt=attempt.n, knob=check.knob, expected=check.expected,
                          observed=check.observed, why=check.why or None)
        if check.status is Verdict.NOT_APPLIED:
            say(spec, f"change not applied: {check.knob} → {check.expected}: {check.why}")
    verify_rewarm(spec, journal, attempt, events)


REWARM = "rewarm_steps"  # the name a re-entered warm-up is verified under (AttemptRecord.verified)


def verify_rewarm(spec: RunSpec, journal: Journal, attempt: AttemptRecord, events: list[dict[str, Any]]) -> None:
    """A decided warm-up re-entry (Trust rule 3): verified when the child's ``rewarm`` event shows the
    optimizer's rate on the first step at 1/N of the schedule's; not applied when the attempt trained a
    step without one; unverified when it trained none."""
    steps = attempt.rewarm_steps
    if not steps:
        return
    seen = next((e for e in events if e.get("event") == Event.REWARM.value and e.get("attempt") == attempt.n), None)
    if seen is None:
        if not any(e.get("event") == Event.STEP.value and e.get("attempt") == attempt.n for e in events):
            attempt.verified[REWARM] = Verdict.UNVERIFIED.value
            return
        why = "the attempt trained without a rewarm event: its optimizer never showed the ramp"
        attempt.verified[REWARM] = Verdict.NOT_APPLIED.value
        journal.event(Event.CHANGE_NOT_APPLIED, attempt=attempt.n, knob=REWARM, expected=steps, observed=None, why=why)
        say(spec, f"change not applied: re-entering warm-up over {steps} steps: {why}")
        return
    lr, scheduled = seen.get("lr") or [], seen.get("scheduled") or []
    ok = seen.get("steps") == steps and len(lr) == len(scheduled) > 0 and all(
        abs(a - s / steps) <= 1e-9 + 1e-6 * abs(s) for a, s in zip(lr, scheduled))
    verdict = Verdict.VERIFIED if ok else Verdict.NOT_APPLIED
    attempt.verified[REWARM] = verdict.value
    journal.event(_VERDICT_EVENTS[verdict], attempt=attempt.n, knob=REWARM, expected=steps, observed=seen.get("steps"),
                  why=None if ok else f"the first step's rate {lr} is not 1/{steps} of the schedule's {scheduled}")
