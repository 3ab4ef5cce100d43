"""Properties of decide() over random policies and failure sequences (hypothesis)."""

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from oomguard.errors import PolicyError
from oomguard.policy import (
    AttemptView,
    CheckpointInfo,
    DataProfile,
    Failure,
    GiveUpReason,
    decide,
    effective_batch,
    parse_policy,
    rung_budget,
)
from oomguard.policy.schema import HalveBatchRung, QuantileStepRung, ScaleRung
from oomguard.protocol import FailureKind

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RESUME = st.sampled_from(["safe", "reindex", "transform", "numeric", "restart"])


@st.composite
def rungs(draw, knobs):
    kind = draw(st.sampled_from(["quantile", "halve", "scale_batch", "scale_accum", "set_accum", "lora", "precision"]))
    common = {"max_times": draw(st.integers(1, 4)), "resume": draw(RESUME)}
    seq, batch = knobs["max_seq_length"], knobs["per_device_train_batch_size"]
    if kind == "quantile":
        return {"knob": "max_seq_length", "op": "quantile_step", "floor": draw(st.integers(16, seq - 1)),
                "multiple_of": draw(st.sampled_from([1, 8, 64])), **common}
    if kind == "halve":
        return {"op": "halve_batch", "floor": draw(st.integers(1, max(1, batch - 1))), **common}
    if kind in ("scale_batch", "scale_accum"):
        knob = "per_device_train_batch_size" if kind == "scale_batch" else "gradient_accumulation_steps"
        return {"knob": knob, "op": "scale", "factor": draw(st.floats(0.1, 0.9)), "floor": 1, **common}
    if kind == "set_accum":
        return {"knob": "gradient_accumulation_steps", "op": "set", "value": draw(st.integers(1, 64)), **common}
    if kind == "lora":
        return {"knob": "lora_r", "op": "step_down", "values": draw(st.lists(st.integers(1, 128), min_size=1, max_size=5)), **common}
    return {"knob": "precision", "op": "set", "value": draw(st.sampled_from(["bf16", "fp16", "fp32"])), **common}


@st.composite
def policies(draw):
    knobs = {"max_seq_length": draw(st.integers(64, 4096)), "per_device_train_batch_size": draw(st.integers(1, 32)),
             "gradient_accumulation_steps": draw(st.integers(1, 16)), "lora_r": draw(st.integers(4, 64)),
             "lora_alpha": 32, "precision": draw(st.sampled_from(["bf16", "fp16", "fp32"]))}
    ladders = {"cuda_oom": {"rungs": draw(st.lists(rungs(knobs), min_size=1, max_size=6))}}
    for kind in ("eval_oom", "host_oom", "nan_loss", "hang"):
        if draw(st.booleans()):
            ladders[kind] = {"rungs": draw(st.lists(rungs(knobs), max_size=2)),
                             "then": "cuda_oom" if kind != "nan_loss" and draw(st.booleans()) else None}
    data = {"name": "random", "knobs": knobs, "ladders": ladders, "lr_rule": draw(st.sampled_from(["keep", "linear", "sqrt"])),
            "limits": {"max_attempts": 1000, "no_progress_attempts": 1000, "crash_retries": 1000,
                       "backoff": {"initial_s": 0, "max_s": 0}}}
    try:
        return parse_policy(data, "random.yaml")
    except PolicyError:
        assume(False)


PROFILES = st.one_of(st.none(), st.lists(st.integers(1, 5000), min_size=2, max_size=30).map(
    lambda xs: DataProfile(len(xs), tuple(zip([i / (len(xs) - 1) for i in range(len(xs))], sorted(xs))), max(xs))))
FAILURES = st.lists(st.sampled_from(list(FailureKind)), min_size=1, max_size=25)
CKPTS = [CheckpointInfo("/ckpt/checkpoint-10", 10)]


def play(policy, kinds, profile, world_size=1, bf16_ok=True):
    """Run decide() over the failure sequence; yield (knobs before, decision)."""
    history = [AttemptView(1, policy.start_knobs(), None, Failure(kinds[0], 10, detail="x0"), 10)]
    for i, kind in enumerate(kinds[1:] + [kinds[-1]], start=1):
        before = dict(history[-1].knobs)
        d = decide(policy, history, CKPTS, profile=profile, world_size=world_size, bf16_ok=bf16_ok)
        yield before, d
        if d.action == "give_up":
            return
        history.append(AttemptView(i + 1, d.knobs, d.rung, Failure(kind, 10 + i, detail=f"x{i}"), 10 + i))


@SETTINGS
@given(policies(), FAILURES, PROFILES, st.integers(1, 8), st.booleans())
def test_effective_batch_never_changes_silently(policy, kinds, profile, world_size, bf16_ok):
    for before, d in play(policy, kinds, profile, world_size, bf16_ok):
        old, new = effective_batch(before, world_size), effective_batch(d.knobs, world_size)
        if old != new:
            assert d.effective_batch == (old, new) and d.lr_note
            assert "effective batch changes" in d.reason
        if d.effective_batch is not None:
            assert d.effective_batch == (old, new)


@SETTINGS
@given(policies(), FAILURES, PROFILES, st.booleans())
def test_floors_and_knob_minimums_hold(policy, kinds, profile, bf16_ok):
    for before, d in play(policy, kinds, profile, bf16_ok=bf16_ok):
        k = d.knobs
        assert k["max_seq_length"] >= 16 and k["per_device_train_batch_size"] >= 1
        assert k["gradient_accumulation_steps"] >= 1 and k["lora_r"] >= 1
        if not bf16_ok and before["precision"] != "bf16":
            assert k["precision"] != "bf16"
        if d.rung is None:
            continue
        rung = policy.ladders.get(d.rung.ladder).rungs[d.rung.index]
        if isinstance(rung, (ScaleRung, HalveBatchRung, QuantileStepRung)) and rung.floor is not None:
            assert k[rung.knob] >= rung.floor
            assert k[rung.knob] < before[rung.knob]


@SETTINGS
@given(policies(), PROFILES, st.booleans())
def test_repeated_cuda_oom_gives_up_within_the_rung_budget(policy, profile, bf16_ok):
    bound = rung_budget(policy) + 1
    decisions = list(play(policy, [FailureKind.CUDA_OOM] * (bound + 5), profile, bf16_ok=bf16_ok))
    assert decisions[-1][1].give_up is GiveUpReason.LADDER_EXHAUSTED
    assert len(decisions) <= bound
    assert all(d.changes for _, d in decisions[:-1])  # every retry changed something
