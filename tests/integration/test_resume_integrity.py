"""Supervised recipe runs: a truncated newest checkpoint is skipped; an OOM during checkpoint load
is ``resume_oom``, retried with the same knobs and the optimizer state loaded to CPU first."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _env import user_env
from _recipe_run import ROOT, digest, events, state

from oomguard.recipes import default

pytestmark = pytest.mark.slow
DEMO_POLICY = ROOT / "oomguard" / "policies" / "demo.yaml"


def supervise(cache: Path, run_dir: Path, out: Path, *, inject: str, max_steps: int,
              policy: Path = DEMO_POLICY) -> subprocess.CompletedProcess:
    env = user_env()
    env.update({default.ENV_CACHE: str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                "CUDA_VISIBLE_DEVICES": ""})
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet",
           "--inject", inject, "--", sys.executable, "-m", "oomguard.recipes.sft", "--output_dir", str(out),
           "--max_steps", str(max_steps), "--save_steps", "2", "--logging_steps", "1"]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_oom_while_loading_a_checkpoint_is_resume_oom_and_keeps_the_knobs(cache, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    r = supervise(cache, run_dir, out, inject="cuda_oom@step=3;resume_oom", max_steps=4)
    assert r.returncode == 0, r.stderr[-4000:]
    attempts = run_json(run_dir)["attempts"]
    kinds = [a["failure"]["kind"] if a["failure"] else None for a in attempts]
    assert kinds == ["cuda_oom", "resume_oom", None]
    assert attempts[1]["failure"]["phase"] == "checkpoint_load"
    assert attempts[2]["knobs"] == attempts[1]["knobs"]  # the ladder is not spent on a load spike
    assert attempts[2]["rung"] is None and attempts[2]["resumed_from"] == attempts[1]["resumed_from"]
    [cpu_first] = events(run_dir, "resume_cpu_first")
    assert cpu_first["checkpoint"] == attempts[2]["resumed_from"]
    assert state(out / "checkpoint-4")["global_step"] == 4


def test_truncated_newest_checkpoint_is_skipped_and_named(cache, tmp_path):
    policy = tmp_path / "no-crash-retry.yaml"
    data = yaml.safe_load(DEMO_POLICY.read_text())
    data["limits"]["crash_retries"] = 0  # the first crash ends the run: the test damages a checkpoint, then continues
    policy.write_text(yaml.safe_dump(data))
    run_dir, out = tmp_path / "run", tmp_path / "out"
    first = supervise(cache, run_dir, out, inject="crash@step=5", max_steps=6, policy=policy)
    assert first.returncode == 5, first.stderr[-4000:]
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a kill in the middle of the save
    (out / "checkpoint-4" / "stale.bin").write_bytes(b"from a save the resumed run does not repeat")
    damaged = digest(out / "checkpoint-4")

    second = supervise(cache, run_dir, out, inject="crash@step=5", max_steps=6, policy=policy)
    assert second.returncode == 0, second.stderr[-4000:]
    attempts = run_json(run_dir)["attempts"]
    assert attempts[-1]["resumed_from"] == str(out / "checkpoint-2")
    skipped = [e for e in events(run_dir, "checkpoint_skipped") if e["path"] == str(out / "checkpoint-4")]
    assert skipped and "adapter_model.safetensors is truncated" in skipped[0]["problems"][0]
    assert state(out / "checkpoint-6")["global_step"] == 6
    # moved aside before the relaunch, never deleted: the resumed run's checkpoint-4 holds no stale file
    [moved] = [e for e in events(run_dir, "checkpoint_moved_aside") if e["path"] == str(out / "checkpoint-4")]
    aside = out / "quarantine" / "checkpoint-4.incomplete-1"
    assert moved["moved_to"] == str(aside) and digest(aside) == damaged
    assert state(out / "checkpoint-4")["global_step"] == 4 and not (out / "checkpoint-4" / "stale.bin").exists()
