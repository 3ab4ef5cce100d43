"""supervisor/grow_back.py's reading of the run record: which attempts ran a grow-back (issue 18 item 5)."""

from __future__ import annotations

from oomguard.policy.records import MemoryPoint
from oomguard.protocol import FailureKind, RunStatus
from oomguard.protocol.run_record import AttemptRecord, Decision, DecisionAction, Failure, KnobChange, RunRecord
from oomguard.supervisor.grow_back import grown_attempts, memory_point

B, A = "per_device_train_batch_size", "gradient_accumulation_steps"


def _grow(resume: str = "ck/checkpoint-9") -> Decision:
    return Decision(DecisionAction.RETRY, {B: 8, A: 1}, None, (KnobChange(B, 4, 8), KnobChange(A, 2, 1)), resume,
                    None, "grow back: batch 4 → 8")


def _record(*attempts: AttemptRecord) -> RunRecord:
    return RunRecord(status=RunStatus.RUNNING, command=["train"], policy="p", policy_file="p.yaml", requested={},
                     config={}, checkpoint_dir="ck", attempts=list(attempts))


def test_an_attempt_after_a_clean_stop_with_a_retry_that_runs_its_batch_grew():
    oom = Failure(FailureKind.CUDA_OOM, step=2)
    record = _record(AttemptRecord(1, 0.0, {B: 8, A: 1}, failure=oom,
                                   decision=Decision(DecisionAction.RETRY, {B: 4, A: 2}, None, (), None, None, "halve")),
                     AttemptRecord(2, 1.0, {B: 4, A: 2}, decision=_grow()),
                     AttemptRecord(3, 2.0, {B: 8, A: 1}))
    assert grown_attempts(record) == {3}  # attempt 2 followed a failure: a rung, not a grow-back


def test_a_continued_run_that_never_carried_the_grow_back_out_did_not_grow():
    record = _record(AttemptRecord(1, 0.0, {B: 4, A: 2}, decision=_grow()), AttemptRecord(2, 1.0, {B: 4, A: 2}))
    assert grown_attempts(record) == set()


def test_a_memory_sample_is_its_step_peak_or_the_window_peak_the_guard_journals_since_the_previous_one():
    assert memory_point({"event": "memory", "step": 20, "step_peak": 5, "rank": 1}) == MemoryPoint(20, 5, 1)
    assert memory_point({"event": "memory", "step": 20, "step_peak": 5, "window_peak": 9}) == MemoryPoint(20, 9)
    assert memory_point({"event": "memory", "step": 20, "host_rss": 5}) is None  # CPU: no CUDA figures
    assert memory_point({"event": "step", "step": 20, "step_peak": 5}) is None
