"""The supervisor loop with a fake launcher and clock: success, retry, give-up, interrupt, continuation.

No subprocess, no torch: the launcher plays a scripted child into the run dir (tests/unit/_loop_fakes.py).
"""

from __future__ import annotations

import signal

import pytest
from _loop_fakes import (
    ACCUM,
    BATCH,
    SIGINT,
    Child,
    FakeClock,
    FakeLauncher,
    SupervisorDied,
    events,
    flag,
    make_spec,
    read_run,
    run,
)

from oomguard.errors import ExitCode
from oomguard.protocol import ENV_RESUME_FROM, ENV_STRICT_EVENTS, FailureKind, Phase
from oomguard.supervisor.loop import supervise

OOM = FailureKind.CUDA_OOM


@pytest.fixture(autouse=True)
def strict_events(monkeypatch):
    """Every line the loop (and the fake child) writes must match the event catalogue."""
    monkeypatch.setenv(ENV_STRICT_EVENTS, "1")


def test_success_is_one_attempt_and_the_command_as_written(tmp_path):
    code, launcher, record = run(tmp_path, [Child(steps=5, saves=[4])])
    assert code == ExitCode.SUCCESS and record["status"] == "succeeded" and record["exit_code"] == 0
    [attempt] = record["attempts"]
    assert attempt["max_step"] == 5 and attempt["failure"] is None and attempt["decision"] is None
    assert launcher.launched[0].argv == list(make_spec(tmp_path).command)  # Trust rule 1: byte for byte
    assert ENV_RESUME_FROM not in launcher.launched[0].env  # attempt 1: the command's own resume stands


def test_oom_is_retried_on_the_next_rung_from_the_newest_checkpoint(tmp_path):
    clock = FakeClock()
    code, launcher, record = run(tmp_path, [Child(steps=3, saves=[2], fail=OOM), Child(steps=2)], clock=clock)
    assert code == ExitCode.SUCCESS and len(record["attempts"]) == 2
    first, second = record["attempts"]
    assert first["failure"]["kind"] == "cuda_oom" and first["failure"]["step"] == 3
    decision = first["decision"]
    assert decision["action"] == "retry" and decision["rung"] == {"ladder": "cuda_oom", "index": 0}
    assert decision["changes"] == [{"knob": BATCH, "old": 8, "new": 4}, {"knob": ACCUM, "old": 1, "new": 2}]
    argv = launcher.launched[1].argv
    assert flag(argv, "--per_device_train_batch_size") == "4" and flag(argv, "--gradient_accumulation_steps") == "2"
    assert second["resumed_from"].endswith("checkpoint-2") and second["resumed_step"] == 2
    assert launcher.launched[1].env[ENV_RESUME_FROM] == second["resumed_from"]
    assert second["rung"] == {"ladder": "cuda_oom", "index": 0} and second["max_step"] == 4
    assert [e["event"] for e in events(make_spec(tmp_path))].count("decision") == 1
    assert clock.slept == 0  # no backoff in the policy, and the loop never waits on the real clock


def test_the_ladder_spent_gives_up_with_its_exit_code(tmp_path):
    code, launcher, record = run(tmp_path, [Child(steps=1, saves=[1], fail=OOM)] * 5)
    assert code == ExitCode.GAVE_UP and record["status"] == "gave_up" and record["give_up"] == "ladder_exhausted"
    assert [flag(x.argv, "--per_device_train_batch_size") for x in launcher.launched] == ["8", "4", "2", "1"]
    assert "every rung of the cuda_oom ladder is used up" in record["root_cause"]
    assert events(make_spec(tmp_path), "run_ended")[-1]["give_up"] == "ladder_exhausted"


def test_the_same_crash_twice_is_unrecoverable(tmp_path):
    crash = Child(steps=2, fail=FailureKind.CRASH, detail="ValueError: bad column")
    code, _, record = run(tmp_path, [crash, crash])
    assert code == ExitCode.CHILD_FAILED and record["status"] == "failed" and record["give_up"] == "unrecoverable"


def test_no_progress_stops_with_its_own_exit_code(tmp_path):
    hang = Child(steps=0, fail=FailureKind.HANG, phase=Phase.UNKNOWN, detail="no heartbeat")
    code, _, record = run(tmp_path, [hang] * 3)
    assert code == ExitCode.NO_PROGRESS and record["give_up"] == "no_progress"


def test_interrupt_during_an_attempt_ends_the_run_interrupted(tmp_path):
    code, _, record = run(tmp_path, [Child(steps=3, saves=[2], interrupt=SIGINT)])
    assert code == ExitCode.INTERRUPTED and record["status"] == "interrupted"
    assert record["root_cause"] == "interrupted by SIGINT"
    [attempt] = record["attempts"]
    assert attempt["interrupted"] == "SIGINT" and attempt["failure"] is None and attempt["decision"] is None


def test_continuation_after_an_interrupt_resumes_the_same_knobs(tmp_path):
    run(tmp_path, [Child(steps=3, saves=[2], interrupt=SIGINT)])
    code, launcher, record = run(tmp_path, [Child(steps=2)])
    assert code == ExitCode.SUCCESS and len(record["attempts"]) == 2
    assert record["attempts"][1]["resumed_from"].endswith("checkpoint-2")
    assert flag(launcher.launched[0].argv, "--per_device_train_batch_size") == "8"
    [continued] = events(make_spec(tmp_path), "run_continued")
    assert continued["after_attempts"] == 1 and continued["previous_status"] == "interrupted"


def test_a_retry_decided_but_not_started_is_carried_out_as_decided(tmp_path):
    code, _, record = run(tmp_path, [Child(steps=3, saves=[2], fail=OOM, stop_after=int(signal.SIGTERM))])
    assert code == ExitCode.REQUEUE and "between attempts" in record["root_cause"]
    assert record["attempts"][0]["decision"]["action"] == "retry"
    code, launcher, record = run(tmp_path, [Child(steps=2)])
    assert code == ExitCode.SUCCESS
    assert flag(launcher.launched[0].argv, "--per_device_train_batch_size") == "4"
    assert record["attempts"][1]["rung"] == {"ladder": "cuda_oom", "index": 0}


def test_a_dead_supervisors_failed_attempt_is_decided_by_the_next_one(tmp_path):
    spec = make_spec(tmp_path)
    with pytest.raises(SupervisorDied):
        run(tmp_path, [Child(steps=3, saves=[2], fail=OOM, die=True)], spec=spec)
    assert read_run(spec)["status"] == "running" and read_run(spec)["attempts"][0]["ended"] is None
    code, launcher, record = run(tmp_path, [Child(steps=2)], spec=spec)
    assert code == ExitCode.SUCCESS
    first = record["attempts"][0]
    assert first["failure"]["kind"] == "cuda_oom" and first["decision"]["action"] == "retry"
    assert events(spec, "attempt_abandoned")[0]["failure"]["kind"] == "cuda_oom"
    assert flag(launcher.launched[0].argv, "--per_device_train_batch_size") == "4"


def test_the_wall_clock_budget_reads_the_injected_clock(tmp_path):
    policy = make_spec(tmp_path).policy
    policy = policy.model_copy(update={"limits": policy.limits.model_copy(update={"wall_clock_budget_s": 60})})
    clock, spec = FakeClock(), make_spec(tmp_path, policy=policy)
    launcher = FakeLauncher(spec.checkpoint_dir, [Child(steps=2, fail=OOM)])

    def late(*args, **kwargs):
        clock.offset += 3600  # an hour passes while the child runs
        return launcher(*args, **kwargs)

    code = supervise(spec, launch=late, clock=clock)
    record = read_run(spec)
    assert code == ExitCode.GAVE_UP and record["give_up"] == "wall_clock"


def test_crash_backoff_waits_on_the_clock_not_the_wall(tmp_path):
    policy = make_spec(tmp_path).policy
    backoff = policy.limits.backoff.model_copy(update={"initial_s": 7, "max_s": 60})
    limits = policy.limits.model_copy(update={"backoff": backoff})
    spec = make_spec(tmp_path, policy=policy.model_copy(update={"limits": limits}))
    clock = FakeClock()
    crash = Child(steps=2, fail=FailureKind.CRASH, detail="RuntimeError: flaky")
    code, _, record = run(tmp_path, [crash, Child(steps=1)], spec=spec, clock=clock)
    assert code == ExitCode.SUCCESS and record["attempts"][0]["decision"]["backoff_s"] == 7
    assert clock.slept == pytest.approx(7, abs=0.11)
