"""The plan from probe data (issue 18): fits or not at the worst batch, the fastest that fits, the ladder's
first move (asked of ``oomguard.policy.decide``). Fabricated probe records; no torch."""

import pytest

from oomguard.policy import load_policy_arg
from oomguard.tune.choice import Verdict, make_plan
from oomguard.tune.record import ProbePoint, ProbeRecord
from oomguard.tune.render import render_plan

GIB = 2**30
A, B, C = 8 * GIB, 1_000_000.0, 40.0


def peak(batch: int, length: int) -> float:
    tokens = batch * length
    return A + B * tokens + C * tokens * length


def profile(mean: int, longest: int, near: bool = False) -> dict:
    """Rows of ``mean`` tokens but for a 1 % tail at ``longest`` (``near``: and 2 % just below it)."""
    def length(q: int) -> int:
        if q >= 99:
            return longest
        return longest - 248 if near and q >= 97 else mean

    quantiles = [[q / 100, length(q)] for q in range(101)]
    return {"count": 1000, "quantiles": quantiles, "max_len": longest, "total_tokens": 1000 * mean}


def record(capacity_gib: float, batch: int = 8, accum: int = 2, longest: int = 2048, mean: int = 300,
           cuda: bool = True, speeds=None, near: bool = False) -> ProbeRecord:
    """Every batch dividing the effective batch at three lengths; what exceeds the capacity did not fit."""
    capacity = int(capacity_gib * GIB)
    speeds = speeds or {1: 3000.0, 2: 4000.0, 4: 4600.0, 8: 4900.0, 16: 5000.0}
    pts = []
    for n in (longest, longest // 2, longest // 4):
        for b in (1, 2, 4, 8, 16):
            p = peak(b, n)
            fits = p <= capacity or not cuda
            pts.append(ProbePoint(batch=b, length=n, fits=fits, tokens=b * n,
                                  peak_reserved=int(p) if fits and cuda else None,
                                  peak_allocated=int(p * 0.92) if fits and cuda else None,
                                  tokens_per_s=speeds[b] if fits else None, step_s=1.0 if fits else None,
                                  error=None if fits else "CUDA out of memory. Tried to allocate 2.00 GiB"))
    return ProbeRecord(device="NVIDIA H200" if cuda else "cpu", cuda=cuda, total_bytes=int(141 * GIB),
                       vram_limit=capacity if cuda else None, capacity=capacity if cuda else None,
                       requested={"per_device_train_batch_size": batch, "gradient_accumulation_steps": accum,
                                  "max_seq_length": longest, "world_size": 1, "lora_r": 16, "precision": "bf16"},
                       worst_row=longest, rows=1000, packed=False, points=tuple(pts), profile=profile(mean, longest, near))


POLICY = load_policy_arg("rtx-24gb")


def test_the_average_batch_fits_but_the_tail_does_not():
    rec = record(capacity_gib=24)  # 8 x 2048 needs ~24.5 GiB; 8 rows of the 300-token average ~10.3 GiB
    plan = make_plan(rec, POLICY)
    assert plan.verdict is Verdict.DOES_NOT_FIT
    assert plan.command.peak == float("inf") and plan.command.measured  # it ran out of memory when probed
    assert plan.typical_peak is not None and plan.typical_peak < plan.capacity * 0.5
    text = render_plan(plan)
    assert "does NOT fit" in text and "the worst batch, not the average, decides" in text


def test_a_command_batch_implied_by_a_smaller_oom_does_not_fit():
    rec = record(capacity_gib=24, batch=16, accum=1)
    pts = tuple(ProbePoint(batch=16, length=p.length, fits=False, implied=True, error="not run")
                if p.batch == 16 and not p.fits else p for p in rec.points)
    plan = make_plan(ProbeRecord(**{**rec.__dict__, "points": pts}), POLICY)
    assert plan.verdict is Verdict.DOES_NOT_FIT and not plan.command.measured
    assert plan.best.batch == 4  # the fastest measured batch dividing 16 that fits with the margin


def test_fastest_fitting_configuration_keeps_the_effective_batch_and_the_margin():
    plan = make_plan(record(capacity_gib=24), POLICY, margin=0.10)
    best = plan.best
    assert (best.batch, best.accumulation, best.length) == (4, 4, 2048)  # 8 x 2048 does not fit; 4 x 2048 does
    assert best.batch * best.accumulation == 16 and best.peak <= plan.capacity * 0.9 and best.measured
    # a margin that 4 x 2048 (~16.3 GiB of 24) does not leave: 2 x 2048 is the fastest that does
    assert make_plan(record(capacity_gib=24), POLICY, margin=0.35).best.batch == 2


def test_a_command_that_fits_states_its_headroom():
    plan = make_plan(record(capacity_gib=40), POLICY)
    assert plan.verdict is Verdict.FITS
    assert plan.headroom == pytest.approx(40 * GIB - peak(8, 2048), rel=1e-6)
    assert plan.best.batch == 8  # 16 x 2048 does not fit 40 GiB; 8 is the fastest dividing 16 that does


def test_inside_the_margin_is_tight_not_fits():
    need = peak(8, 2048) / GIB
    plan = make_plan(record(capacity_gib=need / 0.95), POLICY, margin=0.10)
    assert plan.verdict is Verdict.TIGHT


def test_the_ladder_first_move_is_the_policy_decision():
    plan = make_plan(record(capacity_gib=24), POLICY)
    step = plan.ladder_first
    # rtx-24gb's first rung would cut 2048 -> 1024 (the 1 % tail holds 4 % of the tokens): decide() passes it
    # over for its 2 % bound and halves the batch, which the probe measured to fit
    assert step.changes == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
    assert "passed over cuda_oom rung 0" in step.reason and "max_token_cut" in step.reason
    assert (step.config.batch, step.config.length) == (4, 2048) and step.config.measured
    assert step.verdict is Verdict.FITS


def test_a_short_tail_lets_the_length_rung_go_first():
    rec = record(capacity_gib=24, near=True)  # a few rows at 1800, one in 100 at 2048: 1792 cuts < 2 %
    step = make_plan(rec, POLICY).ladder_first
    assert step.changes == {"max_seq_length": 1792}
    assert (step.config.batch, step.config.length) == (8, 1792) and not step.config.measured  # predicted
    assert step.verdict is Verdict.TIGHT  # 8 x 1792 needs ~22.3 GiB of 24: inside the 10 % margin


def test_without_a_length_knob_the_ladder_halves_the_batch():
    rec = record(capacity_gib=24)
    rec = ProbeRecord(**{**rec.__dict__, "requested": {**rec.requested, "max_seq_length": None}})
    step = make_plan(rec, POLICY).ladder_first
    assert step.changes == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
    assert "has no max_seq_length" in step.reason


def test_on_cpu_memory_is_unknown_but_the_speed_still_chooses():
    plan = make_plan(record(capacity_gib=24, cuda=False), POLICY)
    assert plan.verdict is Verdict.UNKNOWN and plan.capacity is None and plan.fit is None
    assert plan.best.batch == 16
    assert "memory unknown" in render_plan(plan)


def test_plan_json_is_plain():
    import json

    doc = make_plan(record(capacity_gib=24), POLICY).to_dict()
    json.dumps(doc, allow_nan=True)
    assert doc["verdict"] == "does_not_fit" and doc["fit"]["form"].startswith("peak = a + b*tokens")


def test_a_card_name_picks_its_shipped_policy():
    from oomguard.tune.session import policy_for

    assert policy_for("Tesla T4", None).name == "t4-16gb"  # by name when no size is given
    assert policy_for("NVIDIA A100-SXM4-40GB", "40GiB").name == "a100-40gb"
    assert policy_for("Some Card", None).name == "default" and policy_for(None, "24GiB") is None
