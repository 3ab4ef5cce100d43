"""The QLoRA SFT recipe, for real, on CPU with the embedded tiny model.

Each run is a subprocess of ``python -m oomguard.recipes.sft`` (as the supervisor
starts it); a shared cache dir builds the default model once per module.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _env import user_env

from oomguard import protocol
from oomguard.recipes import default

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
         "--max_seq_length", "128", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8"]


def run_recipe(cache, *args, env=None, timeout=240):
    full_env = user_env()
    full_env.update({default.ENV_CACHE: str(cache), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                    **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "oomguard.recipes.sft", *args], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def state(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())


def losses(checkpoint):
    return {e["step"]: e["loss"] for e in state(checkpoint)["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_recipe(cache, "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2", *SMALL)
    return out, proc


def test_trains_to_max_steps_and_writes_checkpoints(trained):
    out, proc = trained
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in out.glob("checkpoint-*"):
        for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                     "trainer_state.json"):
            assert (ckpt / name).is_file(), f"{ckpt.name} lacks {name}"
    assert state(out / "checkpoint-4")["global_step"] == 4
    assert sorted(losses(out / "checkpoint-4")) == [1, 2, 3, 4]
    assert (out / "adapter_model.safetensors").is_file()  # the final adapter
    banner = [line for line in proc.stdout.splitlines() if line.startswith("oomguard sft: model=")]
    assert len(banner) == 1 and "4bit=yes" in banner[0] and "device=cpu" in banner[0]
    assert "no CUDA:" in proc.stdout


def test_knobs_from_env_override_flags(cache, tmp_path):
    knobs = {"lora_r": 2, "lora_alpha": 6, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 3,
             "max_seq_length": 64, "learning_rate": 1e-3, "max_grad_norm": 0.7}
    env = {protocol.ENV_KNOBS: json.dumps(knobs), protocol.ENV_CHECKPOINT_DIR: str(tmp_path / "ckpts")}
    run_recipe(cache, "--output_dir", str(tmp_path / "ignored"), "--max_steps", "2", "--save_steps", "2",
               "--no_guard", *SMALL, env=env)
    assert not (tmp_path / "ignored").exists()
    ckpt = tmp_path / "ckpts" / "checkpoint-2"
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (2, 6)
    import torch

    args = torch.load(ckpt / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_length) == (1, 3, 64)
    assert (args.learning_rate, args.max_grad_norm, args.auto_find_batch_size) == (1e-3, 0.7, False)


def test_resume_continues_on_the_same_samples(cache, trained, tmp_path):
    first, _ = trained
    shutil.copytree(first / "checkpoint-2", tmp_path / "checkpoint-2")
    env = {protocol.ENV_RESUME_FROM: str(tmp_path / "checkpoint-2")}
    proc = run_recipe(cache, "--output_dir", str(tmp_path), "--max_steps", "4", "--save_steps", "2", *SMALL, env=env)
    resumed = tmp_path / "checkpoint-4"
    assert state(resumed)["global_step"] == 4
    assert "resume=" + str(tmp_path / "checkpoint-2") in proc.stdout
    # same samples and same weights at step 2: steps 3-4 reproduce the uninterrupted run
    expected, got = losses(first / "checkpoint-4"), losses(resumed)
    assert got[3] == pytest.approx(expected[3], rel=1e-4) and got[4] == pytest.approx(expected[4], rel=1e-4)
