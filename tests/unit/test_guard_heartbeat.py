"""The heartbeat callback's per-step events: one ``step`` per optimizer step, one ``trainer_log`` per log."""

import json
import os
from types import SimpleNamespace

import torch
from transformers import TrainerControl

from oomguard import protocol
from oomguard.guard.callbacks.heartbeat import HeartbeatCallback, heartbeat_path, numeric_logs


def read_events(run_dir):
    return [json.loads(line) for line in (run_dir / protocol.EVENTS_JSONL).read_text().splitlines()]


def test_step_event_per_optimizer_step_and_heartbeat_touched(tmp_path):
    cb = HeartbeatCallback(tmp_path, rank=1, attempt=3)
    for step in (1, 2):
        cb.on_step_end(None, SimpleNamespace(global_step=step, max_steps=10, epoch=step / 5), TrainerControl())
    assert heartbeat_path(tmp_path, 1).is_file()
    steps = [e for e in read_events(tmp_path) if e["event"] == protocol.EVENT_STEP]
    assert [(e["step"], e["max_steps"], e["epoch"], e["attempt"], e["rank"]) for e in steps] == \
        [(1, 10, 0.2, 3, 1), (2, 10, 0.4, 3, 1)]


def test_step_event_without_a_known_length(tmp_path):
    cb = HeartbeatCallback(tmp_path)
    cb.on_step_end(None, SimpleNamespace(global_step=1, max_steps=0, epoch=None), TrainerControl())
    [event] = read_events(tmp_path)
    assert (event["max_steps"], event["epoch"], event["attempt"], event["rank"]) == (None, None, 1, 0)


def test_trainer_log_event_keeps_the_numbers_only(tmp_path):
    cb = HeartbeatCallback(tmp_path)
    logs = {"loss": 1.25, "learning_rate": torch.tensor(2e-4), "grad_norm": 3, "epoch": 0.5,
            "oomguard/allocated_gib": 1.0, "note": "text", "flag": True}
    cb.on_log(None, SimpleNamespace(global_step=4), TrainerControl(), logs=logs)
    cb.on_log(None, SimpleNamespace(global_step=4), TrainerControl(), logs={"note": "only text"})
    [event] = read_events(tmp_path)
    assert event["event"] == protocol.EVENT_TRAINER_LOG and event["step"] == 4
    assert event["logs"] == {"loss": 1.25, "learning_rate": torch.tensor(2e-4).item(), "grad_norm": 3.0, "epoch": 0.5}


def test_numeric_logs_keeps_a_nan_as_a_float():
    out = numeric_logs({"loss": float("nan")})
    assert list(out) == ["loss"] and out["loss"] != out["loss"]


def test_outside_oomguard_nothing_is_written(tmp_path):
    cb = HeartbeatCallback(None)
    cb.on_step_end(None, SimpleNamespace(global_step=1, max_steps=1, epoch=1.0), TrainerControl())
    cb.on_log(None, SimpleNamespace(global_step=1), TrainerControl(), logs={"loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_saved_on_each_regular_save_rank0_only(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    (out / "checkpoint-4").mkdir(parents=True)
    args, state = SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=4)
    HeartbeatCallback(run_dir, rank=1).on_save(args, state, TrainerControl())
    HeartbeatCallback(run_dir).on_save(args, state, TrainerControl())
    [event] = read_events(run_dir)
    assert (event["event"], event["step"], event["path"], event["rank"]) == \
        ("checkpoint_saved", 4, str(out / "checkpoint-4"), 0)


def test_the_heartbeat_moves_at_most_every_beat_every_s_and_at_train_begin_always(tmp_path, monkeypatch):
    import oomguard.guard.callbacks.heartbeat as hb

    clock = [1000.0]
    monkeypatch.setattr(hb.time, "monotonic", lambda: clock[0])
    cb = HeartbeatCallback(tmp_path)
    path = heartbeat_path(tmp_path, 0)

    def moved(do) -> bool:
        if path.exists():
            os.utime(path, (1.0, 1.0))
        do()
        return path.exists() and path.stat().st_mtime > 1.0

    state = SimpleNamespace(global_step=1, max_steps=10, epoch=0.1)
    assert moved(lambda: cb.on_train_begin(None, state, TrainerControl()))
    clock[0] += hb.BEAT_EVERY_S / 2
    assert not moved(lambda: cb.on_step_end(None, state, TrainerControl()))  # the step event is still written
    assert moved(lambda: cb.on_train_begin(None, state, TrainerControl()))  # forced
    clock[0] += hb.BEAT_EVERY_S / 2
    clock[0] += hb.BEAT_EVERY_S
    assert moved(lambda: cb.on_substep_end(None, state, TrainerControl()))
    assert len([e for e in read_events(tmp_path) if e["event"] == protocol.EVENT_STEP]) == 1
