"""A scheduler's stop through a real training (issue 20, item 2).

SLURM's ``--signal=USR1@120`` (without ``B:``) and its time-limit SIGTERM reach every process of the
job step, the child included, and may reach the child before the supervisor. Here a wrapped, unchanged
HF Trainer script gets SIGUSR1 itself: the guard saves at the step end, the supervisor ends "requeue me"
(exit 75) with the run interrupted, and the same ``oomguard run --run-dir D`` continues to the end with
every optimizer step done exactly once — checked from the checkpoints' own ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _env import user_env
from _wrap_run import ROOT

HERE = Path(__file__).resolve().parent
POLICY = HERE / "policies" / "wrap_adopt.yaml"
MAX_STEPS = 60


def _env() -> dict[str, str]:
    env = user_env()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"})
    return env


def _oomguard(run_dir: Path, *command: str) -> list[str]:
    return [sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir), "--quiet",
            *(["--", *command] if command else [])]


def _steps(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [e for e in map(json.loads, filter(None, lines)) if e.get("event") == "step"]


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_sigusr1_to_the_child_saves_ends_requeue_and_the_rerun_finishes_every_step_once(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    script = [sys.executable, str(HERE / "_wrap_trainer_script.py"), str(out), str(MAX_STEPS)]
    sup = subprocess.Popen(_oomguard(run_dir, *script), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(e["step"] >= 3 for e in _steps(run_dir)):
        assert sup.poll() is None and time.monotonic() < deadline, sup.stderr.read() if sup.poll() else "no step 3"
        time.sleep(0.05)
    child = json.loads((run_dir / "run.json").read_text())["attempts"][0]["pid"]
    os.kill(child, signal.SIGUSR1)  # as SLURM signals the job step: the child, not the supervisor
    assert sup.wait(timeout=120) == 75, sup.stderr.read()

    run = json.loads((run_dir / "run.json").read_text())
    first = run["attempts"][0]
    assert run["status"] == "interrupted" and first["interrupted"] == "SIGUSR1" and first["failure"] is None
    saved = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
             if e["event"] == "shutdown_saved"]
    assert len(saved) == 1 and saved[0]["reason"] == "received SIGUSR1"
    stop_step = saved[0]["step"]
    assert 3 <= stop_step < MAX_STEPS
    assert _state(out / f"checkpoint-{stop_step}")["global_step"] == stop_step  # the save is the child's own

    rerun = subprocess.run(_oomguard(run_dir), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    second = json.loads((run_dir / "run.json").read_text())["attempts"][1]
    assert second["resumed_from"].endswith(f"checkpoint-{stop_step}")
    final = _state(out / f"checkpoint-{MAX_STEPS}")
    logged = [h["step"] for h in final["log_history"] if "loss" in h]
    assert logged == list(range(1, MAX_STEPS + 1))  # every optimizer step once: none lost, none redone


# --- the sbatch template: SIGUSR1 to the batch shell (--signal=B:USR1@120), requeue, continue -----------
SBATCH = ROOT / "scripts" / "slurm" / "oomguard.sbatch"
FAKE = str(HERE / "fake_child.py")


def _template_env(tmp_path: Path) -> dict[str, str]:
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    scontrol = shims / "scontrol"  # records what the job asked SLURM for
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env = _env()
    env.update({"PATH": os.pathsep.join([str(shims), str(Path(sys.executable).parent), env.get("PATH", "")]),
                "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t", "RUN_DIR": str(tmp_path / "run"),
                "POLICY": str(HERE / "policies" / "fast.yaml")})
    return env


def test_the_sbatch_template_forwards_the_warning_requeues_and_the_requeued_job_finishes(tmp_path):
    env, run_dir = _template_env(tmp_path), tmp_path / "run"
    child = ["--", sys.executable, FAKE, "--max_steps", "40", "--step_s", "0.05", "--save_steps", "100"]
    job = subprocess.Popen(["bash", str(SBATCH), *child], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(e["step"] >= 3 for e in _steps(run_dir)):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() else "no step"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 delivers: the batch shell only
    assert job.wait(timeout=60) == 75, job.stderr.read()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "interrupted" and run["attempts"][0]["interrupted"] == "SIGUSR1"

    requeued = subprocess.run(["bash", str(SBATCH), *child], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)  # SLURM runs the same script again, same job id
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "succeeded" and len(run["attempts"]) == 2
    stopped_at = run["attempts"][0]["max_step"]
    assert run["attempts"][1]["resumed_from"].endswith(f"checkpoint-{stopped_at}")  # the save the warning made
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # not requeued again
