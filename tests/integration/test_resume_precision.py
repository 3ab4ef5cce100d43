"""The precision rung: an fp16 checkpoint (with scaler.pt) resumes in bf16; bf16 is refused without support."""


import pytest
import torch
from _recipe_run import SMALL, digest, events, recipe, state

from oomguard.guard.resume import PrecisionError, bf16_refusal, check_precision
from oomguard.recipes import default

TRAIN = [*SMALL, "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "4", "--save_steps", "2"]
# What HF's GradScaler.state_dict() holds after fp16 training (torch.amp.GradScaler).
SCALER_STATE = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                "_growth_tracker": 3}


@pytest.fixture(scope="module")
def fp16_checkpoint(tmp_path_factory):
    """checkpoint-2 of a real run, with the scaler.pt an fp16 run writes beside it."""
    cache = tmp_path_factory.mktemp("oomguard-cache")
    default.ensure_default_model(cache)
    out = tmp_path_factory.mktemp("first") / "out"
    recipe(cache, "--output_dir", str(out), *TRAIN, "--no_guard")
    checkpoint = out / "checkpoint-2"
    torch.save(SCALER_STATE, checkpoint / "scaler.pt")
    return cache, checkpoint


@pytest.mark.slow
def test_installed_transformers_crashes_on_scaler_pt_without_the_guard(fp16_checkpoint, tmp_path):
    cache, checkpoint = fp16_checkpoint
    proc = recipe(cache, "--output_dir", str(tmp_path / "out"), *TRAIN, "--precision", "bf16", "--no_guard",
                  resume=checkpoint, check=False)
    assert proc.returncode != 0 and "load_state_dict" in proc.stderr  # DESIGN §7: fp16 -> bf16 crashes


@pytest.mark.slow
def test_fp16_checkpoint_resumes_in_bf16_from_a_copy_without_the_scaler(fp16_checkpoint, tmp_path):
    cache, checkpoint = fp16_checkpoint
    before = digest(checkpoint)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    recipe(cache, "--output_dir", str(out), *TRAIN, run_dir=run_dir, attempt=2, resume=checkpoint,
           knobs={"precision": "bf16"})
    assert state(out / "checkpoint-4")["global_step"] == 4
    [dropped] = events(run_dir, "scaler_dropped")
    assert dropped["checkpoint"] == str(checkpoint)
    assert not (tmp_path / dropped["copy"] / "scaler.pt").exists()
    assert digest(checkpoint) == before and (checkpoint / "scaler.pt").exists()  # original untouched
    assert events(run_dir, "lora_rank_cut") == []  # same rank: no cut


def test_bf16_refusal_names_the_card():
    why = bf16_refusal(True, "Tesla T4", (7, 5))
    assert "Tesla T4" in why and "7.5" in why and "fp16" in why
    assert bf16_refusal(True, "NVIDIA H100 80GB HBM3", (9, 0)) is None
    assert bf16_refusal(False, "Tesla T4", (7, 5)) is None
    assert bf16_refusal(True, None, None) is None  # CPU: bf16 autocast runs there


class _Args:
    bf16, use_cpu = True, False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to ask")
def test_check_precision_on_this_gpu():
    capability = torch.cuda.get_device_capability()
    if capability >= (8, 0):
        check_precision(_Args())
    else:
        with pytest.raises(PrecisionError, match=torch.cuda.get_device_name()):
            check_precision(_Args())
