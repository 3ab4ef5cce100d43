"""Reliability defects 3, 4, 8, 9 and 18 at the level of their pure (or file-only) functions.

The runs that prove the same end to end are in tests/integration/test_reliability_resume.py.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest

from oomguard import protocol
from oomguard.guard.env import faults_armed
from oomguard.policy import AttemptView, CheckpointInfo, Failure, decide, load_policy
from oomguard.protocol import FailureKind, Phase
from oomguard.recipes.options import resolve_options
from oomguard.supervisor.checkpoints import inspect_checkpoint, torch_file_problem, written_since
from oomguard.supervisor.classify import classify, final_oom
from oomguard.supervisor.process import ChildOutcome

POLICY = Path(__file__).parents[1] / "integration" / "policies" / "fast.yaml"
STATE = b"optimizer state " * 64


def make_checkpoint(root: Path, step: int, *, damage_member: bool = False) -> Path:
    ck = root / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (ck / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with zipfile.ZipFile(ck / "optimizer.pt", "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", STATE)
    if damage_member:  # bytes inside the member change; the end record and central directory stay
        raw = bytearray((ck / "optimizer.pt").read_bytes())
        at = raw.index(STATE)
        raw[at:at + 8] = b"XXXXXXXX"
        (ck / "optimizer.pt").write_bytes(bytes(raw))
    (ck / "scheduler.pt").write_bytes(b"sch")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


# --- defect 8: the scan reads every zip member's CRC -------------------------------------------
def test_zip_damaged_inside_with_its_end_record_intact_is_a_problem(tmp_path):
    bad = make_checkpoint(tmp_path, 4, damage_member=True)
    assert zipfile.is_zipfile(bad / "optimizer.pt")  # what the old check looked at: it passes
    scan = inspect_checkpoint(bad)
    assert not scan.complete
    assert any("optimizer.pt is corrupt inside" in p and "archive/data.pkl" in p for p in scan.problems)
    assert inspect_checkpoint(make_checkpoint(tmp_path, 2)).complete


def test_a_real_torch_save_file_passes_the_member_check(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"state": {0: {"exp_avg": torch.zeros(1000)}}, "param_groups": [{"lr": 1e-3}]}, tmp_path / "o.pt")
    assert torch_file_problem(tmp_path / "o.pt") is None


# --- defect 8: a crash loading a checkpoint walks back, it is not "the same crash twice" --------
def _load_crash(n: int, resumed: int) -> AttemptView:
    failure = Failure(kind=FailureKind.CRASH, step=resumed, phase=Phase.CHECKPOINT_LOAD,
                      detail="UnpicklingError: invalid load key, 'g'.")
    return AttemptView(n=n, knobs={"per_device_train_batch_size": 8}, rung=None, failure=failure,
                       max_step=None, resumed_step=resumed)


def test_checkpoint_load_crash_resumes_from_the_next_older_checkpoint():
    policy = load_policy(POLICY)
    first = AttemptView(n=1, knobs={"per_device_train_batch_size": 8}, rung=None, max_step=6,
                        failure=Failure(kind=FailureKind.CRASH, step=6, detail="RuntimeError: transient"))
    ckpts = [CheckpointInfo("/c/checkpoint-6", 6), CheckpointInfo("/c/checkpoint-4", 4),
             CheckpointInfo("/c/checkpoint-2", 2)]
    d = decide(policy, [first, _load_crash(2, 6)], ckpts)
    assert (d.action, d.resume_from, d.rung, d.backoff_s) == ("retry", "/c/checkpoint-4", None, 0.0)
    assert "checkpoint-6 failed to load" in d.reason
    # the same load error again, one checkpoint further back: walk on, do not stop as "fix the script"
    d = decide(policy, [first, _load_crash(2, 6), _load_crash(3, 4)], ckpts)
    assert (d.action, d.resume_from) == ("retry", "/c/checkpoint-2")
    d = decide(policy, [first, _load_crash(2, 2)], ckpts[2:])
    assert (d.action, d.resume_from) == ("retry", None) and "starting from scratch" in d.reason


# --- defect 9: the last exception wins over an earlier, caught OOM line ------------------------
CAUGHT = ("warning: CUDA out of memory in the eval probe; caught, skipping it\n"
          "Traceback (most recent call last):\n  File \"train.py\", line 9, in <module>\n"
          "    main()\nValueError: a bug in the script")


def _outcome(tail: str) -> ChildOutcome:
    return ChildOutcome(exit_code=1, signal=None, hung=False, interrupted_by=None, duration_s=1.0,
                        host_mem_peak_percent=0.0, stderr_tail=tail, pids=frozenset())


def test_a_caught_oom_line_does_not_outrank_the_traceback_that_ended_the_child():
    failure = classify(_outcome(CAUGHT), [], host_oom_percent=95)
    assert failure.kind is FailureKind.CRASH and "ValueError: a bug in the script" in failure.detail


@pytest.mark.parametrize("tail", [
    "Traceback (most recent call last):\n  File \"t.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory. Tried",
    # chained: a harmless ValueError was being handled when the OOM that ended it came
    "Traceback (most recent call last):\n  File \"a\"\nValueError: x\n\nDuring handling of the above exception, "
    "another exception occurred:\n\nTraceback (most recent call last):\n  File \"b\"\n"
    "torch.OutOfMemoryError: CUDA out of memory",
    CAUGHT + "\nError out of memory at line 380 in file /src/csrc/ops.cu",  # bnb's native print after it
    "torch.OutOfMemoryError: CUDA out of memory at step 3",  # no traceback at all
])
def test_an_oom_that_ended_the_child_is_still_an_oom(tail):
    assert final_oom(tail) is not None
    assert classify(_outcome(tail), [], host_oom_percent=95).kind is FailureKind.CUDA_OOM


def test_a_chain_ending_in_a_plain_error_is_a_crash():
    tail = ("Traceback (most recent call last):\n  File \"a\"\ntorch.OutOfMemoryError: CUDA out of memory\n\n"
            "During handling of the above exception, another exception occurred:\n\n"
            "Traceback (most recent call last):\n  File \"b\"\nKeyError: 'labels'")
    assert final_oom(tail) is None


# --- defect 4: the user's --resume_from_checkpoint stands on attempt 1 -------------------------
def test_empty_resume_from_on_attempt_1_keeps_the_users_flag():
    env = {protocol.ENV_RESUME_FROM: "", protocol.ENV_ATTEMPT: "1"}
    assert resolve_options(["--resume_from_checkpoint", "mine/checkpoint-8"], environ=env).resume_from_checkpoint \
        == "mine/checkpoint-8"
    later = {protocol.ENV_RESUME_FROM: "", protocol.ENV_ATTEMPT: "2"}  # the supervisor chose a fresh start
    assert resolve_options(["--resume_from_checkpoint", "mine/checkpoint-8"], environ=later).resume_from_checkpoint \
        is None
    chosen = {protocol.ENV_RESUME_FROM: "/c/checkpoint-4", protocol.ENV_ATTEMPT: "1"}
    assert resolve_options(["--resume_from_checkpoint", "x"], environ=chosen).resume_from_checkpoint == "/c/checkpoint-4"


# --- defect 3: a checkpoint is this run's when written at or after the run started -------------
def test_written_since_reads_trainer_state_mtime(tmp_path):
    ck = make_checkpoint(tmp_path, 50)
    old = time.time() - 3600
    os.utime(ck / "trainer_state.json", (old, old))
    scan = inspect_checkpoint(ck)
    assert not written_since(scan, time.time() - 60)
    assert written_since(scan, old - 1)


# --- defect 18: faults fire only under a live supervisor that asked for them -------------------
INJECT = {protocol.ENV_INJECT: "crash@step=2"}


@pytest.mark.parametrize("environ, alive, armed", [
    (INJECT, True, False),  # a stray OOMGUARD_INJECT in a shell: no run dir, no supervisor
    ({**INJECT, protocol.ENV_SUPERVISOR_PID: "4242"}, True, False),  # no run dir
    ({**INJECT, protocol.ENV_RUN_DIR: "/r", protocol.ENV_SUPERVISOR_PID: "4242"}, False, False),  # it died
    ({**INJECT, protocol.ENV_RUN_DIR: "/r", protocol.ENV_SUPERVISOR_PID: "nope"}, True, False),
    ({**INJECT, protocol.ENV_RUN_DIR: "/r", protocol.ENV_SUPERVISOR_PID: "4242"}, True, True),
    ({**INJECT, protocol.ENV_RUN_DIR: "/r"}, True, True),  # a test harness writing the run dir itself
])
def test_faults_are_armed_only_under_a_live_supervisor(environ, alive, armed):
    why = faults_armed(environ, alive=lambda pid: alive)
    assert (why is None) is armed
    if not armed:
        assert why  # says why, for the one stderr line the guard prints


def test_a_dead_supervisor_pid_is_checked_for_real():
    dead = 2**22 + 12345  # above the default pid_max: no such process
    assert "gone" in faults_armed({**INJECT, protocol.ENV_RUN_DIR: "/r", protocol.ENV_SUPERVISOR_PID: str(dead)})
    assert faults_armed({**INJECT, protocol.ENV_RUN_DIR: "/r", protocol.ENV_SUPERVISOR_PID: str(os.getpid())}) is None


def test_the_fault_callback_drops_a_stray_inject_and_says_so(capsys):
    pytest.importorskip("transformers")
    from oomguard.guard.callbacks.faults import FaultInjectionCallback

    faults = protocol.parse_inject("crash@step=2")
    stray = FaultInjectionCallback(faults, None, environ=INJECT)
    assert stray.faults == ()
    assert "ignoring OOMGUARD_INJECT" in capsys.readouterr().err
    asked = {**INJECT, protocol.ENV_RUN_DIR: "/r", protocol.ENV_SUPERVISOR_PID: str(os.getpid())}
    assert FaultInjectionCallback(faults, None, environ=asked).faults == tuple(faults)
