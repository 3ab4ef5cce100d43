"""Grow back after a degrade (issue 18 item 5), end to end under the real supervisor.

- with the scripted fake child (tests/integration/fake_child.py, the guard's event vocabulary): batch 8 runs out
  of memory at step 3, the halve_batch rung resumes at 4 x 2, the child's journaled step peaks (batch x 100 MiB)
  stay under half the 1 GiB cap, so the supervisor asks it to save and stop, and the next attempt resumes from that
  checkpoint at 8 x 1; a second OOM at batch 8 sends the run back down for good;
- with a real, unchanged HF Trainer script on CPU (_wrap_trainer_script.py): batch 4 OOMs at step 3 (injected), the
  run resumes at 2 x 2, grows back to 4 x 1 and finishes; checked from the child's own files (trainer_state.json,
  training_args.bin, the ledger). On CPU there are no CUDA memory figures: the step peak is fabricated by the fault
  layer (OOMGUARD_FAKE_MEMORY, base + bytes per token of the step's largest real micro-batch), said as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from _env import user_env

from oomguard.guard.resume.ledger import ledger_file, read_ledger
from oomguard.protocol import read_jsonl
from oomguard.report.summary import render_text, summarize

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FAKE = str(HERE / "fake_child.py")
MIB = 2**20
GROW = {"after_steps": 3, "below_fraction": 0.5, "max_times": 2}


def _policy(tmp: Path, base: Path, **grow) -> Path:
    data = yaml.safe_load(base.read_text())
    data.setdefault("limits", {})["grow_back"] = {**GROW, **grow}
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _oomguard(run_dir: Path, policy: Path, *command: str, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = user_env()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    clean.update({"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                  "OOMGUARD_STRICT_EVENTS": "1", **(env or {})})
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet",
           *extra, "--", *command]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=clean)
    assert proc.returncode == 0, f"oomguard run failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n" + \
        "".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("attempts/*/stderr.log")))
    return proc


def _events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == name]


def _batch(knobs: dict) -> tuple[int, int]:
    return knobs["per_device_train_batch_size"], knobs["gradient_accumulation_steps"]


FAKE_ARGS = ("--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--oom_over", "2048",
             "--fail_at", "3", "--max_steps", "30", "--save_steps", "2", "--step_s", "0.05",
             "--memory_per_row", str(100 * MIB))


def test_a_halved_batch_grows_back_at_a_checkpoint_when_memory_stays_low(tmp_path):
    run_dir = tmp_path / "run"
    proc = _oomguard(run_dir, _policy(tmp_path, HERE / "policies" / "fast.yaml"), sys.executable, FAKE, *FAKE_ARGS,
                     extra=("--vram-limit", "1GiB"))
    record = json.loads((run_dir / "run.json").read_text())
    first, second, third = record["attempts"]
    assert record["status"] == "succeeded" and [a["failure"] and a["failure"]["kind"] for a in record["attempts"]] \
        == ["cuda_oom", None, None]
    assert [_batch(a["knobs"]) for a in (first, second, third)] == [(8, 1), (4, 2), (8, 1)]
    [asked] = _events(run_dir, "grow_back_requested")
    [stopped] = _events(run_dir, "grow_stopped")
    assert asked["attempt"] == stopped["attempt"] == 2 and asked["steps_below"] >= 3 and asked["cap"] == 1024 * MIB
    assert asked["peak"] == 400 * MIB and stopped["step"] >= asked["step"]
    # the grow decision is the stopped attempt's, and the next attempt resumes from the checkpoint it saved
    decision = second["decision"]
    assert decision["reason"].startswith("grow back: batch 4 → 8 (accumulation 2 → 1) after ")
    assert decision["effective_batch"] == [8, 8] and decision["resume_class"] == "safe"
    assert Path(decision["resume_from"]).name == Path(stopped["path"]).name == f"checkpoint-{stopped['step']}"
    assert third["resumed_from"] == decision["resume_from"] and third["rung"] is None and third["max_step"] == 30
    # Trust rule 3: the grown batch is verified in the child before it is said
    assert third["verified"] == {"per_device_train_batch_size": "verified", "gradient_accumulation_steps": "verified"}
    [grew] = _events(run_dir, "grow_back")
    assert grew["attempt"] == 3 and grew["verified"] is True and grew["why"] is None
    assert f"grew back: batch 4 → 8 (accumulation 2 → 1) after {asked['steps_below']} steps below 50 % of the cap" \
        in proc.stderr
    assert not (run_dir / "grow_request.json").exists()
    assert {e["effective_batch"] for e in _events(run_dir, "attempt_started")} == {8}


def test_a_batch_that_ran_out_of_memory_twice_is_never_grown_back_into(tmp_path):
    run_dir = tmp_path / "run"
    _oomguard(run_dir, _policy(tmp_path, HERE / "policies" / "fast.yaml"), sys.executable, FAKE, *FAKE_ARGS,
              "--fail_also_at", "20", extra=("--vram-limit", "1GiB"))
    record = json.loads((run_dir / "run.json").read_text())
    kinds = [a["failure"] and a["failure"]["kind"] for a in record["attempts"]]
    assert kinds == ["cuda_oom", None, "cuda_oom", None], kinds
    assert [_batch(a["knobs"]) for a in record["attempts"]] == [(8, 1), (4, 2), (8, 1), (4, 2)]
    assert len(_events(run_dir, "grow_back_requested")) == 1  # attempt 4 stays at 4 x 2 to the end
    assert record["attempts"][-1]["max_step"] == 30 and _batch(record["config"]) == (4, 2)


# --- a real HF Trainer on CPU ------------------------------------------------------------------------------------
# 64 rows of 16 tokens, effective batch 4: 16 steps an epoch. The tiny model trains ~90 steps/s on CPU and the
# supervisor polls every 0.2 s: 8 epochs leave the grow-back request ~100 steps to land before the end
STEPS = 128
CAP = 64 * MIB
# fabricated step peak: 0.25 MiB a token of the largest micro-batch; batch 2 x 16 tokens = 8 MiB (1/8 of the cap),
# batch 4 x 16 tokens = 16 MiB (1/4): under half the cap either way, but only a halved batch has a degrade to undo
FAKE_MEMORY = f"per_token={MIB // 4}"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grow")
    policy = _policy(tmp, HERE / "policies" / "wrap.yaml")
    run_dir, out = tmp / "run", tmp / "out"
    proc = _oomguard(run_dir, policy, sys.executable, str(HERE / "_wrap_trainer_script.py"), str(out), str(STEPS),
                     extra=("--inject", "cuda_oom@step=3", "--vram-limit", "64MiB"),
                     env={"OOMGUARD_FAKE_MEMORY": FAKE_MEMORY}, timeout=300)
    return run_dir, out, proc


@pytest.mark.slow
def test_a_real_trainer_grows_back_and_finishes_with_every_row_once(real):
    run_dir, out, proc = real
    record = json.loads((run_dir / "run.json").read_text())
    first, second, third = record["attempts"]
    assert [_batch(a["knobs"]) for a in (first, second, third)] == [(4, 1), (2, 2), (4, 1)]
    assert first["failure"]["kind"] == "cuda_oom" and second["failure"] is None and third["failure"] is None
    [stopped] = _events(run_dir, "grow_stopped")
    assert stopped["attempt"] == 2 and Path(third["resumed_from"]).name == f"checkpoint-{stopped['step']}"
    assert _events(run_dir, "grow_back")[0]["verified"] is True and "grew back: batch 2 → 4" in proc.stderr
    # the child's own files: the last attempt trained 4 x 1, every step logged once
    args = torch.load(out / f"checkpoint-{STEPS}" / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 1)
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == STEPS and logged == list(range(1, STEPS + 1))
    # the ledger: each step once, 4 rows each; every epoch (16 steps) holds every row exactly once
    steps = read_ledger(ledger_file(run_dir))
    assert [s.step for s in steps] == list(range(1, STEPS + 1)) and all(len(s.samples) == 4 for s in steps)
    for epoch in range(STEPS // 16):
        assert Counter(r for s in steps[16 * epoch:16 * epoch + 16] for r in s.samples) == Counter(range(64)), epoch
    # the fabricated signal is announced as such (never a measurement)
    assert {e["fault"] for e in _events(run_dir, "fault_injected")} >= {"fake_memory", "cuda_oom"}
    # the morning summary lists the grow-back with the child's verdict
    summary = render_text(summarize(run_dir))
    [line] = [line for line in summary.splitlines() if "grew back after attempt 2: batch 2 → 4" in line]
    assert line.endswith("(in force in the child)"), line
