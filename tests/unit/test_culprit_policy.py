"""Culprit batches, the pure parts (issue 19): the judgment (policy.culprit), the decision (decide()), the
order's round trip through run.json and the environment. Properties over random evidence (hypothesis)."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oomguard.errors import PolicyError
from oomguard.policy import CheckpointInfo, Evidence, Failure, GiveUpReason, decide, parse_policy
from oomguard.policy.culprit import carried_order, in_flight_from_line, judge_nan, judge_oom, split_factor
from oomguard.policy.records import AttemptView, CulpritOrder, DataProfile, InFlight, InFlightBatch
from oomguard.protocol import ENV_CULPRIT, FailureKind, Phase, parse_inject
from oomguard.protocol.run_record import AttemptRecord, Decision

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KNOBS = {"max_seq_length": 64, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "lora_r": 8,
         "lora_alpha": 16, "precision": "bf16", "learning_rate": 1e-3}
POLICY = {"name": "culprit", "knobs": KNOBS,
          "ladders": {"cuda_oom": {"rungs": [{"op": "halve_batch", "floor": 1, "max_times": 2, "resume": "safe"}]},
                      "nan_loss": {"rungs": [{"knob": "learning_rate", "op": "scale", "factor": 0.5, "floor": 1e-6,
                                              "max_times": 2, "resume": "numeric"}]}},
          "limits": {"max_attempts": 20, "no_progress_attempts": 5, "max_quarantined_rows": 8}}
CKPTS = (CheckpointInfo("/c/checkpoint-2", 2), CheckpointInfo("/c/checkpoint-4", 4))


def policy(**limits):
    return parse_policy({**POLICY, "limits": {**POLICY["limits"], **limits}}, "culprit.yaml")


def oom_flight(step, tokens, rows=4, factor=1, before=()):
    """The failing step: micro-batches of ``before`` tokens that finished, then the one that ran out of memory."""
    done = tuple(InFlightBatch(tuple(range(rows)), t, True) for t in before)
    return InFlight(step, "oom", (*done, InFlightBatch(tuple(range(100, 100 + rows)), tokens, None)), factor)


def nan_flight(step, bad=(28, 29), good=(24, 25)):
    return InFlight(step, "nan", (InFlightBatch(good, 16, True), InFlightBatch(bad, 16, False)))


def attempt(n, failure=None, flight=None, fitted=(), culprit=None, resumed=None, knobs=KNOBS, max_step=3):
    return AttemptView(n, dict(knobs), None, failure, max_step, resumed_step=resumed, culprit=culprit,
                       in_flight=flight, fitted_tokens=tuple(fitted))


OOM = Failure(FailureKind.CUDA_OOM, step=4, phase=Phase.FORWARD_BACKWARD)
NAN = Failure(FailureKind.NAN_LOSS, step=4, phase=Phase.OPTIMIZER_STEP)


# --- the OOM judgment ---------------------------------------------------------------------------
@SETTINGS
@given(fitted=st.lists(st.integers(1, 5000), min_size=1, max_size=20), tokens=st.integers(1, 20000),
       rows=st.integers(1, 16), failed_factor=st.sampled_from([1, 2, 4, 8]))
def test_a_split_only_for_the_largest_micro_batch_and_never_below_one_row(fitted, tokens, rows, failed_factor):
    last = attempt(2, OOM, oom_flight(5, tokens, rows, failed_factor), fitted, resumed=4,
                   culprit=CulpritOrder(split=((5, failed_factor),)) if failed_factor > 1 else None)
    verdict = judge_oom([last])
    if verdict.culprit:
        assert tokens > max(fitted) and rows >= 2  # larger than everything that fit; splittable
        assert failed_factor < verdict.factor <= rows  # more than what failed, at most one row per chunk
        assert verdict.factor == rows or tokens / verdict.factor <= max(fitted)  # small enough, or the finest
        assert verdict.step == 5
    else:
        assert tokens <= max(fitted) or rows < 2 or failed_factor >= rows
    # monotone: a larger failing batch never turns a culprit into a non-culprit (with room to split)
    if verdict.culprit:
        assert judge_oom([attempt(2, OOM, oom_flight(5, tokens * 2, rows, failed_factor), fitted, resumed=4,
                                  culprit=last.culprit)]).culprit


def test_no_culprit_without_evidence_or_when_nothing_fit():
    assert not judge_oom([attempt(1, OOM, None, (16,))]).culprit  # no in-flight record
    why = judge_oom([attempt(1, OOM, oom_flight(1, 64), ())])
    assert not why.culprit and "recipe itself is too big" in why.why
    same = judge_oom([attempt(1, OOM, oom_flight(3, 16), (16, 16))])
    assert not same.culprit and "not the cause" in same.why
    packed = judge_oom([attempt(1, OOM, oom_flight(3, 64, rows=1), (16,))])
    assert not packed.culprit and "one row" in packed.why
    padding_free = InFlight(3, "oom", (InFlightBatch((1, 2), 64, None),), unsplittable="padding-free rows")
    assert "cannot be split (padding-free rows)" in judge_oom([attempt(1, OOM, padding_free, (16,))]).why


def test_the_failing_steps_own_finished_micro_batches_count_as_fitted():
    first_step = attempt(1, OOM, oom_flight(1, 64, before=(16,)), ())
    assert judge_oom([first_step]).culprit  # micro-batch 1 of step 1 fit, micro-batch 2 is 4x larger
    assert not judge_oom([attempt(1, OOM, oom_flight(1, 64, factor=2, before=(16,)), ())]).culprit  # chunks


def test_fitted_tokens_count_across_a_learning_rate_change_not_across_a_batch_change():
    earlier = attempt(1, NAN, None, (40,))
    lr = attempt(2, OOM, oom_flight(6, 48), (), knobs={**KNOBS, "learning_rate": 5e-4})
    assert judge_oom([earlier, lr]).culprit  # the LR does not change a micro-batch's memory
    batch = attempt(2, OOM, oom_flight(6, 48), (), knobs={**KNOBS, "per_device_train_batch_size": 2})
    assert not judge_oom([earlier, batch]).culprit


def test_split_factor_is_the_smallest_power_of_two_that_fits():
    assert split_factor(48, 24, 4, 1) == 2
    assert split_factor(50, 24, 8, 1) == 4
    assert split_factor(48, 24, 4, 2) == 4  # factor 2 failed already
    assert split_factor(480, 24, 4, 1) == 4  # one row per chunk at most
    assert split_factor(480, 24, 4, 4) is None


def test_decide_splits_a_culprit_with_the_same_knobs_and_keeps_the_ladder_for_the_rest():
    p = policy()
    first = decide(p, Evidence([attempt(1, OOM, oom_flight(5, 64), (16, 16, 16))], CKPTS))
    assert first.rung is None and first.changes == () and first.knobs == KNOBS
    assert first.culprit == CulpritOrder(split=((5, 4),)) and first.resume_from == "/c/checkpoint-4"
    assert "the batch is the culprit" in first.reason and "step 5 as 4 smaller micro-batches" in first.reason
    # the same step fails again at one row per chunk: the recipe is too big, the cuda_oom ladder applies
    again = attempt(2, OOM, oom_flight(5, 64, factor=4), (16,), culprit=first.culprit, resumed=4)
    ladder = decide(p, Evidence([attempt(1, OOM, oom_flight(5, 64), (16, 16, 16)), again], CKPTS))
    assert ladder.knobs["per_device_train_batch_size"] == 2 and ladder.culprit is None  # a new batch regroups
    assert "one row per chunk" in ladder.reason
    # no evidence: the ladder, as before issue 19
    plain = decide(p, Evidence([attempt(1, OOM)], CKPTS))
    assert plain.knobs["per_device_train_batch_size"] == 2 and plain.culprit is None


def test_a_split_and_a_quarantine_are_carried_by_every_later_retry():
    order = CulpritOrder(split=((5, 2),), quarantine=(7,))
    crash = Failure(FailureKind.CRASH, step=6, detail="boom")
    d = decide(policy(), Evidence([attempt(1, crash, culprit=order)], CKPTS))
    assert d.culprit == order
    assert carried_order(order, same_knobs=False) == CulpritOrder(quarantine=(7,))
    assert carried_order(None, same_knobs=True) is None


# --- the NaN judgment -----------------------------------------------------------------------------
def test_a_first_nan_goes_to_the_ladder_a_recurring_one_quarantines_the_non_finite_micro_batch():
    p = policy()
    one = attempt(1, NAN, nan_flight(5))
    first = decide(p, Evidence([one], CKPTS))
    assert first.knobs["learning_rate"] == 5e-4 and first.culprit is None
    two = attempt(2, NAN, nan_flight(5), resumed=4, knobs=first.knobs)
    second = decide(p, Evidence([one, two], CKPTS))
    assert second.culprit == CulpritOrder(quarantine=(28, 29)) and second.changes == ()
    assert second.resume_from == "/c/checkpoint-4"  # the rows, not the weights: no walk further back
    assert "quarantining rows [28, 29]" in second.reason
    # other rows, or no rollback before the step: not the rows'
    assert not judge_nan([one, attempt(2, NAN, nan_flight(5, bad=(30, 31)), resumed=4)]).culprit
    assert not judge_nan([one, attempt(2, NAN, nan_flight(5), resumed=5)]).culprit
    unknown = InFlight(5, "nan", (InFlightBatch((1, 2), 8, None),))
    assert judge_nan([attempt(1, NAN, unknown), attempt(2, NAN, unknown, resumed=4)]).rows == (1, 2)


def test_the_quarantine_is_bounded_by_the_policy_and_gives_up_with_its_own_reason():
    one = attempt(1, NAN, nan_flight(5, bad=tuple(range(20, 26))))
    two = attempt(2, NAN, nan_flight(5, bad=tuple(range(20, 26))), resumed=4, culprit=CulpritOrder(quarantine=(1, 2, 3)))
    d = decide(policy(max_quarantined_rows=8), Evidence([one, two], CKPTS))
    assert d.give_up is GiveUpReason.QUARANTINE_LIMIT and "limits.max_quarantined_rows 8" in d.reason
    assert decide(policy(max_quarantined_rows=9), Evidence([one, two], CKPTS)).culprit.quarantine == (
        1, 2, 3, 20, 21, 22, 23, 24, 25)


@pytest.mark.parametrize("value", [-1, "many", 1.5])
def test_max_quarantined_rows_is_validated(value):
    with pytest.raises(PolicyError, match="max_quarantined_rows"):
        policy(max_quarantined_rows=value)


# --- the records ----------------------------------------------------------------------------------
def test_the_order_round_trips_through_run_json_and_the_environment():
    order = CulpritOrder(split=((3, 2), (9, 4)), quarantine=(5, 7))
    assert CulpritOrder.from_env(json.dumps(order.to_dict())) == order
    assert not CulpritOrder.from_env("") and CulpritOrder().factor(3) == 1 and order.factor(9) == 4
    with pytest.raises(ValueError, match=ENV_CULPRIT):
        CulpritOrder.from_env('{"split": {"0": 2}}')
    d = Decision.from_dict(json.loads(json.dumps(decide(policy(), Evidence(
        [attempt(1, OOM, oom_flight(5, 64), (16,))], CKPTS)).to_dict())))
    assert d.culprit == CulpritOrder(split=((5, 4),))
    a = AttemptRecord(n=2, started=0.0, knobs={}, culprit=order)
    assert AttemptRecord.from_dict(json.loads(json.dumps(a.to_dict()))).culprit == order
    assert "culprit" not in AttemptRecord(n=1, started=0.0, knobs={}).to_dict()


def test_the_in_flight_line_and_the_data_dependent_faults_parse():
    line = {"attempt": 1, "step": 2, "kind": "oom", "factor": 1, "unsplittable": None,
            "micro_batches": [{"rows": [[8, 4]], "tokens": 24, "finite": True}, {"rows": [[12, 2]], "tokens": 48}]}
    flight = in_flight_from_line(line)
    assert flight.rows == (8, 9, 10, 11, 12, 13) and flight.micro_batches[1].finite is None
    assert in_flight_from_line({"step": 1}) is None
    oom, nan = parse_inject("cuda_oom@tokens=40;nan@row=30,attempt=2")
    assert (oom.tokens, oom.data_dependent, nan.row, nan.attempt) == (40, True, 30, 2)
    with pytest.raises(ValueError, match="does not apply to crash"):
        parse_inject("crash@row=3")
    with pytest.raises(ValueError, match="does not apply to nan"):
        parse_inject("nan@tokens=3")


def test_padded_share_reads_the_profile():
    from oomguard.policy.culprit import padded_share

    profile = DataProfile(100, ((0.0, 4), (0.5, 8), (0.9, 12), (1.0, 40)), 40)
    assert padded_share(profile, 12) == 0.9 and padded_share(profile, 3) == 0.0 and padded_share(None, 3) is None


def test_split_culprits_off_sends_every_oom_to_the_ladder():
    d = decide(policy(split_culprits=False), Evidence([attempt(1, OOM, oom_flight(5, 64), (16, 16, 16))], CKPTS))
    assert d.culprit is None and d.knobs["per_device_train_batch_size"] == 2


def test_a_culprit_is_rare_past_max_split_steps_the_ladder_applies():
    split = CulpritOrder(split=((2, 2), (3, 2)))
    last = attempt(3, OOM, oom_flight(7, 64), (16, 16), culprit=split, resumed=6)
    d = decide(policy(max_split_steps=2), Evidence([last], CKPTS))
    assert d.knobs["per_device_train_batch_size"] == 2 and "2 steps are split already" in d.reason
    assert decide(policy(max_split_steps=3), Evidence([last], CKPTS)).culprit.split == ((2, 2), (3, 2), (7, 4))


def test_a_culprit_right_after_a_run_of_split_steps_goes_to_the_ladder():
    """Long rows from some point on (data sorted by length): after steps 5 and 6 were split, step 7's OOM is the
    batches', not one batch's; a gap in the run (step 4 split, 5 not) leaves the split as it was."""
    run = CulpritOrder(split=((5, 2), (6, 2)))
    last = attempt(3, OOM, oom_flight(7, 64), (16, 16), culprit=run, resumed=6)
    d = decide(policy(), Evidence([last], CKPTS))
    assert d.culprit is None  # the batch rung's smaller micro-batches replace the splits
    assert d.knobs["per_device_train_batch_size"] == 2 and "steps right before it (5-6)" in d.reason
    gap = attempt(3, OOM, oom_flight(7, 64), (16, 16), culprit=CulpritOrder(split=((4, 2), (6, 2))), resumed=6)
    assert decide(policy(), Evidence([gap], CKPTS)).culprit.split == ((4, 2), (6, 2), (7, 4))
    again = attempt(3, OOM, oom_flight(6, 64, factor=2), (16, 16), culprit=run, resumed=5)
    assert judge_oom([again]).culprit  # the split step itself, again: a larger factor, not the ladder
