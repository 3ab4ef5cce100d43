"""Real recoveries on a real GPU, through `python -m oomguard run` and the built-in recipe.

1. A genuine CUDA OOM: a VRAM cap calibrated in the same run (scripts/gpu_probe.py measures
   the recipe's peak at the big and the small shape; the cap sits between them) makes packed
   2048-token rows fail; the max_seq_length rung makes them fit; the run finishes.
2. A genuine divergence: fp16 with a learning rate that overflows; the NaN guard stops the
   child on the step it happens; rollback to the last finite checkpoint; fp16 -> bf16 (and a
   lower LR if needed); the run finishes.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, run_py

POLICY = ROOT / "tests" / "gpu" / "policies" / "gpu-test.yaml"
BIG, SMALL = "16x2048p", "16x256p"


def supervised(run_dir: Path, child: list[str], *opts: str):
    return run_py(["-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir), "--quiet", *opts,
                   "--", "python3", "-m", "oomguard.recipes.sft", *child], timeout=900)


def test_genuine_oom_under_a_vram_cap_recovers(tmp_path, record):
    probe = run_py(["scripts/gpu_probe.py", "--out", str(tmp_path / "probe.json"), BIG, SMALL])
    assert probe.returncode == 0, probe.stderr[-3000:]
    probed = json.loads((tmp_path / "probe.json").read_text())
    big, small = (p for p in probed["probes"])
    # the cap binds the allocator (it frees cached blocks and retries before raising), so
    # calibrate on allocated peaks: the geometric mean sits well between the two shapes
    cap = int((big["peak_allocated"] * small["peak_allocated"]) ** 0.5)
    assert small["peak_allocated"] * 1.2 < cap < big["peak_allocated"] / 1.2, probed
    limit = probed["context"] + cap
    run_dir = tmp_path / "run"
    r = supervised(run_dir, ["--packing", "--max_seq_length", "2048", "--per_device_train_batch_size", "16",
                             "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1"],
                   "--vram-limit", f"{limit}B")  # bytes, said so: a bare number is refused
    assert (run_dir / "run.json").exists(), r.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    record(probe=probed, cap=cap, limit=limit, attempts=run["attempts"], final=run["config"],
           status=run["status"], summary=r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-4000:]
    first = run["attempts"][0]["failure"]
    assert first["kind"] == "cuda_oom" and "injected" not in first["detail"]
    assert run["config"]["max_seq_length"] < 2048
    assert run["config"]["per_device_train_batch_size"] * run["config"]["gradient_accumulation_steps"] == 16
    # issue 12: attempt 1 ran the command as written; every later change showed in the child
    assert run["attempts"][0]["command"] == run["command"]
    assert run["requested_source"] == "observed" and run["requested"]["max_seq_length"] == 2048
    verdicts = {v for a in run["attempts"][1:] for v in a["verified"].values()}
    assert verdicts == {"verified"}, [a["verified"] for a in run["attempts"]]
    state = json.loads(max((run_dir / "checkpoints").glob("checkpoint-*"),
                           key=lambda p: int(p.name.split("-")[1])).joinpath("trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_real_fp16_divergence_rolls_back_and_switches_precision(tmp_path, record):
    run_dir = tmp_path / "run"
    r = supervised(run_dir, ["--precision", "fp16", "--learning_rate", "3000",
                             "--max_seq_length", "256", "--per_device_train_batch_size", "8",
                             "--max_steps", "12", "--save_steps", "1", "--logging_steps", "1"])
    assert (run_dir / "run.json").exists(), r.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    record(attempts=run["attempts"], final=run["config"], status=run["status"], summary=r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-4000:]
    nan = run["attempts"][0]["failure"]
    assert nan["kind"] == "nan_loss"
    resumed = run["attempts"][1]["resumed_from"]
    assert resumed is None or int(resumed.rpartition("-")[2]) <= nan["step"]
    assert run["config"]["precision"] == "bf16"
    # issue 12: each change (precision, and the LR if the ladder got there) is verified in the child,
    # and an LR change is the LR the child's own trainer_state logs after the rollback
    last = run["attempts"][-1]
    assert set(last["verified"].values()) == {"verified"}, [a["verified"] for a in run["attempts"]]
    if "learning_rate" in last["orders"]:
        ckpt = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start = int(last["resumed_from"].rpartition("-")[2]) if last["resumed_from"] else 0
        after = [h["learning_rate"] for h in state["log_history"] if "loss" in h and h["step"] > start]
        assert after and all(abs(lr - last["orders"]["learning_rate"]) <= 1e-9 * 3000 for lr in after), after
