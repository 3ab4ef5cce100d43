"""decide() reads one Evidence value and its Decision carries quarantine and resume mode; the run
record's typed members write exactly today's run.json shape and read back tolerantly."""

from __future__ import annotations

import json

import pytest
from _loop_fakes import POLICY

from oomguard.policy import (
    AttemptView,
    CheckpointInfo,
    Decision,
    DeviceCapabilities,
    Evidence,
    Failure,
    GpuInfo,
    RungRef,
    SetAsideReason,
    bf16_capable,
    bf16_supported,
    decide,
    device_capabilities,
    load_policy,
)
from oomguard.protocol import ErrorRecord, FailureKind, Phase, ResumeMode
from oomguard.protocol.run_record import AttemptRecord, RunRecord, record_problems
from oomguard.supervisor.journal import AttemptRecord as JournalAttemptRecord

KNOBS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
CKPTS = [CheckpointInfo("/o/checkpoint-2", 2), CheckpointInfo("/o/checkpoint-4", 4),
         CheckpointInfo("/o/checkpoint-6", 6), CheckpointInfo("/o/checkpoint-8", 8, complete=False)]


def failed(kind, step, phase=Phase.UNKNOWN, **kw):
    return AttemptView(1, KNOBS, None, Failure(kind, step, phase, "x"), step, **kw)


def test_nan_sets_aside_every_checkpoint_after_the_lowest_finite_step_of_any_rank():
    ranks = [ErrorRecord(FailureKind.NAN_LOSS, step=7, last_finite_step=6),
             ErrorRecord(FailureKind.NAN_LOSS, step=7, rank=1, last_finite_step=4)]
    ev = Evidence(attempts=[failed(FailureKind.NAN_LOSS, 7)], checkpoints=CKPTS, ranks=ranks)
    d = decide(load_policy(POLICY), ev)
    assert [(s.path, s.reason, s.last_good_step) for s in d.quarantine] == [
        ("/o/checkpoint-8", SetAsideReason.AFTER_NAN, 4), ("/o/checkpoint-6", SetAsideReason.AFTER_NAN, 4)]
    assert d.resume_from == "/o/checkpoint-4" and d.resume_mode is ResumeMode.NORMAL


def test_a_budget_give_up_still_sets_aside_what_is_known_bad():
    policy = load_policy(POLICY)
    policy = policy.model_copy(update={"limits": policy.limits.model_copy(update={"max_attempts": 1})})
    d = decide(policy, Evidence(attempts=[failed(FailureKind.NAN_LOSS, 7)], checkpoints=CKPTS))
    assert d.action == "give_up" and [s.path for s in d.quarantine] == ["/o/checkpoint-8"]


def test_a_load_crash_sets_its_checkpoint_aside_and_takes_the_older_one():
    last = failed(FailureKind.CRASH, None, Phase.CHECKPOINT_LOAD, resumed_step=6, resumed_from="/o/checkpoint-6")
    d = decide(load_policy(POLICY), Evidence(attempts=[last], checkpoints=CKPTS))
    assert [(s.path, s.reason) for s in d.quarantine] == [("/o/checkpoint-6", SetAsideReason.UNLOADABLE)]
    assert d.resume_from == "/o/checkpoint-4"


def test_resume_oom_decides_the_optimizer_on_cpu_only_when_it_resumes():
    policy = load_policy(POLICY)
    oom = failed(FailureKind.RESUME_OOM, 6, Phase.CHECKPOINT_LOAD)
    assert decide(policy, Evidence(attempts=[oom], checkpoints=CKPTS)).resume_mode is ResumeMode.OPTIMIZER_ON_CPU
    assert decide(policy, Evidence(attempts=[oom])).resume_mode is ResumeMode.NORMAL  # nothing to load


def test_the_short_form_and_the_evidence_form_decide_alike():
    policy, history = load_policy(POLICY), [failed(FailureKind.CUDA_OOM, 5)]
    assert decide(policy, history, CKPTS[:3]) == decide(policy, Evidence(attempts=history, checkpoints=CKPTS[:3]))
    with pytest.raises(ValueError, match="call it only after a failed attempt"):
        decide(policy, Evidence(attempts=[AttemptView(1, KNOBS, None, None, 3)]))


def test_device_capabilities_are_computed_once_from_the_gpu():
    assert device_capabilities(None) == DeviceCapabilities(bf16=False, fp16=False)
    assert device_capabilities(GpuInfo("Tesla T4", 15.0, (7, 5))) == DeviceCapabilities(bf16=False, fp16=True)
    assert device_capabilities(GpuInfo("NVIDIA H200", 140.0, (9, 0))).bf16 is True
    assert device_capabilities(GpuInfo("mystery", 24.0)).bf16 is None  # unknown: the policy's capabilities.bf16
    assert bf16_capable((8, 0)) and not bf16_capable((7, 5)) and bf16_capable(None) is None
    assert bf16_supported(GpuInfo("NVIDIA A100", 40.0)) and not bf16_supported(None)


# --- the typed run record -------------------------------------------------------------------
TODAY = {  # an attempt as run.json has held it since before the typed record
    "n": 2, "started": 10.0, "knobs": {"per_device_train_batch_size": 4}, "rung": {"ladder": "cuda_oom", "index": 0},
    "resumed_from": "/o/checkpoint-2", "command": ["python", "t.py"], "delivered": {}, "ended": 12.0,
    "exit_code": 1, "signal": None,
    "failure": {"kind": "cuda_oom", "step": 3, "phase": "forward_backward", "detail": "oom", "rank": 0,
                "memory_growth": 5e8},
    "max_step": 3,
    "decision": {"action": "retry", "reason": "CUDA OOM at step 3: ...", "knobs": {"per_device_train_batch_size": 2},
                 "rung": {"ladder": "cuda_oom", "index": 0},
                 "changes": [{"knob": "per_device_train_batch_size", "old": 4, "new": 2}],
                 "resume_from": "/o/checkpoint-2", "resume_class": "safe", "give_up": None, "backoff_s": 0.0,
                 "truncation_share": None, "effective_batch": [8, 8], "lr_note": None},
    "pid": 42, "pid_started": 9.5, "interrupted": None, "orders": {}, "observed": None, "verified": {},
    "resumed_step": 2,
}


def test_an_attempt_round_trips_to_exactly_todays_json():
    a = AttemptRecord.from_dict(TODAY)
    assert a.rung == RungRef(FailureKind.CUDA_OOM, 0) and a.failure.memory_growth == 5e8
    assert isinstance(a.decision, Decision) and a.decision.effective_batch == (8, 8)
    assert json.dumps(a.to_dict()) == json.dumps(TODAY)
    assert JournalAttemptRecord is AttemptRecord  # one type, re-exported by the journal


def test_a_run_record_round_trips_and_reads_tolerantly():
    d = {"status": "gave_up", "command": ["python", "t.py"], "policy": "p", "policy_file": "", "requested": {},
         "config": {}, "checkpoint_dir": "", "give_up": "ladder_exhausted", "attempts": [TODAY],
         "some_future_field": 1}
    record = RunRecord.from_dict(d)
    assert record.status == "gave_up" and record.give_up == "ladder_exhausted"
    out = record.to_dict()
    assert out["attempts"] == [TODAY] and "some_future_field" not in out and out["requested_source"] == "command"
    odd = {**TODAY, "rung": {"ladder": "meteor", "index": 0}}
    assert AttemptRecord.from_dict(odd).rung is None  # a reader does without it ...
    problems = {where: fatal for where, _, fatal in record_problems({**d, "attempts": [odd]})}
    assert problems == {"attempts[0].rung.ladder": False}  # ... and record_problems says so


def test_unknown_failure_kinds_and_statuses_are_fatal_problems():
    bad = {"status": "sleeping", "attempts": [{**TODAY, "failure": {"kind": "meteor"}}]}
    found = {where: (what, fatal) for where, what, fatal in record_problems(bad)}
    assert found["status"][1] and found["status"][0].startswith("unknown status 'sleeping'")
    what, fatal = found["attempts[0].failure.kind"]
    assert fatal and "unknown failure kind 'meteor'" in what
    with pytest.raises(ValueError, match="failure kind 'meteor' is not one of"):
        AttemptRecord.from_dict(bad["attempts"][0])
