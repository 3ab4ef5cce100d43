"""The status line's tokens/s comes from the trainer's own running token count in ``trainer_log`` events."""

import types

from oomguard.supervisor.progress import ProgressTail


def _tail(tmp_path):
    record = types.SimpleNamespace(attempts=[], gpu=None)
    return ProgressTail(types.SimpleNamespace(events_path=tmp_path / "events.jsonl", record=record), 1, True)


def test_tokens_per_second_from_trls_num_tokens(tmp_path):
    tail = _tail(tmp_path)
    for i in range(4):
        tail.take({"event": "step", "time": 10.0 + i, "step": i + 1, "max_steps": 10, "attempt": 1})
        tail.take({"event": "trainer_log", "time": 10.0 + i, "step": i + 1, "logs": {"num_tokens": 1000.0 * (i + 1)}})
    assert "1,000 tokens/s" in tail.line()
    assert tail.line().startswith("attempt 1 · as requested · step 4/10 · 1.00 steps/s · 1,000 tokens/s · ETA 6 s")


def test_hf_num_input_tokens_seen_counts_too_and_no_count_says_nothing(tmp_path):
    tail = _tail(tmp_path)
    for i in range(3):
        tail.take({"event": "step", "time": 2.0 * i, "step": i + 1, "attempt": 1})
        tail.take({"event": "trainer_log", "time": 2.0 * i, "step": i + 1, "logs": {"loss": 1.0}})
    assert "tokens/s" not in tail.line()
    for i in range(3):
        tail.take({"event": "trainer_log", "time": 10.0 + i, "logs": {"num_input_tokens_seen": 500 * i}})
    assert tail.token_rate() == 500.0
