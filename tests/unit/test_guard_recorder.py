import pytest
import torch

from oomguard.guard.callbacks.nan import NonFiniteLossError
from oomguard.guard.recorder import CaughtFailure, build_record, classify_exception
from oomguard.protocol import ErrorRecord, FailureKind, Phase


@pytest.mark.parametrize("exc_type,message", [
    ("torch.OutOfMemoryError", "anything"),
    ("torch.cuda.OutOfMemoryError", ""),
    ("builtins.RuntimeError", "CUDA out of memory. Tried to allocate 20.00 MiB"),
    ("builtins.RuntimeError", "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    ("builtins.RuntimeError", "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ("builtins.RuntimeError", "Error out of memory at line 383 in file /src/csrc/pythonInterface.cpp"),
])
def test_oom_variants_are_cuda_oom(exc_type, message):
    assert classify_exception(exc_type, message, Phase.FORWARD_BACKWARD) == FailureKind.CUDA_OOM


def test_phase_decides_resume_and_eval_oom():
    assert classify_exception("torch.OutOfMemoryError", "", Phase.CHECKPOINT_LOAD) == FailureKind.RESUME_OOM
    assert classify_exception("torch.OutOfMemoryError", "", Phase.EVAL) == FailureKind.EVAL_OOM
    assert classify_exception("torch.OutOfMemoryError", "", Phase.OPTIMIZER_STEP) == FailureKind.CUDA_OOM


def test_non_oom_is_crash_and_nan_is_nan_loss():
    assert classify_exception("builtins.ValueError", "shape mismatch", Phase.FORWARD_BACKWARD) == FailureKind.CRASH
    failure = CaughtFailure.capture(NonFiniteLossError(7, 6, 0), Phase.OPTIMIZER_STEP)
    assert failure.kind == FailureKind.NAN_LOSS and failure.last_finite_step == 6


def test_wrapped_oom_found_in_the_chain():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as exc:
        failure = CaughtFailure.capture(exc, Phase.FORWARD_BACKWARD)
    assert failure.kind == FailureKind.CUDA_OOM
    assert "Tried to allocate" in failure.traceback


def test_record_round_trips_through_protocol():
    failure = CaughtFailure.capture(torch.OutOfMemoryError("CUDA out of memory"), Phase.EVAL)
    rec = build_record(failure, step=4, rank=1, saved_checkpoint=None, last_finite_step=4,
                       memory={"num_ooms": 1}, note="no emergency checkpoint")
    back = ErrorRecord.from_dict(rec.to_dict())
    assert (back.kind, back.phase, back.step, back.rank) == (FailureKind.EVAL_OOM, Phase.EVAL, 4, 1)
    assert "no emergency checkpoint" in back.detail
