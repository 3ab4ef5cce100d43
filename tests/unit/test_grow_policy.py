"""policy/grow.py (issue 18 item 5): which degrade may be grown back from, when, and what the decision says. Pure."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomguard.errors import PolicyError
from oomguard.knobs import effective_batch
from oomguard.policy import AttemptView, Failure, RungRef, decide, parse_policy
from oomguard.policy.grow import below_streak, decide_grow, grow_target, grow_words
from oomguard.policy.ladder import OOM_KINDS
from oomguard.policy.records import CulpritOrder, DecisionAction, KnobChange, MemoryPoint, ResumeClass
from oomguard.policy.schema import HalveBatchRung
from oomguard.protocol import FailureKind

B, A, L = "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length"
OOM = Failure(FailureKind.CUDA_OOM, step=3)
HALVE = RungRef(FailureKind.CUDA_OOM, 0)
LENGTH = RungRef(FailureKind.CUDA_OOM, 1)
GIB = 2**30


def policy(halve_times: int = 3, halve_resume: str = "safe", **grow):
    return parse_policy({
        "name": "grow", "knobs": {L: 1024, B: 8, A: 1, "lora_r": 16, "lora_alpha": 32, "precision": "bf16"},
        "ladders": {"cuda_oom": {"rungs": [
            {"op": "halve_batch", "floor": 1, "max_times": halve_times, "resume": halve_resume},
            {"knob": L, "op": "scale", "factor": 0.5, "floor": 128, "max_times": 2, "resume": "reindex"}]}},
        "limits": {"max_attempts": 1000, "no_progress_attempts": 1000, "split_culprits": False,
                   "grow_back": {"after_steps": 20, "below_fraction": 0.5, "max_times": 2, **grow}}}, "grow.yaml")


def knobs(batch: int, accum: int, length: int = 1024) -> dict:
    return {L: length, B: batch, A: accum, "lora_r": 16}


def view(n: int, k: dict, rung: RungRef | None = None, failure: Failure | None = None, **kw) -> AttemptView:
    return AttemptView(n=n, knobs=k, rung=rung, failure=failure, max_step=3 * n, **kw)


DEGRADED = [view(1, knobs(8, 1), failure=OOM), view(2, knobs(4, 2), HALVE)]


def low(steps: range, peak: int = GIB // 4) -> list[MemoryPoint]:
    return [MemoryPoint(s, peak) for s in steps]


# --- which degrade ---------------------------------------------------------------------------------------------
def test_a_halved_batch_grows_back_to_the_batch_before_the_rung_with_the_same_effective_batch():
    target = grow_target(policy(), DEGRADED)
    assert target is not None and target.rung == HALVE and target.degraded == 2
    assert (target.knobs[B], target.knobs[A]) == (8, 1) and target.effective_batch == 8
    assert target.changes == (KnobChange(B, 4, 8), KnobChange(A, 2, 1))
    assert (target.grown, target.allowed) == (0, 2)


def test_a_length_rung_is_never_grown_back_nor_the_batch_rung_beneath_it():
    history = [*DEGRADED[:1], view(2, knobs(4, 2), HALVE, failure=OOM), view(3, knobs(4, 2, 512), LENGTH)]
    assert grow_target(policy(), history) is None


def test_a_batch_rung_that_is_not_resume_safe_is_never_grown_back():
    assert grow_target(policy(halve_resume="reindex"), DEGRADED) is None


def test_grow_back_is_off_with_max_times_0_and_bounded_by_it():
    assert grow_target(policy(max_times=0), DEGRADED) is None
    assert grow_target(policy(max_times=1), DEGRADED, grown={7}) is None  # one grow-back already


def test_after_a_grow_back_nothing_is_left_to_undo():
    history = [*DEGRADED, view(3, knobs(8, 1))]
    assert grow_target(policy(), history, grown={3}) is None


def test_a_batch_that_ran_out_of_memory_twice_is_never_grown_back_into():
    history = [*DEGRADED[:1], view(2, knobs(4, 2), HALVE), view(3, knobs(8, 1), failure=OOM),
               view(4, knobs(4, 2), HALVE)]
    assert grow_target(policy(), history[:2]) is not None
    assert grow_target(policy(), history, grown={3}) is None


def test_no_grow_back_when_the_rung_has_no_use_left_for_a_new_oom_at_the_grown_batch():
    assert grow_target(policy(halve_times=1), DEGRADED) is None


def test_two_degrades_grow_back_one_at_a_time():
    history = [view(1, knobs(8, 1), failure=OOM), view(2, knobs(4, 2), HALVE, failure=OOM),
               view(3, knobs(2, 4), HALVE)]
    first = grow_target(policy(), history)
    assert (first.knobs[B], first.knobs[A]) == (4, 2)
    second = grow_target(policy(), [*history, view(4, knobs(4, 2))], grown={4})
    assert (second.knobs[B], second.knobs[A]) == (8, 1) and second.grown == 1


def test_a_knob_change_outside_a_rung_or_a_grow_back_forgets_the_degrades():
    assert grow_target(policy(), [*DEGRADED, view(3, knobs(2, 4))]) is None


def test_quarantined_rows_stay_and_split_steps_go():
    history = [DEGRADED[0], view(2, knobs(4, 2), HALVE, culprit=CulpritOrder(split=((5, 2),), quarantine=(3, 9)))]
    assert grow_target(policy(), history).culprit == CulpritOrder(quarantine=(3, 9))


# --- when: the memory samples --------------------------------------------------------------------------------
def test_the_streak_runs_from_the_first_sample_after_the_last_one_over_the_bar():
    cap = GIB
    samples = low(range(1, 5)) + [MemoryPoint(5, GIB // 2)] + low(range(6, 11)) + low(range(20, 41, 10))
    assert below_streak(samples, cap, 0.5) == (35, GIB // 4)  # steps 6..40; unsampled steps count as around them
    assert below_streak([*samples, MemoryPoint(41, GIB)], cap, 0.5) == (0, 0)


def test_a_step_is_as_high_as_its_highest_rank():
    samples = [MemoryPoint(1, 10, 0), MemoryPoint(2, 10, 0), MemoryPoint(2, 900, 1), MemoryPoint(3, 10, 1)]
    assert below_streak(samples, 1000, 0.5) == (1, 10)


def test_decide_grow_waits_for_after_steps_then_says_what_and_why():
    p, target = policy(), grow_target(policy(), DEGRADED)
    assert decide_grow(p, target, low(range(3, 22)), GIB) is None  # 19 steps
    assert decide_grow(p, target, low(range(3, 23)), None) is None  # no cap: no grow-back
    decision = decide_grow(p, target, low(range(3, 23)), GIB)
    assert decision.action is DecisionAction.RETRY and decision.resume_class is ResumeClass.SAFE
    assert decision.rung is None and decision.resume_from is None and decision.effective_batch == (8, 8)
    assert decision.reason.startswith("grow back: batch 4 → 8 (accumulation 2 → 1) after 20 steps below 50 % of "
                                      "the cap (step peak at most 0.25 of 1.00 GiB)")
    assert "grow-back 1 of at most 2" in decision.reason


def test_grow_words():
    assert grow_words((KnobChange(B, 2, 4), KnobChange(A, 8, 4)), 200, 0.6) == \
        "batch 2 → 4 (accumulation 8 → 4) after 200 steps below 60 % of the cap"


# --- the schema ---------------------------------------------------------------------------------------------------
def test_the_defaults_and_the_bounds():
    rule = policy().limits.grow_back
    assert (rule.after_steps, rule.below_fraction, rule.max_times) == (20, 0.5, 2)
    default = parse_policy({"name": "d", "knobs": {L: 64, B: 2, A: 1, "lora_r": 4, "lora_alpha": 8,
                                                   "precision": "fp32"},
                            "ladders": {"cuda_oom": {"rungs": [{"op": "halve_batch", "resume": "safe"}]}}}, "d.yaml")
    assert default.limits.grow_back.model_dump() == {"after_steps": 200, "below_fraction": 0.5, "max_times": 2}
    for bad in ({"below_fraction": 1.0}, {"below_fraction": 0.0}, {"after_steps": 0}, {"max_times": -1},
                {"every": 3}):
        with pytest.raises(PolicyError):
            policy(**bad)


# --- properties over random histories built by decide() and grow-backs -------------------------------------------
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def runs(draw):
    p = policy(halve_times=draw(st.integers(1, 4)), halve_resume=draw(st.sampled_from(["safe", "safe", "reindex"])),
               max_times=draw(st.integers(0, 3)), after_steps=1)
    start = knobs(draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16])), draw(st.integers(1, 4)))
    return p, start, draw(st.lists(st.sampled_from(["oom", "grow", "ok"]), min_size=1, max_size=14))


@SETTINGS
@given(runs())
def test_grow_back_properties_over_random_histories(run):
    simulate(*run)


def simulate(p, start: dict, script: list[str]) -> int:
    """Play ``script`` (an OOM, a chance to grow back, a quiet attempt) through decide() and the grow-back rule,
    checking every grow-back taken; the number taken."""
    attempts, grown = [view(1, start)], set()
    for what in script:
        last = attempts[-1]
        if what == "oom":
            attempts[-1] = view(last.n, last.knobs, last.rung, failure=OOM)
            decision = decide(p, attempts)
            if decision.action is not DecisionAction.RETRY:
                break
            attempts.append(view(last.n + 1, dict(decision.knobs), decision.rung))
            continue
        target = grow_target(p, attempts, grown)
        decision = decide_grow(p, target, low(range(1, 3)), GIB)
        if what != "grow" or decision is None:
            continue
        rung = p.ladders.cuda_oom.rungs[target.rung.index]
        assert isinstance(rung, HalveBatchRung) and rung.resume is ResumeClass.SAFE  # only a safe batch rung
        assert len(grown) < p.limits.grow_back.max_times  # never more than max_times
        assert effective_batch(decision.knobs) == effective_batch(last.knobs)  # the effective batch is kept
        assert decision.knobs[B] > last.knobs[B]
        assert {k for k in decision.knobs if decision.knobs[k] != last.knobs[k]} <= {B, A}
        ooms = sum(1 for a in attempts if a.failure and a.failure.kind in OOM_KINDS
                   and (a.knobs[B], a.knobs[L]) == (decision.knobs[B], decision.knobs[L]))
        assert ooms < 2  # never into a batch that ran out of memory twice
        attempts.append(view(last.n + 1, dict(decision.knobs)))
        grown.add(last.n + 1)
    assert len(grown) <= p.limits.grow_back.max_times
    return len(grown)


def test_the_simulation_grows_back_where_it_may():
    """The property test is not vacuous: a history like the random ones grows back, twice at most."""
    script = ["oom", "grow", "oom", "grow", "oom", "grow", "oom", "grow"]
    assert simulate(policy(halve_times=4, max_times=2, after_steps=1), knobs(16, 1), script) == 2
    assert simulate(policy(halve_times=4, max_times=0, after_steps=1), knobs(16, 1), script) == 0
