"""Soak: the built-in QLoRA recipe under the real supervisor through 30 injected faults of 6 kinds.

One run of ``python -m oomguard run`` around ``python -m oomguard.recipes.sft`` (the embedded tiny
model), faults at fixed, shuffled steps (each fires once per run). At the end it checks, from the
child's own files, that the run finished at max_steps with every optimizer step logged exactly once
in trainer_state.json, that every failure was classified as the kind injected, and it reports the
supervisor's resident memory at each attempt end (journaled by the supervisor itself).

    python scripts/soak_recipe.py --out soak.json [--max-steps 68] [--hang-timeout 20]

Runs on CPU or CUDA (docs/RELIABILITY.md has the numbers and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from oomguard.protocol import read_jsonl  # noqa: E402

# kind injected -> failure kind the supervisor must record
KINDS = {"cuda_oom": "cuda_oom", "nan": "nan_loss", "inf": "nan_loss", "crash": "crash", "hang": "hang",
         "resume_oom": "resume_oom"}
MIX = ["cuda_oom"] * 5 + ["nan"] * 6 + ["inf"] * 4 + ["crash"] * 8 + ["hang"] * 3 + ["resume_oom"] * 4


def soak_policy(hang_timeout_s: float) -> dict:
    """Room for every fault: an OOM costs a batch halving (5 from 32), a NaN a rollback with the
    same knobs once the LR rung is spent, a crash a retry; budgets large enough for 31 attempts."""
    return {
        "name": "soak", "description": "scripts/soak_recipe.py", "match": None,
        "knobs": {"max_seq_length": 128, "per_device_train_batch_size": 32, "gradient_accumulation_steps": 1,
                  "lora_r": 8, "lora_alpha": 16, "precision": "fp32", "learning_rate": 1e-3},
        "ladders": {"cuda_oom": {"rungs": [{"op": "halve_batch", "floor": 1, "max_times": 5, "resume": "safe"}]},
                    "nan_loss": {"rungs": [{"knob": "learning_rate", "op": "scale", "factor": 0.9, "floor": 1e-5,
                                            "max_times": 2, "resume": "numeric"}]},
                    "hang": {"rungs": []}},
        # crashes can come 3 in a row, resume OOMs too (each resumed attempt fires the next one due)
        "limits": {"max_attempts": 60, "no_progress_attempts": 6, "hang_timeout_s": hang_timeout_s,
                   "startup_timeout_s": 300, "crash_retries": 8, "resume_oom_retries": 4,
                   "backoff": {"initial_s": 0, "multiplier": 1, "max_s": 0}, "gpu_release_timeout_s": 30},
    }


def plan(max_steps: int, seed: int = 0) -> list[tuple[str, int]]:
    """(kind, step) for each fault: distinct steps spread over the run, in a shuffled order. A
    resume_oom fires at the first resume past its step, so each lies in the first two thirds (a
    later fault makes the resume that fires it; one planned at the end never fired in run 1)."""
    rng = random.Random(seed)
    others = [k for k in MIX if k != "resume_oom"]
    rng.shuffle(others)
    kinds = list(others)
    for _ in range(MIX.count("resume_oom")):
        kinds.insert(rng.randrange(0, 2 * len(MIX) // 3), "resume_oom")
    steps = sorted(random.Random(seed + 1).sample(range(3, max_steps - 1), len(kinds)))
    return list(zip(kinds, steps))


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="oomguard-soak-"))
    policy = work / "soak.yaml"
    policy.write_text(yaml.safe_dump(soak_policy(args.hang_timeout)))
    faults = plan(args.max_steps)
    inject = ";".join(f"{k}@step={s}" for k, s in faults)
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet",
           "--inject", inject, "--", sys.executable, "-m", "oomguard.recipes.sft", "--max_steps", str(args.max_steps),
           "--save_steps", "2", "--logging_steps", "1", "--max_seq_length", "128", "--lora_dropout", "0"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    wall = time.monotonic() - t0
    return analyse(run_dir, faults, proc, wall, cmd)


def analyse(run_dir: Path, faults, proc, wall: float, cmd: list[str]) -> dict:
    record = json.loads((run_dir / "run.json").read_text())
    events = list(read_jsonl(run_dir / "events.jsonl"))
    kinds = [a["failure"]["kind"] for a in record["attempts"] if a.get("failure")]
    fired = [e for e in events if e.get("event") == "fault_injected"]
    rss = [e["supervisor"]["rss"] for e in events if e.get("event") == "attempt_ended" and e.get("supervisor")]
    final = max(Path(record["checkpoint_dir"]).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((final / "trainer_state.json").read_text())
    logged = [h["step"] for h in state["log_history"] if "loss" in h]
    return {
        "command": cmd, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "exit_code": proc.returncode,
        "status": record["status"], "attempts": len(record["attempts"]), "wall_s": round(wall, 1),
        "faults_planned": len(faults), "faults_fired": len(fired),
        "failures_recorded": dict(sorted({k: kinds.count(k) for k in set(kinds)}.items())),
        "failures_expected": dict(sorted({v: [KINDS[k] for k, _ in faults].count(v)
                                          for v in set(KINDS.values())}.items())),
        "global_step": state["global_step"], "steps_logged_once": logged == list(range(1, state["global_step"] + 1)),
        "supervisor_rss_mib": {"first": round(rss[0] / 2**20, 1), "peak": round(max(rss) / 2**20, 1),
                               "last": round(rss[-1] / 2**20, 1)} if rss else None,
        "final_knobs": record["config"], "stderr_tail": proc.stderr[-3000:],
        "device": _device(),
    }


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-steps", type=int, default=68)
    ap.add_argument("--hang-timeout", type=float, default=20.0, help="s without a heartbeat that count as a hang")
    args = ap.parse_args()
    result = run(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("stderr_tail", "command")}, indent=2))
    ok = result["status"] == "succeeded" and result["steps_logged_once"] \
        and result["failures_recorded"] == result["failures_expected"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
