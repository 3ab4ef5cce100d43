"""Helpers for the resume tests: run the built-in recipe as the supervisor would, read what it wrote."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from _env import user_env

from oomguard import protocol
from oomguard.recipes import default

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
         "--max_seq_length", "128", "--logging_steps", "1"]


def recipe(cache: Path, *args: str, run_dir: Path | None = None, attempt: int = 1, resume: Path | None = None,
           knobs: dict | None = None, inject: str = "", check: bool = True,
           timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m oomguard.recipes.sft ARGS`` with the OOMGUARD_* env of attempt ``attempt``."""
    env = user_env()
    env.update({default.ENV_CACHE: str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                "CUDA_VISIBLE_DEVICES": ""})
    if run_dir is not None:
        error = run_dir / protocol.ATTEMPTS_DIR / f"{attempt:03d}" / protocol.ERROR_JSON
        env.update({protocol.ENV_RUN_DIR: str(run_dir), protocol.ENV_ATTEMPT: str(attempt),
                    protocol.ENV_ERROR_FILE: str(error), protocol.ENV_INJECT: inject,
                    protocol.ENV_KNOBS: json.dumps(knobs or {}), protocol.ENV_RESUME_FROM: str(resume or "")})
    elif resume is not None:
        env[protocol.ENV_RESUME_FROM] = str(resume)
    proc = subprocess.run([sys.executable, "-m", "oomguard.recipes.sft", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def losses(checkpoint: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in state(checkpoint)["log_history"] if "loss" in e}


def events(run_dir: Path, name: str) -> list[dict]:
    return [e for e in protocol.read_jsonl(run_dir / protocol.EVENTS_JSONL) if e.get("event") == name]


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``: proof that a checkpoint was left untouched."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
