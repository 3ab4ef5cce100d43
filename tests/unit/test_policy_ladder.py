"""Rung arithmetic: every op, odd batches, quantile steps, truncation share by hand."""

import pytest
from pydantic import TypeAdapter

from oomguard.policy import (
    DataProfile,
    apply_rung,
    effective_batch,
    ladder_chain,
    largest_proper_divisor,
    load_policy_arg,
    rung_budget,
    truncation_share,
)
from oomguard.policy.schema import Rung
from oomguard.protocol import FailureKind

KNOBS = {"max_seq_length": 2048, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
         "lora_r": 16, "lora_alpha": 32, "precision": "bf16", "learning_rate": 2e-4}


def rung(**kw) -> Rung:
    return TypeAdapter(Rung).validate_python({"resume": "safe", **kw})


def profile(points, max_len):
    return DataProfile(count=1000, quantiles=tuple(points), max_len=max_len)


def test_effective_batch_counts_ranks():
    assert effective_batch(KNOBS) == 16
    assert effective_batch(KNOBS, world_size=4) == 64


@pytest.mark.parametrize("n, expected", [(8, 4), (2, 1), (9, 3), (15, 5), (7, 1), (1, 1), (49, 7)])
def test_largest_proper_divisor(n, expected):
    assert largest_proper_divisor(n) == expected


@pytest.mark.parametrize("batch, accum, new_batch, new_accum", [(8, 2, 4, 4), (9, 2, 3, 6), (7, 1, 1, 7), (6, 3, 3, 6)])
def test_halve_batch_keeps_effective_batch_exact(batch, accum, new_batch, new_accum):
    knobs = {**KNOBS, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum}
    new = apply_rung(rung(op="halve_batch"), knobs)
    assert (new["per_device_train_batch_size"], new["gradient_accumulation_steps"]) == (new_batch, new_accum)
    assert effective_batch(new) == effective_batch(knobs)


def test_halve_batch_respects_floor_and_one():
    assert apply_rung(rung(op="halve_batch", floor=4), {**KNOBS, "per_device_train_batch_size": 6}) is None
    assert apply_rung(rung(op="halve_batch"), {**KNOBS, "per_device_train_batch_size": 1}) is None
    assert apply_rung(rung(op="halve_batch", floor=4), KNOBS)["per_device_train_batch_size"] == 4


def test_scale_int_rounds_down_to_multiple_and_clamps_to_floor():
    r = rung(op="scale", knob="max_seq_length", factor=0.7, multiple_of=64, floor=512)
    assert apply_rung(r, KNOBS)["max_seq_length"] == 1408  # 2048*0.7=1433.6 -> 1433 -> 1408
    assert apply_rung(r, {**KNOBS, "max_seq_length": 600})["max_seq_length"] == 512
    assert apply_rung(r, {**KNOBS, "max_seq_length": 512}) is None


def test_scale_float_knob():
    new = apply_rung(rung(op="scale", knob="learning_rate", factor=0.5, floor=1e-4), KNOBS)
    assert new["learning_rate"] == pytest.approx(1e-4)
    assert apply_rung(rung(op="scale", knob="learning_rate", factor=0.5, floor=1e-4), new) is None


def test_set_changes_only_when_different():
    assert apply_rung(rung(op="set", knob="precision", value="fp16"), KNOBS)["precision"] == "fp16"
    assert apply_rung(rung(op="set", knob="precision", value="bf16"), KNOBS) is None


@pytest.mark.parametrize("current, expected", [(16, 8), (20, 16), (64, 32), (4, None), (2, None)])
def test_step_down_moves_to_next_value_below(current, expected):
    new = apply_rung(rung(op="step_down", knob="lora_r", values=[64, 32, 16, 8, 4]), {**KNOBS, "lora_r": current})
    assert (new["lora_r"] if new else None) == expected


def test_quantile_step_without_profile_halves_rounded():
    r = rung(op="quantile_step", floor=512)
    assert apply_rung(r, KNOBS)["max_seq_length"] == 1024
    assert apply_rung(r, {**KNOBS, "max_seq_length": 1000})["max_seq_length"] == 512  # 500 -> 448 -> floor
    assert apply_rung(r, {**KNOBS, "max_seq_length": 512}) is None


def test_quantile_step_with_profile_walks_quantiles_below_longest_sample():
    prof = profile([(0.0, 10), (0.5, 300), (0.9, 900), (0.99, 1500), (1.0, 1800)], max_len=1800)
    r = rung(op="quantile_step", floor=1000, multiple_of=64)
    lengths, knobs = [], dict(KNOBS)
    while (knobs := apply_rung(r, knobs, prof)) is not None:
        lengths.append(knobs["max_seq_length"])
    # below the longest sample (1800), each step at least to max_factor 0.875 of it: 1536 (not the
    # 1792 quantile), 1344 (not 1472), then 896 is under the floor -> 1000
    assert lengths == [1536, 1344, 1000]
    wide = rung(op="quantile_step", floor=1000, multiple_of=64, max_factor=0.999)
    assert apply_rung(wide, KNOBS, prof)["max_seq_length"] == 1792  # the old walk, quantile by quantile


def test_quantile_step_never_takes_a_tiny_step():
    fine = profile([(q / 100, 10 * q + 24) for q in range(101)], max_len=1024)  # a quantile every ~10 tokens
    r = rung(op="quantile_step", floor=256, multiple_of=64)
    assert apply_rung(r, {**KNOBS, "max_seq_length": 1024}, fine)["max_seq_length"] == 896  # not 960


def test_truncation_share_matches_hand_computation():
    prof = profile([(0.0, 100), (0.5, 200), (1.0, 400)], max_len=400)
    total = 0.5 * (100 + 200) / 2 + 0.5 * (200 + 400) / 2  # 225 token-units
    assert truncation_share(prof, 300) == pytest.approx(0.25 * 100 / 2 / total)  # crosses at q=0.75
    assert truncation_share(prof, 150) == pytest.approx((0.25 * 50 / 2 + 0.5 * (50 + 250) / 2) / total)
    assert truncation_share(prof, 400) == 0.0
    assert truncation_share(prof, 0) == pytest.approx(1.0)


def test_data_profile_rejects_unsorted_quantiles():
    with pytest.raises(ValueError, match="sorted"):
        profile([(0.5, 10), (0.0, 5), (1.0, 20)], 20)


def test_ladder_chain_follows_then_and_falls_back_to_cuda_oom():
    h100 = load_policy_arg("h100-80gb")
    assert ladder_chain(h100, FailureKind.HOST_OOM) == [FailureKind.HOST_OOM, FailureKind.CUDA_OOM]
    demo = load_policy_arg("demo")
    assert ladder_chain(demo, FailureKind.RESUME_OOM) == [FailureKind.CUDA_OOM]
    assert ladder_chain(demo, FailureKind.CRASH) == []


def test_rung_budget_sums_max_times():
    demo = load_policy_arg("demo")
    expected = sum(r.max_times for k in FailureKind if demo.ladders.get(k) for r in demo.ladders.get(k).rungs)
    assert rung_budget(demo) == expected > 0


def test_quantile_step_never_cuts_more_than_min_factor_in_one_step():
    # 80 % of samples are ~78 tokens, 20 % are 2048 long: the next quantile below 2048 is 64,
    # which would truncate most tokens at once; one step stops at half the length instead.
    long_tail = profile([(0.0, 30), (0.8, 78), (0.81, 2048), (1.0, 2048)], max_len=2048)
    r = rung(op="quantile_step", floor=32, multiple_of=16)
    assert apply_rung(r, KNOBS, long_tail)["max_seq_length"] == 1024
    r = rung(op="quantile_step", floor=32, multiple_of=16, min_factor=0.01)
    assert apply_rung(r, KNOBS, long_tail)["max_seq_length"] == 64
