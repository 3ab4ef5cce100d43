"""decide(): one test per failure kind and budget, reading the decision a user will read."""

import pytest

from oomguard.policy import (
    AttemptView,
    CheckpointInfo,
    DataProfile,
    Failure,
    GiveUpReason,
    ResumeClass,
    RungRef,
    decide,
    load_policy_arg,
    parse_policy,
)
from oomguard.protocol import FailureKind, Phase

K = FailureKind
CKPTS = (CheckpointInfo("/run/ckpt/checkpoint-20", 20), CheckpointInfo("/run/ckpt/checkpoint-30", 30),
         CheckpointInfo("/run/ckpt/checkpoint-10", 10))


def policy(**over):
    data = {
        "name": "test",
        "knobs": {"max_seq_length": 2048, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 2,
                  "lora_r": 16, "lora_alpha": 32, "precision": "fp16", "learning_rate": 2e-4,
                  "per_device_eval_batch_size": 8, "dataloader_num_workers": 4},
        "ladders": {
            "cuda_oom": {"rungs": [
                {"knob": "max_seq_length", "op": "quantile_step", "floor": 512, "max_times": 2, "resume": "reindex"},
                {"op": "halve_batch", "floor": 1, "max_times": 3, "resume": "safe"},
                {"knob": "lora_r", "op": "step_down", "values": [64, 32, 16, 8, 4], "max_times": 2, "resume": "transform"},
                {"knob": "precision", "op": "set", "value": "bf16", "resume": "numeric"}]},
            "eval_oom": {"rungs": [{"knob": "per_device_eval_batch_size", "op": "scale", "factor": 0.5, "floor": 2,
                                    "max_times": 2, "resume": "safe"}], "then": "cuda_oom"},
            "host_oom": {"rungs": [{"knob": "dataloader_num_workers", "op": "set", "value": 0, "resume": "safe"}],
                         "then": "cuda_oom"},
            "nan_loss": {"rungs": [{"knob": "learning_rate", "op": "scale", "factor": 0.5, "resume": "numeric"}]},
        },
        "limits": {"backoff": {"initial_s": 5, "multiplier": 2, "max_s": 300}},
    }
    for key, value in over.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key != "ladders" else value
    return parse_policy(data, "test.yaml")


def attempt(n, pol_or_knobs, kind, step=None, rung=None, max_step=None, phase=Phase.UNKNOWN, detail=""):
    knobs = pol_or_knobs.start_knobs() if hasattr(pol_or_knobs, "start_knobs") else pol_or_knobs
    return AttemptView(n, knobs, rung, Failure(kind, step, phase, detail), max_step)


def run_oom_sequence(pol, kind, n_max=50, **kw):
    """Feed ``kind`` again and again, applying each decision, until it gives up."""
    history = [attempt(1, pol, kind, step=5, max_step=5)]
    for _ in range(n_max):
        d = decide(pol, history, CKPTS, **kw)
        if d.action == "give_up":
            return history, d
        history.append(attempt(len(history) + 1, d.knobs, kind, step=5, rung=d.rung, max_step=5))
    raise AssertionError("never gave up")


def test_cuda_oom_first_rung_cuts_max_seq_length_and_reports_truncation():
    prof = DataProfile(100, ((0.0, 100), (0.5, 900), (0.99, 1500), (1.0, 3000)), 3000)
    d = decide(policy(), [attempt(1, policy(), K.CUDA_OOM, 37, phase=Phase.FORWARD_BACKWARD, max_step=37)],
               CKPTS, profile=prof)
    assert d.action == "retry" and d.rung == RungRef(K.CUDA_OOM, 0)
    # 2048 -> the next profile length below it, p99 = 1500, rounded down to 64
    assert d.knobs["max_seq_length"] == 1472 and d.resume_class is ResumeClass.REINDEX
    assert d.resume_from == "/run/ckpt/checkpoint-30"
    assert 0 < d.truncation_share < 0.05 and f"{d.truncation_share:.1%}" in d.reason
    assert d.reason.startswith("CUDA OOM at step 37 (forward_backward): max_seq_length 2048 → 1472")


def test_halve_batch_reason_reads_as_documented():
    pol = policy()
    used = RungRef(K.CUDA_OOM, 0)
    history = [attempt(1, pol, K.CUDA_OOM, 30), attempt(2, {**pol.start_knobs(), "max_seq_length": 1024}, K.CUDA_OOM, 30, used),
               attempt(3, {**pol.start_knobs(), "max_seq_length": 512}, K.CUDA_OOM, 37, used,
                       phase=Phase.FORWARD_BACKWARD, max_step=37)]
    d = decide(pol, history, CKPTS)
    assert d.reason == ("CUDA OOM at step 37 (forward_backward): per_device_train_batch_size 8 → 4 with "
                        "gradient_accumulation_steps 2 → 4 (effective batch 16 kept); resuming from checkpoint-30")
    assert d.effective_batch == (16, 16) and d.lr_note is None
    assert [(c.knob, c.old, c.new) for c in d.changes] == [
        ("per_device_train_batch_size", 8, 4), ("gradient_accumulation_steps", 2, 4)]


def test_ladder_runs_in_order_then_gives_up_with_root_cause():
    history, last = run_oom_sequence(policy(), K.CUDA_OOM, bf16_ok=True)
    rungs = [a.rung.index for a in history if a.rung]
    assert rungs == [0, 0, 1, 1, 1, 2, 2, 3]
    assert last.give_up is GiveUpReason.LADDER_EXHAUSTED
    assert last.reason.startswith("CUDA OOM at step 5: every rung of the cuda_oom ladder is used up")


def test_bf16_rung_skipped_where_unsupported():
    history, last = run_oom_sequence(policy(), K.CUDA_OOM, bf16_ok=False)
    assert all(a.knobs["precision"] == "fp16" for a in history)
    assert "this device has no bf16" in last.reason


def test_resume_oom_retries_same_knobs_then_degrades():
    pol = policy(limits={"resume_oom_retries": 2})
    # attempt 2 ran with the batch halved after attempt 1's OOM, then could not load the checkpoint
    halved = {**pol.start_knobs(), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
    h = [attempt(1, pol, K.CUDA_OOM, 30, max_step=30)]
    for n in (2, 3):
        h.append(attempt(n, halved, K.RESUME_OOM, 30, RungRef(K.CUDA_OOM, 1) if n == 2 else None,
                         phase=Phase.CHECKPOINT_LOAD))
        d = decide(pol, h, CKPTS)
        assert d.changes == () and d.rung is None and d.resume_from == "/run/ckpt/checkpoint-30"
    h.append(attempt(4, halved, K.RESUME_OOM, 30))
    d = decide(pol, h, CKPTS)
    assert d.rung == RungRef(K.CUDA_OOM, 0) and "treated as a CUDA OOM" in d.reason


def test_nan_rolls_back_to_checkpoint_not_after_the_bad_step():
    pol = policy()
    d = decide(pol, [attempt(1, pol, K.NAN_LOSS, step=25, max_step=25)], CKPTS)
    assert d.resume_from == "/run/ckpt/checkpoint-20"
    assert d.knobs["learning_rate"] == pytest.approx(1e-4) and d.resume_class is ResumeClass.NUMERIC
    unknown = decide(pol, [attempt(1, pol, K.NAN_LOSS, step=None)], CKPTS)
    assert unknown.resume_from is None and "no checkpoint is known to be clean" in unknown.reason


def test_nan_without_rungs_left_retries_as_is():
    pol = policy()
    h = [attempt(1, pol, K.NAN_LOSS, 30, max_step=30),
         attempt(2, {**pol.start_knobs(), "learning_rate": 1e-4}, K.NAN_LOSS, 30, RungRef(K.NAN_LOSS, 0), 30)]
    d = decide(pol, h, CKPTS)
    # a second NaN in a row rolls back one checkpoint further (the first went to checkpoint-30)
    assert d.action == "retry" and d.changes == () and d.resume_from == "/run/ckpt/checkpoint-20"
    assert "no nan_loss rung left" in d.reason and "further back" in d.reason


def test_hang_resumes_with_same_knobs():
    d = decide(policy(), [attempt(1, policy(), K.HANG, 12, max_step=12)], CKPTS)
    assert d.action == "retry" and d.changes == () and d.resume_from.endswith("checkpoint-30")
    assert d.reason.startswith("no heartbeat for 600 s (hang) at step 12")


def test_crash_backs_off_exponentially_then_gives_up():
    pol = policy(limits={"crash_retries": 3})
    h = [attempt(1, pol, K.CRASH, 3, detail="KeyError: 'a'", max_step=3)]
    assert decide(pol, h, CKPTS).backoff_s == 5
    h.append(attempt(2, pol, K.CRASH, 4, detail="KeyError: 'b'", max_step=4))
    assert decide(pol, h, CKPTS).backoff_s == 10
    h.append(attempt(3, pol, K.CRASH, 6, detail="KeyError: 'c'", max_step=6))
    assert decide(pol, h, CKPTS).backoff_s == 20
    h.append(attempt(4, pol, K.CRASH, 8, detail="KeyError: 'd'", max_step=8))
    d = decide(pol, h, CKPTS)
    assert d.give_up is GiveUpReason.UNRECOVERABLE and "limits.crash_retries 3" in d.reason


def test_same_crash_twice_is_unrecoverable():
    pol = policy()
    h = [attempt(1, pol, K.CRASH, 3, detail="ValueError: bad column", max_step=3),
         attempt(2, pol, K.CRASH, 3, detail="ValueError: bad column", max_step=3)]
    d = decide(pol, h, CKPTS)
    assert d.give_up is GiveUpReason.UNRECOVERABLE
    assert d.reason.startswith("crash at step 3: ValueError: bad column: the same error at the same step twice")


def test_eval_oom_uses_its_ladder_then_cuda_oom():
    pol = policy()
    h = [attempt(1, pol, K.EVAL_OOM, 40, phase=Phase.EVAL, max_step=40)]
    kinds = []
    for n in range(2, 6):
        d = decide(pol, h, CKPTS)
        kinds.append((d.rung.ladder, d.changes[0].knob))
        h.append(attempt(n, d.knobs, K.EVAL_OOM, 40, d.rung, max_step=40))
    assert kinds == [(K.EVAL_OOM, "per_device_eval_batch_size")] * 2 + [(K.CUDA_OOM, "max_seq_length")] * 2


def test_host_oom_drops_workers_first():
    d = decide(policy(), [attempt(1, policy(), K.HOST_OOM, 9, max_step=9)], CKPTS)
    assert d.changes[0].knob == "dataloader_num_workers" and d.changes[0].new == 0


def test_effective_batch_change_is_stated_and_lr_rule_applied():
    ladders = {"cuda_oom": {"rungs": [{"knob": "gradient_accumulation_steps", "op": "set", "value": 1, "resume": "safe"}]}}
    for rule, lr in (("keep", 2e-4), ("linear", 1e-4), ("sqrt", 2e-4 / 2 ** 0.5)):
        pol = policy(ladders=ladders, lr_rule=rule)
        d = decide(pol, [attempt(1, pol, K.CUDA_OOM, 5)], CKPTS)
        assert d.effective_batch == (16, 8) and d.lr_note
        assert d.knobs["learning_rate"] == pytest.approx(lr)
        assert "effective batch changes 16 → 8" in d.reason


def test_restart_rung_does_not_resume():
    ladders = {"cuda_oom": {"rungs": [{"knob": "lora_r", "op": "set", "value": 8, "resume": "restart"}]}}
    d = decide(policy(ladders=ladders), [attempt(1, policy(ladders=ladders), K.CUDA_OOM, 5)], CKPTS)
    assert d.resume_from is None and "starting from scratch" in d.reason


def test_budget_max_attempts_first():
    pol = policy(limits={"max_attempts": 2})
    h = [attempt(1, pol, K.CUDA_OOM, 5, max_step=5), attempt(2, pol, K.CUDA_OOM, 9, max_step=9)]
    d = decide(pol, h, CKPTS)
    assert d.give_up is GiveUpReason.MAX_ATTEMPTS and d.action == "give_up" and d.knobs == pol.start_knobs()


def test_budget_wall_clock():
    pol = policy(limits={"wall_clock_budget_s": 3600})
    assert decide(pol, [attempt(1, pol, K.HANG, 5)], CKPTS, elapsed_s=3599).action == "retry"
    assert decide(pol, [attempt(1, pol, K.HANG, 5)], CKPTS, elapsed_s=3600).give_up is GiveUpReason.WALL_CLOCK


def test_no_progress_needs_same_knobs_and_no_new_step():
    pol = policy(limits={"no_progress_attempts": 3})
    same = [attempt(1, pol, K.HANG, 50, max_step=50)] + [attempt(n, pol, K.HANG, 50, max_step=50) for n in (2, 3, 4)]
    assert decide(pol, same, CKPTS).give_up is GiveUpReason.NO_PROGRESS
    moving = same[:3] + [attempt(4, pol, K.HANG, 51, max_step=51)]
    assert decide(pol, moving, CKPTS).action == "retry"
    changed = same[:3] + [attempt(4, {**pol.start_knobs(), "lora_r": 8}, K.HANG, 50, max_step=50)]
    assert decide(pol, changed, CKPTS).action == "retry"


def test_decide_needs_a_failed_last_attempt():
    with pytest.raises(ValueError, match="last attempt failed"):
        decide(policy(), [AttemptView(1, policy().start_knobs(), None, None, 10)], CKPTS)


@pytest.mark.parametrize("name", ["h100-80gb", "t4-16gb", "demo", "default"])
def test_shipped_policies_degrade_then_give_up(name):
    pol = load_policy_arg(name)
    history, last = run_oom_sequence(pol, K.CUDA_OOM, bf16_ok=False)
    assert last.give_up in (GiveUpReason.LADDER_EXHAUSTED, GiveUpReason.MAX_ATTEMPTS)
    assert len(history) > 3


def test_repeated_nan_rolls_back_further_each_time():
    from oomguard.policy import AttemptView, CheckpointInfo, Failure, decide, load_policy_arg
    from oomguard.protocol import FailureKind

    policy = load_policy_arg("demo")
    knobs = policy.start_knobs()
    ckpts = [CheckpointInfo(f"/c/checkpoint-{s}", s) for s in (2, 4, 6, 8, 10)]
    nan = Failure(kind=FailureKind.NAN_LOSS, step=10)
    history = []
    picked = []
    resumed = None
    for n in range(1, 5):
        history.append(AttemptView(n=n, knobs=knobs, rung=None, failure=nan, max_step=10, resumed_step=resumed))
        d = decide(policy, history, ckpts)
        picked.append(d.resume_from)
        knobs = d.knobs
        resumed = int(d.resume_from.rpartition("-")[2]) if d.resume_from else None
    assert picked == ["/c/checkpoint-10", "/c/checkpoint-8", "/c/checkpoint-4", None]


def test_nan_after_progress_past_a_clean_checkpoint_restarts_the_walk_back():
    """Rollback to checkpoint-12 after a NaN at 14; the next attempt trains and saves checkpoint-24 (10 steps
    past that NaN), then NaNs at 26: that is a new NaN, so back to the newest clean checkpoint (24), not further.
    A checkpoint only 2 steps past it (16) is no such evidence: the walk-back goes on."""
    from oomguard.policy import AttemptView, CheckpointInfo, Failure, decide, load_policy_arg
    from oomguard.protocol import FailureKind

    policy = load_policy_arg("demo")
    knobs = policy.start_knobs()
    ckpts = [CheckpointInfo(f"/c/checkpoint-{s}", s) for s in (4, 8, 12, 16, 24)]
    first = AttemptView(1, knobs, None, Failure(kind=FailureKind.NAN_LOSS, step=14), 14)
    again = AttemptView(2, knobs, None, Failure(kind=FailureKind.NAN_LOSS, step=26), 26, resumed_step=12)
    assert decide(policy, [first, again], ckpts).resume_from == "/c/checkpoint-24"
    soon = AttemptView(2, knobs, None, Failure(kind=FailureKind.NAN_LOSS, step=18), 18, resumed_step=12)
    assert decide(policy, [first, soon], ckpts[:4]).resume_from == "/c/checkpoint-12"  # 2nd newest of 16, 12, …
    stuck = AttemptView(2, knobs, None, Failure(kind=FailureKind.NAN_LOSS, step=14), 14, resumed_step=12)
    assert decide(policy, [first, stuck], ckpts).resume_from == "/c/checkpoint-8"


def test_a_diverging_learning_rate_walks_back_past_every_checkpoint_it_wrote():
    """The H200 run of 2026-12-01 (fp16, LR 3000, a checkpoint every step): each attempt trained one step from
    its rollback, wrote a finite but ruined checkpoint and overflowed again, the same 8 rows each time. The
    walk-back must not restart from those checkpoints, and the rows are not blamed: from scratch, lower LR."""
    from pathlib import Path

    from oomguard.policy import AttemptView, CheckpointInfo, Failure, decide, load_policy
    from oomguard.policy.records import InFlight, InFlightBatch
    from oomguard.protocol import FailureKind

    policy = load_policy(Path(__file__).parents[1] / "gpu" / "policies" / "gpu-test.yaml")
    k1 = {**policy.start_knobs(), "learning_rate": 3000.0}
    k2, k3 = {**k1, "precision": "bf16"}, {**k1, "precision": "bf16", "learning_rate": 3.0}
    rows = {1: tuple(range(8)), 2: tuple(range(8, 16))}

    def nan(n, knobs, step, resumed):  # NaN in optimizer step ``step + 1`` (its one micro-batch), ``step`` finite
        flight = InFlight(step + 1, "nan", (InFlightBatch(rows[step], 8 * 256, False),))
        return AttemptView(n, knobs, None, Failure(kind=FailureKind.NAN_LOSS, step=step), step,
                           resumed_step=resumed, in_flight=flight)

    ckpts = [CheckpointInfo(f"/c/checkpoint-{s}", s) for s in (1, 2)]
    history = [nan(1, k1, 1, None), nan(2, k2, 2, 1)]
    d = decide(policy, history, ckpts)
    assert d.resume_from == "/c/checkpoint-1" and d.knobs["learning_rate"] == 3.0
    history.append(nan(3, k3, 2, 1))  # LR 3 from checkpoint-1: the same step, the same rows, again
    d = decide(policy, history, ckpts)
    assert not d.culprit or not d.culprit.quarantine, d.reason
    assert d.resume_from is None and d.knobs["learning_rate"] == pytest.approx(0.003), d.reason
    assert "the weights, not the rows" in d.reason and "starting from scratch" in d.reason


@pytest.mark.parametrize("name", ["rtx-24gb", "h100-80gb"])
def test_bf16_policy_moves_a_run_that_asked_for_fp16_to_bf16_on_nan(name):
    pol = load_policy_arg(name)
    asked_fp16 = {**pol.start_knobs(), "precision": "fp16"}  # the command's --fp16 wins over the policy
    d = decide(pol, [attempt(1, asked_fp16, K.NAN_LOSS, step=25, max_step=25)], CKPTS)
    assert d.knobs["precision"] == "bf16" and d.knobs["learning_rate"] == asked_fp16["learning_rate"]
    # already bf16: the precision rung changes nothing and the learning rate goes down instead
    d = decide(pol, [attempt(1, pol, K.NAN_LOSS, step=25, max_step=25)], CKPTS)
    assert d.knobs["precision"] == "bf16" and d.knobs["learning_rate"] < pol.start_knobs()["learning_rate"]
    assert not decide(pol, [attempt(1, asked_fp16, K.NAN_LOSS, step=25, max_step=25)], CKPTS,
                      bf16_ok=False).knobs["precision"] == "bf16"


def test_bounded_length_rung_is_passed_over_when_it_cuts_too_much():
    pol = load_policy_arg("rtx-24gb")  # first rung: quantile_step with max_token_cut 0.02
    first = [attempt(1, pol, K.CUDA_OOM, 3, phase=Phase.FORWARD_BACKWARD, max_step=3)]
    long_tail = DataProfile(100, ((0.0, 200), (0.5, 1100), (0.9, 2048), (1.0, 2048)), 2048)  # 10 % at the cap
    d = decide(pol, first, CKPTS, profile=long_tail)
    start = pol.start_knobs()["per_device_train_batch_size"]
    assert d.knobs["max_seq_length"] == 2048 and d.knobs["per_device_train_batch_size"] == start // 2  # halved
    assert "passed over cuda_oom rung 0 (max_seq_length → " in d.reason and "more than max_token_cut 2%" in d.reason
    short = DataProfile(100, ((0.0, 200), (0.5, 500), (0.99, 900), (1.0, 1000)), 1000)  # nothing near 2048
    d = decide(pol, first, CKPTS, profile=short)
    assert d.knobs["max_seq_length"] < 2048 and d.truncation_share <= 0.02
    d = decide(pol, first, CKPTS, profile=None)
    assert d.knobs["max_seq_length"] == 2048 and "no data profile yet" in d.reason


def test_unbounded_length_rung_is_the_last_resort():
    pol = load_policy_arg("rtx-24gb")
    long_tail = DataProfile(100, ((0.0, 200), (0.5, 1100), (0.9, 2048), (1.0, 2048)), 2048)
    history, last = run_oom_sequence(pol, K.CUDA_OOM, profile=long_tail)
    seq = [a.knobs["max_seq_length"] for a in history]
    batch = [a.knobs["per_device_train_batch_size"] for a in history]
    lora = [a.knobs["lora_r"] for a in history]
    first_cut = seq.index(next(s for s in seq if s < 2048))
    assert batch[first_cut] == 1 and lora[first_cut] < 16  # only after the batch and rank rungs


def _oom(n, knobs, step, growth=None, rung=None):
    return AttemptView(n, knobs, rung, Failure(K.CUDA_OOM, step, Phase.FORWARD_BACKWARD, "", 0, growth), step)


def test_oom_after_steady_growth_restarts_with_the_same_knobs():
    pol = policy()
    knobs = pol.start_knobs()
    d = decide(pol, [_oom(1, knobs, 24, growth=512 * 2**20)], CKPTS)
    assert d.action == "retry" and d.changes == () and d.rung is None
    assert d.resume_from == "/run/ckpt/checkpoint-30"
    assert "memory grew 512 MiB per step" in d.reason and "a leak" in d.reason
    # the restart made progress and leaked again: same answer
    d = decide(pol, [_oom(1, knobs, 24, 512 * 2**20), _oom(2, knobs, 40, 512 * 2**20)], CKPTS)
    assert d.changes == () and "fit for 16 step(s)" in d.reason
    # no progress since the last restart: the ladder as for any OOM
    d = decide(pol, [_oom(1, knobs, 24, 512 * 2**20), _oom(2, knobs, 24, 512 * 2**20)], CKPTS)
    assert d.rung == RungRef(K.CUDA_OOM, 0)
    # flat memory: the ladder at once
    assert decide(pol, [_oom(1, knobs, 24)], CKPTS).rung == RungRef(K.CUDA_OOM, 0)


def test_a_usage_error_gives_up_at_once_with_the_parsers_message_first():
    f = Failure(K.CRASH, None, Phase.STARTUP, "the command's argument parser rejected it: t.py: error: "
                "unrecognized arguments: --x 1", usage=True)
    d = decide(policy(), [AttemptView(1, policy().start_knobs(), None, f, None)], CKPTS)
    assert d.action == "give_up" and d.give_up is GiveUpReason.UNRECOVERABLE
    assert d.reason.startswith("the command's argument parser rejected it: t.py: error: unrecognized arguments")


def test_rungs_on_knobs_the_child_cannot_take_are_passed_over_saying_why():
    """Trust rule 2: the length rung needs a length the child can take; without one the batch
    rung is the first one taken, and the decision names the rung passed over."""
    pol = policy()
    knobs = {k: v for k, v in pol.start_knobs().items() if k != "max_seq_length"}  # the child has no length field
    d = decide(pol, [AttemptView(1, knobs, None, Failure(K.CUDA_OOM, 5), 5)], CKPTS)
    assert d.rung == RungRef(K.CUDA_OOM, 1) and "has no max_seq_length oomguard could observe" in d.reason
    reach = {"per_device_train_batch_size": "in_process"}  # no way to change accumulation: no batch rung
    d = decide(pol, [attempt(1, pol, K.CUDA_OOM, 5, max_step=5)], CKPTS, capabilities=reach)
    assert d.action == "give_up" and "cannot take a new max_seq_length" in d.reason
    assert "cannot take a new gradient_accumulation_steps" in d.reason


def test_a_length_rung_never_proposes_a_length_at_or_above_the_longest_row():
    pol = policy()
    prof = DataProfile(100, ((0.0, 100), (0.5, 300), (1.0, 500)), 500)  # floor 512 > longest row 500
    d = decide(pol, [attempt(1, pol, K.CUDA_OOM, 5, max_step=5)], CKPTS, profile=prof)
    assert d.rung == RungRef(K.CUDA_OOM, 1) and "max_seq_length" not in {c.knob for c in d.changes}


def test_precision_rungs_only_to_a_precision_the_device_has():
    pol = policy(ladders={"cuda_oom": {"rungs": [{"knob": "precision", "op": "set", "value": "fp16",
                                                  "resume": "numeric"}]}}, knobs={"precision": "bf16"})
    h = [attempt(1, pol, K.CUDA_OOM, 5, max_step=5)]
    assert decide(pol, h, CKPTS, fp16_ok=True).knobs["precision"] == "fp16"
    d = decide(pol, h, CKPTS, fp16_ok=False)
    assert d.action == "give_up" and "fp16 mixed precision needs a CUDA GPU" in d.reason
    same = [attempt(1, {**pol.start_knobs(), "precision": "fp16"}, K.CUDA_OOM, 5, max_step=5)]
    assert decide(pol, same, CKPTS).action == "give_up"  # already fp16: nothing to move away from


def test_with_packing_a_shorter_length_still_saves_even_below_the_longest_sample():
    pol = policy(ladders={"cuda_oom": {"rungs": [{"knob": "max_seq_length", "op": "scale", "factor": 0.5,
                                                  "floor": 128, "resume": "reindex"}]}})
    h = [attempt(1, pol, K.CUDA_OOM, 5, max_step=5)]
    samples = ((0.0, 50), (0.5, 200), (1.0, 300))
    packed = DataProfile(100, samples, 300, packed=True)
    assert decide(pol, h, CKPTS, profile=packed).knobs["max_seq_length"] == 1024
    assert decide(pol, h, CKPTS, profile=DataProfile(100, samples, 300)).action == "give_up"


def test_the_shipped_nan_ladder_halves_once_then_steps_by_ten():
    """An LR 10^7x too high (a typo): halving cannot undo it; after one halving that did not help the
    shipped ladders step by x0.1 (issue 19), each step a rollback to the last finite checkpoint."""
    pol = load_policy_arg("rtx-24gb")
    knobs = {**pol.start_knobs(), "learning_rate": 2000.0, "precision": "bf16"}
    history = [attempt(1, knobs, K.NAN_LOSS, step=5, max_step=5)]
    lrs = []
    for _ in range(4):
        d = decide(pol, history, CKPTS)
        assert d.action == "retry"
        lrs.append(d.knobs["learning_rate"])
        history.append(attempt(len(history) + 1, d.knobs, K.NAN_LOSS, step=5, rung=d.rung, max_step=5))
    assert lrs == pytest.approx([1000.0, 100.0, 10.0, 1.0])


@pytest.mark.parametrize("precision, first_change", [("fp32", "learning_rate"), ("fp16", "precision")])
def test_the_nan_precision_rung_applies_only_from_fp16(precision, first_change):
    """fp16 overflows past 65504 where bf16 would not; an fp32 run's NaN is not a range problem and bf16
    would give up precision for nothing (issue 19: the precision rung only where it applies)."""
    pol = load_policy_arg("h100-80gb")
    knobs = {**pol.start_knobs(), "precision": precision}
    d = decide(pol, [attempt(1, knobs, K.NAN_LOSS, step=5, max_step=5)], CKPTS, bf16_ok=True)
    assert d.action == "retry" and [c.knob for c in d.changes] == [first_change]


def test_a_nan_rollback_re_enters_warm_up_when_the_ladder_says_so():
    ladders = {**policy().model_dump(mode="json")["ladders"]}
    ladders["nan_loss"] = {**ladders["nan_loss"], "rewarm_steps": 5}
    pol = policy(ladders=ladders)
    d = decide(pol, [attempt(1, pol, K.NAN_LOSS, 30, max_step=30)], CKPTS)
    assert d.rewarm_steps == 5 and d.reason.endswith("; re-entering warm-up over 5 optimizer steps")
    assert d.to_dict()["rewarm_steps"] == 5
    assert decide(pol, [attempt(1, pol, K.CUDA_OOM, 30, max_step=30)], CKPTS).rewarm_steps == 0
    fresh = decide(pol, [attempt(1, pol, K.NAN_LOSS, None, max_step=None)], ())  # nothing to roll back to
    assert fresh.resume_from is None and fresh.rewarm_steps == 0
    assert "rewarm_steps" not in decide(policy(), [attempt(1, policy(), K.NAN_LOSS, 30, max_step=30)],
                                        CKPTS).to_dict()


def test_only_the_nan_ladder_may_re_enter_warm_up():
    ladders = {**policy().model_dump(mode="json")["ladders"]}
    ladders["cuda_oom"] = {**ladders["cuda_oom"], "rewarm_steps": 3}
    with pytest.raises(Exception, match=r"ladders\.cuda_oom\.rewarm_steps: only the nan_loss ladder"):
        policy(ladders=ladders)
