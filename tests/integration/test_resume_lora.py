"""The lora_r rung with the real recipe: the adapter is cut by SVD and training resumes at the same step."""

import json
import shutil

import pytest
from _recipe_run import SMALL, digest, events, losses, recipe, state
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
# lr 1e-2 so three steps move the adapter enough that losing it would show in the loss
TRAIN = [*SMALL, "--lora_alpha", "16", "--learning_rate", "1e-2", "--max_steps", "6", "--save_steps", "3"]


def test_rank_cut_resumes_at_the_same_step_and_keeps_what_was_learned(cache, tmp_path):
    straight = tmp_path / "straight"
    recipe(cache, "--output_dir", str(straight), *TRAIN, "--lora_r", "8", "--no_guard")
    source = tmp_path / "kept" / "checkpoint-3"
    shutil.copytree(straight / "checkpoint-3", source)
    before = digest(source)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    recipe(cache, "--output_dir", str(out), *TRAIN, "--lora_r", "8", run_dir=run_dir, attempt=2,
           resume=source, knobs={"lora_r": 2})

    assert digest(source) == before  # the original checkpoint is never modified
    [cut] = events(run_dir, "lora_rank_cut")
    assert cut["lora_r"] == [8, 2] and cut["lora_alpha"] == [16.0, 16.0]
    pairs = len(load_file(str(source / "adapter_model.safetensors"))) // 2
    assert len(cut["per_layer"]) == pairs and all(0.0 <= e < 1.0 for e in cut["per_layer"].values())
    assert min(cut["per_layer"].values()) <= cut["total_relative_error"] <= max(cut["per_layer"].values())
    assert cut["optimizer"]["reset"] == 2 * pairs and cut["optimizer"]["kept"] == 0

    # resumed at global step 3: steps 4-6 ran, on a rank-2 adapter
    final = out / "checkpoint-6"
    assert state(final)["global_step"] == 6
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 2
    got, want = losses(final), losses(straight / "checkpoint-6")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the log history carried over from the checkpoint
    # Step 4 is the first loss on the cut weights, on the same batch as the uninterrupted step 4.
    # Margin: the cut may cost at most a quarter of what steps 1-3 gained (loss step 1 -> step 4);
    # dropping the adapter or a wrong alpha/r' scaling gives back most or all of that gain.
    gained = want[1] - want[4]
    assert gained > 0.1, f"training gained too little ({gained:.3f}) for the margin to mean anything"
    assert abs(got[4] - want[4]) <= 0.25 * gained, (got, want)
