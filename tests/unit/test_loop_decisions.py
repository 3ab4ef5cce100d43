"""The loop carries out what decide() decided: checkpoints set aside, resume mode in the env,
growth evidence on every OOM kind, the recovery hook. Fake launcher and clock (tests/unit/_loop_fakes.py)."""

from __future__ import annotations

import pytest
from _loop_fakes import Child, events, make_spec, run, write_checkpoint

from oomguard.errors import ExitCode
from oomguard.protocol import ENV_RESUME_MODE, ENV_STRICT_EVENTS, FailureKind, Phase, ResumeMode

OOM = FailureKind.CUDA_OOM


@pytest.fixture(autouse=True)
def strict_events(monkeypatch):
    """Every line the loop (and the fake child) writes must match the event catalogue."""
    monkeypatch.setenv(ENV_STRICT_EVENTS, "1")


def test_nan_quarantines_what_decide_named_and_resumes_before_it(tmp_path):
    nan = Child(steps=6, saves=[2, 4, 6], fail=FailureKind.NAN_LOSS, phase=Phase.OPTIMIZER_STEP,
                detail="non-finite loss", last_finite_step=4)
    code, launcher, record = run(tmp_path, [nan, Child(steps=1)])
    assert code == ExitCode.SUCCESS
    decision = record["attempts"][0]["decision"]
    [aside] = decision["quarantine"]
    assert aside["path"].endswith("checkpoint-6") and aside["reason"] == "after_nan" and aside["last_good_step"] == 4
    out = make_spec(tmp_path).checkpoint_dir
    assert not (out / "checkpoint-6").exists() and (out / "quarantine" / "checkpoint-6").is_dir()
    [moved] = events(make_spec(tmp_path), "checkpoint_quarantined")
    assert moved["step"] == 6 and moved["last_finite_step"] == 4
    assert record["attempts"][1]["resumed_from"].endswith("checkpoint-4")
    names = [e["event"] for e in events(make_spec(tmp_path))]
    assert names.index("checkpoint_quarantined") < names.index("decision")  # carried out, then journaled


def test_a_checkpoint_that_failed_to_load_is_set_aside(tmp_path):
    load_crash = Child(steps=0, fail=FailureKind.CRASH, phase=Phase.CHECKPOINT_LOAD, detail="RuntimeError: bad zip")
    code, _, record = run(tmp_path, [Child(steps=4, saves=[2, 4], fail=OOM), load_crash, Child(steps=1)])
    assert code == ExitCode.SUCCESS
    [aside] = record["attempts"][1]["decision"]["quarantine"]
    assert aside["path"].endswith("checkpoint-4") and aside["reason"] == "unloadable"
    out = make_spec(tmp_path).checkpoint_dir
    assert (out / "quarantine" / "checkpoint-4.unloadable-2").is_dir()
    assert record["attempts"][2]["resumed_from"].endswith("checkpoint-2")


def test_resume_mode_after_a_resume_oom_reaches_the_child_through_the_env(tmp_path):
    resume_oom = Child(steps=0, fail=FailureKind.RESUME_OOM, phase=Phase.CHECKPOINT_LOAD)
    code, launcher, record = run(tmp_path, [Child(steps=3, saves=[2], fail=OOM), resume_oom, Child(steps=1)])
    assert code == ExitCode.SUCCESS
    modes = [x.env[ENV_RESUME_MODE] for x in launcher.launched]
    assert modes == [ResumeMode.NORMAL.value, ResumeMode.NORMAL.value, ResumeMode.OPTIMIZER_ON_CPU.value]
    assert record["attempts"][1]["decision"]["resume_mode"] == "optimizer_on_cpu"
    assert "resume_mode" not in record["attempts"][0]["decision"]  # normal: run.json keeps its old shape


def test_memory_growth_is_evidence_for_every_oom_kind(tmp_path):
    script = [Child(steps=3, saves=[2], fail=kind, growth=5e8) for kind in
              (FailureKind.EVAL_OOM, FailureKind.HOST_OOM, OOM)] + [Child(steps=1)]
    code, _, record = run(tmp_path, script)
    assert code == ExitCode.SUCCESS
    assert [a["failure"]["memory_growth"] for a in record["attempts"][:3]] == [5e8] * 3
    crash = Child(steps=3, fail=FailureKind.CRASH, detail="ValueError: x", growth=5e8)
    _, _, other = run(tmp_path / "crash", [crash, Child(steps=1)], spec=make_spec(tmp_path / "crash"))
    assert "memory_growth" not in other["attempts"][0]["failure"]  # growth is OOM evidence only


def test_the_recovery_hook_hears_each_retry_and_cannot_stop_the_run(tmp_path):
    heard = []

    def hook(recovery):
        heard.append(recovery)
        raise RuntimeError("the webhook is down")

    spec = make_spec(tmp_path, on_recovery=hook)
    code, _, record = run(tmp_path, [Child(steps=3, saves=[2], fail=OOM), Child(steps=1)], spec=spec)
    assert code == ExitCode.SUCCESS and record["status"] == "succeeded"
    [r] = heard
    assert (r.attempt, r.kind, r.step) == (1, "cuda_oom", 3)
    assert r.reason == record["attempts"][0]["decision"]["reason"]
    assert r.changes == ("per_device_train_batch_size: 8 → 4", "gradient_accumulation_steps: 1 → 2")
    assert r.to_dict()["run_dir"] == str(spec.run_dir)


def test_a_give_up_is_not_a_recovery(tmp_path):
    heard = []
    spec = make_spec(tmp_path, on_recovery=heard.append)
    crash = Child(steps=2, fail=FailureKind.CRASH, detail="ValueError: bad column")
    code, _, _ = run(tmp_path, [crash, crash], spec=spec)
    assert code == ExitCode.CHILD_FAILED and len(heard) == 1  # the first crash was retried, the second not


def test_foreign_checkpoints_are_reported_once_and_never_resumed(tmp_path):
    spec = make_spec(tmp_path)
    foreign = write_checkpoint(spec.checkpoint_dir, 50)
    import os

    os.utime(foreign / "trainer_state.json", (1, 1))
    os.utime(foreign, (1, 1))
    code, _, record = run(tmp_path, [Child(steps=3, saves=[2], fail=OOM), Child(steps=3, saves=[4], fail=OOM),
                                     Child(steps=1)], spec=spec)
    assert code == ExitCode.SUCCESS and foreign.is_dir()
    assert [a["resumed_from"] for a in record["attempts"][1:]] == [str(spec.checkpoint_dir / "checkpoint-2"),
                                                                   str(spec.checkpoint_dir / "checkpoint-4")]
    assert len(events(spec, "checkpoint_foreign")) == 1
