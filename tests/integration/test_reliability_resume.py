"""Resume reliability (defects 3, 4, 8, 9, 10): the real supervisor (`python -m oomguard run`) with the
stdlib fake child (tests/integration/fake_child.py). Each test ends in a finished run or a documented
stop, and loses no checkpoint: a checkpoint that is skipped or fails to load is moved aside, never
deleted; another run's checkpoints stay exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _env import user_env

from oomguard.protocol import read_jsonl

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_child.py")
POLICY = HERE / "policies" / "fast.yaml"
ROOT = HERE.parents[1]
ENV = {**user_env(), "PYTHONPATH": str(ROOT)}


def oomguard(run_dir: Path, *child: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir), "--quiet"]
    cmd += ["--", sys.executable, FAKE, *child] if child else []
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == name]


def log(run_dir: Path, n: int, name: str = "stdout.log") -> str:
    return (run_dir / "attempts" / f"{n:03d}" / name).read_text()


def old_checkpoint(out: Path, step: int) -> Path:
    """A checkpoint another (earlier) run left in ``out``: HF-shaped, its files an hour old."""
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (ck / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    (ck / "optimizer.pt").write_bytes(b"opt")
    (ck / "scheduler.pt").write_bytes(b"sch")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    hour_ago = time.time() - 3600
    for f in ck.iterdir():
        os.utime(f, (hour_ago, hour_ago))
    return ck


def digest(directory: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in directory.iterdir()}


# --- defect 3: another run's newer checkpoint is never resumed from ----------------------------
def test_another_runs_newer_checkpoint_is_reported_left_alone_and_not_resumed_from(tmp_path):
    rd, out = tmp_path / "run", tmp_path / "out"
    foreign = old_checkpoint(out, 50)
    before = digest(foreign)
    r = oomguard(rd, "--output_dir", str(out), "--mode", "crash_once", "--fail_at", "5", "--max_steps", "8")
    assert r.returncode == 0, r.stderr
    run = run_json(rd)
    assert run["attempts"][1]["resumed_from"] == str(out / "checkpoint-4")  # its own newest, not checkpoint-50
    assert "start=4" in log(rd, 2) and run["attempts"][1]["max_step"] == 8  # steps 5-8 really trained
    reported = events(rd, "checkpoint_foreign")
    assert [e["path"] for e in reported] == [str(foreign)]  # reported once, though scanned at every decision
    assert "another run's checkpoint" in reported[0]["why"] and "--resume_from_checkpoint" in reported[0]["why"]
    assert digest(foreign) == before  # untouched: not moved, not rewritten


# --- defect 4: the command's own --resume_from_checkpoint stands on attempt 1 ------------------
def test_the_commands_own_resume_from_checkpoint_stands_on_attempt_1_and_is_resumable(tmp_path):
    rd, out = tmp_path / "run", tmp_path / "out"
    mine = old_checkpoint(out, 4)  # the user's own, from yesterday: older than this run, but named
    r = oomguard(rd, "--output_dir", str(out), "--resume_from_checkpoint", str(mine),
                 "--mode", "crash_once", "--fail_at", "5", "--max_steps", "8")
    assert r.returncode == 0, r.stderr
    assert "start=4" in log(rd, 1)  # attempt 1 resumed where the user said, no OOMGUARD_RESUME_FROM
    first, second = run_json(rd)["attempts"]
    assert first["resumed_from"] is None and first["command"][-2:] == ["--max_steps", "8"]  # as written
    assert second["resumed_from"] == str(mine) and "start=4" in log(rd, 2)  # named by the user: usable
    assert not events(rd, "checkpoint_foreign")


# --- defect 8: damage inside a zip member, and damage no scan can see ---------------------------
def test_optimizer_zip_damaged_inside_is_skipped_kept_and_the_previous_one_used(tmp_path):
    rd, out = tmp_path / "run", tmp_path / "out"
    r = oomguard(rd, "--output_dir", str(out), "--opt_zip", "--corrupt_newest_member",
                 "--mode", "crash_once", "--fail_at", "5", "--max_steps", "6")
    assert r.returncode == 0, r.stderr
    run = run_json(rd)
    assert run["attempts"][1]["resumed_from"] == str(out / "checkpoint-2")
    skipped = events(rd, "checkpoint_skipped")
    assert skipped and skipped[0]["step"] == 4 and "corrupt inside" in " ".join(skipped[0]["problems"])
    moved = events(rd, "checkpoint_moved_aside")
    assert moved and Path(moved[0]["moved_to"]).is_dir()  # kept, out of a resume's reach


def test_a_checkpoint_that_fails_to_load_is_moved_aside_and_the_older_one_resumed(tmp_path):
    rd, out = tmp_path / "run", tmp_path / "out"
    r = oomguard(rd, "--output_dir", str(out), "--opt_zip", "--unloadable_at", "4",
                 "--mode", "crash_once", "--fail_at", "5", "--max_steps", "6")
    assert r.returncode == 0, r.stderr  # before: the load crashed twice, exit 5 "fix the script"
    run = run_json(rd)
    assert [a["resumed_from"] for a in run["attempts"]] == [None, str(out / "checkpoint-4"), str(out / "checkpoint-2")]
    failure = run["attempts"][1]["failure"]
    assert (failure["kind"], failure["phase"]) == ("crash", "checkpoint_load")
    assert "checkpoint-4 failed to load" in run["attempts"][1]["decision"]["reason"]
    moved = [e for e in events(rd, "checkpoint_moved_aside") if "unloadable" in str(e.get("moved_to"))]
    assert len(moved) == 1 and moved[0]["step"] == 4
    assert (Path(moved[0]["moved_to"]) / "optimizer.pt").is_file()  # never deleted
    assert "start=2" in log(rd, 3)


# --- defect 9: a caught OOM line does not make a ValueError an OOM -----------------------------
def test_a_caught_oom_line_before_the_real_traceback_ends_as_fix_the_script(tmp_path):
    rd = tmp_path / "run"
    r = oomguard(rd, "--mode", "caught_oom_crash", "--fail_at", "3", "--max_steps", "6")
    assert r.returncode == 5, r.stderr  # not 3 ("use a GPU with more memory")
    run = run_json(rd)
    assert {a["failure"]["kind"] for a in run["attempts"]} == {"crash"}
    assert "ValueError: a bug in the script" in run["root_cause"]
    assert run["config"]["per_device_train_batch_size"] == 8  # no OOM rung was taken


# --- defect 10: the supervisor dies after its child failed, before it decided -----------------
@pytest.mark.parametrize("style", ["record", "stderr"])  # the evidence: error.json, or the stderr log alone
def test_a_failure_the_dead_supervisor_never_decided_on_is_decided_by_the_continuation(tmp_path, style):
    rd = tmp_path / "run"
    first = oomguard(rd, "--oom_over", "1024", "--oom_style", style, "--fail_at", "3", "--max_steps", "6",
                     "--kill_supervisor_at_fail")
    assert first.returncode == -9, first.stderr  # SIGKILLed by its child, right after the failure
    assert run_json(rd)["attempts"][0]["ended"] is None  # what a dead supervisor leaves
    r = oomguard(rd)  # `oomguard run --run-dir D` continues
    assert r.returncode == 0, r.stderr
    attempts = run_json(rd)["attempts"]
    assert attempts[0]["failure"]["kind"] == "cuda_oom" and attempts[0]["interrupted"] is None
    assert attempts[0]["decision"]["action"] == "retry"
    # the OOM rung the dead supervisor would have taken: batch 8 -> 4, not the same knobs again
    assert attempts[1]["knobs"]["per_device_train_batch_size"] == 4
    assert attempts[1]["orders"] == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}
    assert "batch=4 accum=2" in log(rd, 2)  # the effective batch kept
    assert attempts[1]["resumed_from"].endswith("checkpoint-2")
    abandoned = events(rd, "attempt_abandoned")
    assert abandoned[0]["failure"]["kind"] == "cuda_oom"
