"""The child's side of grow back (issue 18 item 5): the shutdown callback's stop on the supervisor's request, and
the fault layer's fabricated memory model (CPU tests only)."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest
from test_guard_stop_agreement import DictStore

from oomguard import protocol
from oomguard.guard.callbacks.faults import parse_fake_memory
from oomguard.guard.callbacks.shutdown import GROW_STOP, ShutdownCallback, StopAgreement, grow_requested


def _callback(tmp_path, attempt: int = 2, **kw) -> ShutdownCallback:
    return ShutdownCallback(tmp_path, supervisor_pid=0, agreement=kw.pop("agreement", StopAgreement(None)),
                            attempt=attempt, **kw)


def _step(cb: ShutdownCallback, n: int) -> bool:
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    cb.on_step_end(None, SimpleNamespace(global_step=n), control)
    return control.should_save and control.should_training_stop


def _ask(run_dir, attempt: int) -> None:
    protocol.atomic_write_json(run_dir / protocol.GROW_REQUEST_JSON, {"attempt": attempt, "step": 4, "reason": "r"})


def _end(cb: ShutdownCallback, tmp_path, step: int) -> int:
    with pytest.raises(SystemExit) as done:
        cb.on_train_end(SimpleNamespace(output_dir=str(tmp_path / "out")), SimpleNamespace(global_step=step), None)
    return done.value.code


def _events(run_dir, name: str) -> list[dict]:
    return [e for e in protocol.read_jsonl(run_dir / protocol.EVENTS_JSONL) if e["event"] == name]


def test_a_request_for_this_attempt_saves_at_the_step_end_and_exits_0_with_its_own_event(tmp_path):
    cb = _callback(tmp_path)
    assert not _step(cb, 3)
    _ask(tmp_path, 2)
    assert _step(cb, 4) and cb.signum == GROW_STOP
    assert _end(cb, tmp_path, 4) == 0
    [stopped] = _events(tmp_path, "grow_stopped")
    assert (stopped["step"], stopped["attempt"], stopped["path"]) == (4, 2, str(tmp_path / "out" / "checkpoint-4"))
    assert not _events(tmp_path, "shutdown_saved") and _events(tmp_path, "shutdown_requested")


def test_a_request_on_the_last_step_is_ignored_the_run_is_over(tmp_path):
    cb = _callback(tmp_path)
    _ask(tmp_path, 2)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    cb.on_step_end(None, SimpleNamespace(global_step=10, max_steps=10), control)
    assert not cb.requested and not control.should_training_stop
    assert _step(cb, 9) and cb.signum == GROW_STOP  # before the last step it stops


def test_a_stale_or_torn_request_is_ignored(tmp_path):
    cb = _callback(tmp_path, attempt=3)
    _ask(tmp_path, 2)
    assert not _step(cb, 4) and not grow_requested(tmp_path, 3)
    (tmp_path / protocol.GROW_REQUEST_JSON).write_text('{"attempt": 3')
    assert not _step(cb, 5)
    assert not grow_requested(None, 3) and not grow_requested(tmp_path, None)


def test_a_stop_signal_replaces_a_pending_grow_back_stop(tmp_path):
    cb = _callback(tmp_path)
    cb.request(GROW_STOP, "grow")
    cb._handle(signal.SIGTERM, None)
    assert _step(cb, 4) and _end(cb, tmp_path, 4) == 128 + signal.SIGTERM
    assert _events(tmp_path, "shutdown_saved") and not _events(tmp_path, "grow_stopped")


def test_the_ranks_stop_at_one_step_for_a_grow_back_too(tmp_path):
    store = DictStore()
    asked = _callback(tmp_path, agreement=StopAgreement(store))
    other = _callback(tmp_path, attempt=9, rank=1, agreement=StopAgreement(store))  # never reads it
    _ask(tmp_path, 2)
    assert not _step(asked, 5) and not _step(other, 5)  # proposed: the end of step 6
    assert _step(asked, 6) and _step(other, 6) and other.signum == GROW_STOP
    assert _end(other, tmp_path, 6) == 0


def test_the_fabricated_memory_model_parses_or_says_the_fix():
    assert parse_fake_memory(None) is None and parse_fake_memory(" ") is None
    assert parse_fake_memory("per_token=262144") == (262144, 0)
    assert parse_fake_memory("per_token=2, base=100") == (2, 100)
    for bad in ("per_token=1.5", "base=3", "tokens=4", "per_token"):
        with pytest.raises(ValueError, match="OOMGUARD_FAKE_MEMORY"):
            parse_fake_memory(bad)

