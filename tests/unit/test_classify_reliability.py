"""Classification rules the fault matrix (issue 7) relies on: a full disk says so; a record beats a hang kill."""

import pytest

from oomguard.protocol import ErrorRecord, FailureKind, Phase
from oomguard.supervisor.classify import classify, find_disk_full
from oomguard.supervisor.process import ChildOutcome


def outcome(rc=1, sig=None, hung=False, stderr=""):
    return ChildOutcome(exit_code=rc, signal=sig, hung=hung, interrupted_by=None, duration_s=1.0,
                        host_mem_peak_percent=10.0, stderr_tail=stderr, pids=frozenset())


@pytest.mark.parametrize("line", [
    "OSError: [Errno 28] No space left on device: '/ckpt/checkpoint-4/optimizer.pt'",
    "safetensors_rust.SafetensorError: Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })",
    "RuntimeError: [enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed",
    "OSError: [Errno 27] File too large",
    "OSError: [Errno 122] Disk quota exceeded",
])
def test_disk_full_is_named_first_with_the_fix(line):
    assert find_disk_full(f"Traceback...\n{line}\n") == line
    f = classify(outcome(stderr=f"Traceback (most recent call last):\n{line}\n"), [], host_oom_percent=90, last_step=4)
    assert f.kind == FailureKind.CRASH and f.step == 4
    assert f.detail.startswith("disk full: ") and line[:100] in f.detail and "free space" in f.detail


def test_disk_full_in_a_record_keeps_its_phase():
    rec = ErrorRecord(kind=FailureKind.CRASH, phase=Phase.SAVE, step=4, detail="OSError: [Errno 28] No space left on device")
    f = classify(outcome(), [rec], host_oom_percent=90)
    assert f.detail.startswith("disk full during save: OSError: [Errno 28]")


def test_other_crashes_are_left_alone():
    f = classify(outcome(stderr="ValueError: bad column\n"), [], host_oom_percent=90)
    assert f.detail == "ValueError: bad column"


def test_a_record_written_before_a_hang_kill_is_the_cause():
    """The child recorded its OOM, then its teardown outlasted hang_timeout_s and we killed it."""
    rec = ErrorRecord(kind=FailureKind.CUDA_OOM, phase=Phase.FORWARD_BACKWARD, step=2, detail="CUDA out of memory")
    f = classify(outcome(rc=None, sig=9, hung=True), [rec], host_oom_percent=90)
    assert (f.kind, f.step) == (FailureKind.CUDA_OOM, 2)
    assert classify(outcome(rc=None, sig=9, hung=True), [], host_oom_percent=90).kind == FailureKind.HANG
