"""Classification: record first, then hang, host OOM, stderr OOM patterns, crash."""

import signal

import pytest

from oomguard.protocol import ErrorRecord, FailureKind, Phase
from oomguard.supervisor.classify import classify
from oomguard.supervisor.process import ChildOutcome


def outcome(rc=1, sig=None, hung=False, stderr="", mem=10.0):
    return ChildOutcome(exit_code=rc, signal=sig, hung=hung, interrupted_by=None, duration_s=1.0,
                        host_mem_peak_percent=mem, stderr_tail=stderr, pids=frozenset())


@pytest.mark.parametrize("line", [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    "RuntimeError: CUDA error: out of memory",
    "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "Error out of memory at line 380 in file /src/csrc/ops.cu",
    "torch.cuda.OutOfMemoryError: CUDA out of memory.",
    "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
])
def test_oom_message_variants(line):
    f = classify(outcome(stderr=f"Traceback...\n{line}\n"), [], host_oom_percent=90, last_step=4)
    assert f.kind == FailureKind.CUDA_OOM and f.step == 4 and line.strip() in f.detail


def test_success_and_crash_and_record_precedence():
    assert classify(outcome(rc=0), [], host_oom_percent=90) is None
    crash = classify(outcome(stderr="ValueError: bad column\n"), [], host_oom_percent=90)
    assert crash.kind == FailureKind.CRASH and crash.detail == "ValueError: bad column"
    rec = ErrorRecord(kind=FailureKind.NAN_LOSS, phase=Phase.OPTIMIZER_STEP, step=7, detail="grad norm nan", rank=1)
    f = classify(outcome(stderr="CUDA out of memory"), [rec], host_oom_percent=90)
    assert (f.kind, f.step, f.phase, f.rank) == (FailureKind.NAN_LOSS, 7, Phase.OPTIMIZER_STEP, 1)


def test_sigkill_host_oom_threshold_and_hang():
    assert classify(outcome(rc=None, sig=signal.SIGKILL, mem=95), [], host_oom_percent=90).kind == FailureKind.HOST_OOM
    low = classify(outcome(rc=None, sig=signal.SIGKILL, mem=40), [], host_oom_percent=90)
    assert low.kind == FailureKind.CRASH and "SIGKILL" in low.detail
    assert classify(outcome(rc=None, sig=signal.SIGTERM, hung=True), [], host_oom_percent=90).kind == FailureKind.HANG


@pytest.mark.parametrize("stderr, line", [
    ("usage: train.py [-h] [--lr LR]\ntrain.py: error: unrecognized arguments: --gradient_accumulation_steps 8\n",
     "train.py: error: unrecognized arguments: --gradient_accumulation_steps 8"),
    ("usage: trl [-h]\ntrl: error: argument --bf16: expected one argument\n",
     "trl: error: argument --bf16: expected one argument"),
    ("Usage: yamltrain [OPTIONS] CONFIG\nTry 'yamltrain --help' for help.\n\nError: No such option: --x\n",
     "Error: No such option: --x"),
])
def test_a_usage_error_before_any_step_is_marked_deterministic(stderr, line):
    f = classify(outcome(rc=2, stderr=stderr), [], host_oom_percent=90)
    assert f.kind == FailureKind.CRASH and f.usage and f.phase == Phase.STARTUP and line in f.detail


def test_exit_2_after_steps_or_without_a_usage_message_is_a_plain_crash():
    usage = "usage: t.py\nt.py: error: bad\n"
    assert not classify(outcome(rc=2, stderr=usage), [], host_oom_percent=90, last_step=3).usage
    assert not classify(outcome(rc=2, stderr="ValueError: x\n"), [], host_oom_percent=90).usage
    assert not classify(outcome(rc=1, stderr=usage), [], host_oom_percent=90).usage
