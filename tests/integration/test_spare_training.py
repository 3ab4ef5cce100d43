"""Issue 17: a real wrapped Trainer script with an injected OOM relaunches attempt 2 in the warm spare,
and resumes exactly as a cold start does (``--no-warm-spare``): the same rows per step (the ledger)
and the same losses in the final checkpoint's ``trainer_state.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _env import user_env
from _shared import shared_dir
from _wrap_run import ROOT

from oomguard.guard.resume.ledger import ledger_file, read_ledger
from oomguard.protocol import read_jsonl

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
# cuda_oom: batch 4 -> 2, accumulation 1 -> 2; its knobs say batch 16, which the script (batch 4 hard-coded) never
# gets on attempt 1: test_wrap_commands.py's test_the_scripts_own_values_run_and_the_ladder_starts_there reads the
# warm run below for that (one run, shared: tests/integration/_shared.py)
POLICY = HERE / "policies" / "wrap_adopt.yaml"
STEPS = 6


def shared_train(tmp_path_factory, spare: str) -> tuple[Path, Path]:
    """``oomguard run --policy wrap_adopt.yaml SPARE --inject cuda_oom@step=3 -- python _wrap_trainer_script.py
    OUT 6``, once per test session: ``(run dir, out)``."""
    path = shared_dir(tmp_path_factory, f"spare-training{spare}", lambda path: _train(path, spare))
    return path / f"run{spare}", path / f"out{spare}"


def _train(tmp: Path, spare: str) -> None:
    run_dir, out = tmp / f"run{spare}", tmp / f"out{spare}"
    env = user_env()
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get(
        "PYTHONPATH", "")) if p), "OOMGUARD_STRICT_EVENTS": "1"})
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir), "--quiet",
           spare, "--inject", "cuda_oom@step=3", "--", sys.executable, str(HERE / "_wrap_trainer_script.py"),
           str(out), str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _read(run_dir: Path, out: Path) -> tuple[dict, list[dict], dict]:
    run = json.loads((run_dir / "run.json").read_text())
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return run, list(read_jsonl(run_dir / "events.jsonl")), state


def _writers_of(path: Path) -> list[int]:
    """Live processes whose stderr is ``path``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{proc.pid}/fd/2") == str(path) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def test_attempt_two_runs_warm_and_resumes_exactly_as_a_cold_start(tmp_path_factory):
    (warm_dir, _), (cold_dir, _) = dirs = [shared_train(tmp_path_factory, s) for s in ("--warm-spare", "--no-warm-spare")]
    (warm_run, warm_events, warm_state), (cold_run, cold_events, cold_state) = (_read(*d) for d in dirs)
    for run in (warm_run, cold_run):
        first, second = run["attempts"]
        assert first["failure"]["kind"] == "cuda_oom" and second["failure"] is None
        assert second["resumed_from"].endswith("checkpoint-2")
    started = {e["attempt"]: e for e in warm_events if e["event"] == "child_start"}
    assert started[2]["start"] == "warm", started
    assert warm_run["attempts"][1]["pid"] == started[2]["spare_pid"]
    assert [e for e in cold_events if e["event"] == "child_start"][0]["reason"] == \
        "cold start: the warm spare is off (--no-warm-spare or OOMGUARD_WARM_SPARE=0)"
    assert not any(e["event"] == "child_start" and e["attempt"] == 1 for e in warm_events + cold_events)
    # exact resume: the same rows per step, every step once, the same losses step by step
    warm_ledger, cold_ledger = (read_ledger(ledger_file(d)) for d in (warm_dir, cold_dir))
    assert [e.step for e in warm_ledger] == list(range(1, STEPS + 1))
    assert [e.attempt for e in warm_ledger] == [1, 1] + [2] * (STEPS - 2)
    assert [e.samples for e in warm_ledger] == [e.samples for e in cold_ledger]
    assert warm_state["global_step"] == cold_state["global_step"] == STEPS
    losses = [(h["step"], h["loss"]) for h in warm_state["log_history"] if "loss" in h]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert losses == [(h["step"], h["loss"]) for h in cold_state["log_history"] if "loss" in h]
    # attempt 2 (it trained) got a spare of its own for an attempt 3; the run's end killed it
    log = warm_dir / "spare" / "stderr.log"  # a spare's stderr until it is handed an attempt
    assert log.exists() and _writers_of(log) == []
