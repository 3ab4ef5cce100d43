"""The guard inside a real tiny training run (CPU), in a real subprocess with OOMGUARD_* set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from oomguard import protocol

ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("_tiny.py")


def run_child(tmp_path: Path, inject: str, *, save_steps: int, max_steps: int = 5, attempt: int = 1,
              resume_from: str = "", extra: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, Path, Path]:
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir(exist_ok=True)
    error_file = run_dir / protocol.ATTEMPTS_DIR / f"{attempt:03d}" / protocol.ERROR_JSON
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           protocol.ENV_RUN_DIR: str(run_dir), protocol.ENV_ERROR_FILE: str(error_file),
           protocol.ENV_ATTEMPT: str(attempt), protocol.ENV_INJECT: inject,
           protocol.ENV_RESUME_FROM: resume_from, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(CHILD), str(out), "--max-steps", str(max_steps),
                           "--save-steps", str(save_steps), *extra],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    return proc, run_dir, out


def error_record(run_dir: Path, attempt: int = 1) -> protocol.ErrorRecord:
    path = run_dir / protocol.ATTEMPTS_DIR / f"{attempt:03d}" / protocol.ERROR_JSON
    return protocol.ErrorRecord.from_dict(json.loads(path.read_text()))


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in protocol.read_jsonl(run_dir / protocol.EVENTS_JSONL) if e["event"] == name]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def test_cuda_oom_keeps_the_regular_checkpoint(tmp_path):
    proc, run_dir, out = run_child(tmp_path, "cuda_oom@step=3", save_steps=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rec = error_record(run_dir)
    assert (rec.kind, rec.phase, rec.step) == (protocol.FailureKind.CUDA_OOM, protocol.Phase.FORWARD_BACKWARD, 2)
    assert checkpoints(out) == ["checkpoint-2"]
    assert rec.saved_checkpoint == str(out / "checkpoint-2")
    assert events(run_dir, "emergency_save") == []  # checkpoint-2 was the regular one
    assert protocol.find_oom(proc.stderr)  # the supervisor's stderr fallback sees it too


def test_cuda_oom_writes_an_emergency_checkpoint_and_resume_does_not_refire(tmp_path):
    proc, run_dir, out = run_child(tmp_path, "cuda_oom@step=3", save_steps=10)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rec = error_record(run_dir)
    assert rec.kind == protocol.FailureKind.CUDA_OOM and rec.step == 2
    assert checkpoints(out) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "trainer_state.json").exists()
    assert (out / "checkpoint-2" / "optimizer.pt").exists()
    [save] = events(run_dir, "emergency_save")
    assert save["step"] == 2 and rec.saved_checkpoint == save["path"]
    # attempt 2 resumes from it; injected.json says the fault already fired
    proc2, _, _ = run_child(tmp_path, "cuda_oom@step=3", save_steps=10, attempt=2,
                            resume_from=str(out / "checkpoint-2"))
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert len(events(run_dir, "fault_injected")) == 1


def test_nan_stops_before_the_update_without_saving(tmp_path):
    proc, run_dir, out = run_child(tmp_path, "nan@step=3", save_steps=2)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rec = error_record(run_dir)
    assert (rec.kind, rec.phase, rec.step) == (protocol.FailureKind.NAN_LOSS, protocol.Phase.OPTIMIZER_STEP, 2)
    assert rec.last_finite_step == 2 and rec.saved_checkpoint is None
    assert checkpoints(out) == ["checkpoint-2"]  # nothing written after the bad step
    after_2, at_exit = torch.load(out / "params-2.pt"), torch.load(out / "params-exit.pt")
    assert after_2.keys() == at_exit.keys()
    assert all(torch.equal(after_2[k], at_exit[k]) for k in after_2)  # step 3's update was skipped
    assert all(torch.isfinite(v).all() for v in at_exit.values())
    [nan] = events(run_dir, "nan_detected")
    assert nan["step"] == 3 and nan["last_finite_step"] == 2
    # the run's journal and heartbeat, as the supervisor reads them
    assert (run_dir / protocol.HEARTBEAT).exists()
    [profile] = events(run_dir, "data_profile")
    assert profile["count"] == 64 and len(profile["quantiles"]) == 101
    assert 4 <= profile["quantiles"][0][1] <= profile["quantiles"][-1][1] == profile["max_len"] <= 24
    memory = events(run_dir, "memory")
    assert [m["step"] for m in memory] == [1, 2] and all(m["host_rss"] > 0 for m in memory)


def test_eval_oom_is_classified_as_eval(tmp_path):
    proc, run_dir, out = run_child(tmp_path, "eval_oom@step=2", save_steps=10, extra=("--eval",))
    assert proc.returncode == 1, proc.stderr[-3000:]
    rec = error_record(run_dir)
    assert (rec.kind, rec.phase, rec.step) == (protocol.FailureKind.EVAL_OOM, protocol.Phase.EVAL, 2)
    assert rec.saved_checkpoint == str(out / "checkpoint-2")  # the weights were a completed step


def test_crash_and_resume_oom(tmp_path):
    proc, run_dir, out = run_child(tmp_path, "crash@step=2;resume_oom", save_steps=1, max_steps=3)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rec = error_record(run_dir)
    assert (rec.kind, rec.phase, rec.step, rec.saved_checkpoint) == (
        protocol.FailureKind.CRASH, protocol.Phase.FORWARD_BACKWARD, 1, None)
    proc2, _, _ = run_child(tmp_path, "crash@step=2;resume_oom", save_steps=1, max_steps=3, attempt=2,
                            resume_from=str(out / "checkpoint-1"))
    assert proc2.returncode == 1, proc2.stderr[-3000:]
    rec2 = error_record(run_dir, attempt=2)
    assert (rec2.kind, rec2.phase, rec2.step) == (protocol.FailureKind.RESUME_OOM, protocol.Phase.CHECKPOINT_LOAD, 1)


def test_step_and_trainer_log_events_per_completed_step(tmp_path):
    proc, run_dir, _ = run_child(tmp_path, "", save_steps=10, max_steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = events(run_dir, protocol.EVENT_STEP)
    assert [(e["step"], e["max_steps"], e["attempt"], e["rank"]) for e in steps] == [(s, 3, 1, 0) for s in (1, 2, 3)]
    assert all(isinstance(e["epoch"], float) for e in steps)
    logs = [e for e in events(run_dir, protocol.EVENT_TRAINER_LOG) if "loss" in e["logs"]]
    assert [e["step"] for e in logs] == [1, 2, 3]  # logging_steps=1
    assert all(isinstance(e["logs"]["learning_rate"], float) for e in logs)
    assert not any(k.startswith("oomguard/") for e in logs for k in e["logs"])
