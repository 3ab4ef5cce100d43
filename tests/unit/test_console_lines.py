"""The console: oomguard's lines on their own line, tracebacks condensed, the status line in words."""

import io
import types

from oomguard.supervisor import console
from oomguard.supervisor.console import TracebackCondenser
from oomguard.supervisor.process import _Echo
from oomguard.supervisor.progress import (
    ProgressTail,
    change_words,
    completed_step,
    duration_words,
    retry_words,
    rung_words,
)

TRACEBACK = b"""Traceback (most recent call last):
  File "/w/train.py", line 40, in <module>
    main()
  File "/site/transformers/trainer.py", line 2100, in training_step
    loss.backward()
    ~~~~~~~~~~~~~^^
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB
"""


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_traceback_becomes_its_exception_line_last_frame_and_log_path(tmp_path):
    c = TracebackCondenser(tmp_path / "attempts/003/stderr.log")
    shown = c.feed(b"loading...\n" + TRACEBACK) + c.flush()
    text = shown.decode()
    assert text.startswith("loading...\n")
    assert "[oomguard] child error: torch.OutOfMemoryError: CUDA out of memory" in text
    assert 'last frame: File "/site/transformers/trainer.py", line 2100, in training_step' in text
    assert "full traceback (7 lines):" in text and text.rstrip().endswith("attempts/003/stderr.log")
    assert "main()" not in text and "Traceback (most recent" not in text


def test_output_after_a_traceback_passes_through_and_chunk_boundaries_do_not_matter(tmp_path):
    stream = b"step 1\n" + TRACEBACK + b"\nDuring handling of the above exception, another exception occurred:\n\n" \
        + TRACEBACK.replace(b"torch.OutOfMemoryError: CUDA", b"RuntimeError: guard") + b"after\n"
    whole = TracebackCondenser(tmp_path / "e.log")
    once = whole.feed(stream) + whole.flush()
    for size in (1, 7, 64):
        c = TracebackCondenser(tmp_path / "e.log")
        pieces = b"".join(c.feed(stream[i:i + size]) for i in range(0, len(stream), size)) + c.flush()
        assert pieces == once, size
    text = once.decode()
    assert text.startswith("step 1\n") and text.endswith("after\n")
    assert text.count("child error:") == 1 and "child error: RuntimeError: guard" in text
    assert "while handling: torch.OutOfMemoryError" in text


def test_a_tqdm_line_passes_at_once_and_a_glued_traceback_is_still_found(tmp_path):
    c = TracebackCondenser(tmp_path / "e.log")
    assert c.feed(b"\r 10%|#  | 1/10") == b"\r 10%|#  | 1/10"
    out = (c.feed(b"\r 20%|## | 2/10" + TRACEBACK) + c.flush()).decode()
    assert out.startswith("\r 20%|## | 2/10\n[oomguard] child error: torch.OutOfMemoryError")


def test_an_exception_line_alone_for_a_while_is_shown_while_the_child_lives(tmp_path):
    clock = Clock()
    c = TracebackCondenser(tmp_path / "e.log", clock=clock)
    assert c.feed(TRACEBACK) == b""
    assert c.idle() == b""
    clock.now += 3
    assert b"child error: torch.OutOfMemoryError" in c.idle()
    assert c.feed(b"training goes on\n") == b"training goes on\n"


def test_oomguard_lines_start_on_their_own_line_after_an_open_child_line(capsys):
    console.note_child_output(2, b"\r 40%|####   | 4/10")
    console.say("attempt 1 failed")
    console.say("next line")
    assert capsys.readouterr().err == "\n[oomguard] attempt 1 failed\n[oomguard] next line\n"
    console.note_child_output(2, b"done\n")
    console.say("x")
    assert capsys.readouterr().err == "[oomguard] x\n"


def test_the_tolerant_stream_starts_any_print_on_a_fresh_line():
    inner = io.StringIO()
    stream = console.Tolerant(inner, 2)
    console.note_child_output(2, b"\r 40%|####")
    print("[oomguard] status", file=stream)
    print("[oomguard] more", file=stream)
    assert inner.getvalue() == "\n[oomguard] status\n[oomguard] more\n"


def test_the_echo_condenses_stderr_and_records_the_open_line(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_bytes(b"")
    sink = io.BytesIO()
    echo = _Echo(log, sink, fd=2, condense=True)
    log.write_bytes(b"\r 50%|#####")
    echo.pump()
    assert console.child_line_open(2)
    log.write_bytes(b"\r 50%|#####\n" + TRACEBACK)
    echo.pump(None)
    assert b"child error: torch.OutOfMemoryError" in sink.getvalue() and b"main()" not in sink.getvalue()
    assert not console.child_line_open(2)


def test_completed_step_reads_step_events_only():
    assert completed_step({"event": "step", "step": 4}) == 4
    assert completed_step({"event": "memory", "step": 4}) is None
    assert completed_step({"event": "step", "step": True}) is None


def test_rung_and_changes_in_words():
    changes = [{"knob": "per_device_train_batch_size", "old": 8, "new": 4},
               {"knob": "gradient_accumulation_steps", "old": 2, "new": 4}]
    assert rung_words({"ladder": "cuda_oom", "index": 1}, changes) == "after CUDA OOM: batch 8 → 4, accumulation ×2"
    assert rung_words(None, changes) == "as requested"
    assert rung_words({"ladder": "cuda_oom", "index": 0}, []) == "after CUDA OOM: same knobs"
    assert change_words({"knob": "learning_rate", "old": 2e-4, "new": 1e-4}) == "LR 0.0002 → 0.0001"
    assert duration_words(42) == "42 s" and duration_words(312) == "5 min 12 s" and duration_words(7300) == "2 h 01 min"


def _tail(tmp_path, attempts, gpu=None):
    record = types.SimpleNamespace(attempts=attempts, gpu=gpu)
    journal = types.SimpleNamespace(events_path=tmp_path / "events.jsonl", record=record)
    return ProgressTail(journal, len(attempts) or 1, True)


def test_status_line_has_step_rate_eta_and_memory_vs_cap(tmp_path):
    first = types.SimpleNamespace(rung=None, decision={"changes": [{"knob": "max_seq_length", "old": 2048,
                                                                       "new": 1024}]})
    second = types.SimpleNamespace(rung={"ladder": "cuda_oom", "index": 0}, decision=None)
    tail = _tail(tmp_path, [first, second], gpu={"total_gib": 80.0})
    for i, step in enumerate(range(5, 11)):
        tail.take({"event": "step", "time": 100.0 + 2 * i, "step": step, "max_steps": 30, "attempt": 2})
    tail.take({"event": "step", "time": 1.0, "step": 99, "max_steps": 30, "attempt": 1})  # another attempt's
    tail.take({"event": "memory", "step": 10, "step_peak": 6 * 2**30})
    tail.take({"event": "vram_limit", "limit": 24 * 2**30})
    assert tail.line() == ("attempt 2 · after CUDA OOM: length 2048 → 1024 · step 10/30 · 0.50 steps/s · ETA 40 s"
                           " · memory 6.0 / 24.0 GiB")


def test_a_retry_without_a_new_rung_says_what_earlier_rungs_changed():
    first = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3}
    now = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3}
    assert retry_words({"kind": "crash"}, first, now) == \
        "after crash: same knobs (batch 4 → 2, accumulation ×2 since attempt 1)"
    assert retry_words({"kind": "hang"}, first, first) == "after hang: same knobs"
    assert retry_words(None, first, first) == "after an interruption: same knobs"


def test_an_lr_far_outside_the_lora_range_is_said_once_at_the_start_and_journaled(tmp_path, capsys):
    from oomguard.policy.sanity import lr_note

    assert lr_note(2e-4, lora=True) is None and lr_note(2000.0, lora=False) is None  # no range for full FT
    assert lr_note(2000.0, lora=True).startswith("learning_rate 2000 is 4,000,000x above the usual LoRA/QLoRA")
    assert "below" in lr_note(1e-7, lora=True)
    assert lr_note(1e-3, lora=True) is None  # 2x above: taste, not a typo
    said = []
    journal = types.SimpleNamespace(events_path=tmp_path / "events.jsonl", record=types.SimpleNamespace(attempts=[]),
                                    event=lambda name, **fields: said.append({"event": name.value, **fields}))
    tail = ProgressTail(journal, 1, echo=True)
    seen = {"event": "recipe_observed", "attempt": 1, "stage": "built", "lora": True,
            "knobs": {"learning_rate": 2000.0}}
    tail.take(seen)
    tail.take({**seen, "stage": "in_force"})
    err = capsys.readouterr().err
    assert err.count("note: learning_rate 2000 is 4,000,000x above") == 1
    [event] = said
    assert (event["event"], event["learning_rate"], event["lora"]) == ("lr_note", 2000.0, True)
    later = ProgressTail(journal, 2, echo=True)  # attempt 2's own observation says nothing again
    later.take({**seen, "attempt": 2})
    assert "note:" not in capsys.readouterr().err


def test_a_grown_attempt_says_grown_back_not_an_interruption(tmp_path):
    from oomguard.protocol.run_record import AttemptRecord, Decision, DecisionAction, KnobChange, RungRef

    first = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    halved = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    changes = (KnobChange("per_device_train_batch_size", 4, 8), KnobChange("gradient_accumulation_steps", 2, 1))
    grow = Decision(DecisionAction.RETRY, dict(first), None, changes, "/x/checkpoint-6", None, "grow back: ...")
    attempts = [AttemptRecord(1, 0.0, dict(first)),
                AttemptRecord(2, 1.0, dict(halved), rung=RungRef("cuda_oom", 1), decision=grow),
                AttemptRecord(3, 2.0, dict(first), resumed_from="/x/checkpoint-6")]
    assert _tail(tmp_path, attempts)._rung() == "grown back: batch 4 → 8, accumulation 2 → 1"
    # the same retry carried out with other knobs (a continued run that never grew) stays a plain retry
    attempts[2] = AttemptRecord(3, 2.0, dict(halved))
    assert _tail(tmp_path, attempts)._rung().startswith("after an interruption: same knobs")
