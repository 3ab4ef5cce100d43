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
