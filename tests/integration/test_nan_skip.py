"""The NaN ladder's child-side parts on a wrapped, unchanged HF Trainer script with one injected
non-finite loss, checked from the child's checkpoints and its own events:

- the policy's ``limits.nan_skip_steps`` reaches the guard (it was read by nothing before): with 1 the
  update is dropped and the attempt trains on (with 0, every other NaN test: the child stops and the ladder
  rolls back — the next test too);
- the nan_loss ladder's ``rewarm_steps``: the rolled-back attempt re-enters warm-up, its optimizer's rate
  on the first step 1/N of the schedule's, and the supervisor verifies that from the child's event.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from _wrap_run import oomguard_run

HERE = Path(__file__).resolve().parent


def _policy(tmp_path: Path, skip: int, rewarm: int = 0) -> Path:
    policy = yaml.safe_load((HERE / "policies" / "wrap_nan.yaml").read_text())
    policy["limits"]["nan_skip_steps"] = skip
    policy["ladders"]["nan_loss"]["rewarm_steps"] = rewarm
    path = tmp_path / f"skip{skip}-rewarm{rewarm}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines()) if e["event"] == name]


def test_one_skipped_update_trains_on_in_the_same_attempt(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    oomguard_run(run_dir, _policy(tmp_path, 1), sys.executable, str(HERE / "_wrap_trainer_script.py"), str(out),
                 "6", inject="nan@step=3")
    run = json.loads((run_dir / "run.json").read_text())
    assert len(run["attempts"]) == 1 and run["status"] == "succeeded"
    assert [(e["step"], e["action"], e["skipped"]) for e in _events(run_dir, "nan_detected")] == [(3, "skip", 1)]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 6 and all(x == x for x in losses[3:])  # finite after the skipped update


def test_the_rolled_back_attempt_re_enters_warm_up_verified_in_the_child(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    oomguard_run(run_dir, _policy(tmp_path, 0, rewarm=2), sys.executable, str(HERE / "_wrap_trainer_script.py"),
                 str(out), "6", inject="nan@step=3")
    run = json.loads((run_dir / "run.json").read_text())
    first, second = run["attempts"]
    assert first["decision"]["rewarm_steps"] == 2 and "re-entering warm-up over 2" in first["decision"]["reason"]
    assert second["rewarm_steps"] == 2 and second["verified"]["rewarm_steps"] == "verified"
    assert [e["action"] for e in _events(run_dir, "nan_detected")] == ["stop"]  # nan_skip_steps 0: no skip
    [rewarm] = _events(run_dir, "rewarm")
    resumed = int(second["resumed_from"].rsplit("-", 1)[1])
    assert rewarm["attempt"] == 2 and rewarm["step"] == resumed + 1
    assert rewarm["lr"][0] == rewarm["scheduled"][0] / 2  # the LR rung's halved schedule, then half of that
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
