"""Sample-exact resume, checked with the ledger: the built-in recipe uninterrupted vs. an OOM that
forces the batch/accumulation rung (per-device batch 2 → 1, accumulation 2 → 4) on resume.

This also checks the installed transformers' own resume behaviour (DESIGN §7/§8: before 5.2 a
new per-device batch was ignored on resume, #43708/#43770): with the effective batch unchanged,
HF's skip of ``global_step × accumulation`` batches must land on the exact next sample.
"""

import pytest
from _recipe_run import events, losses, recipe, state
from safetensors.torch import load_file

from oomguard.guard.resume.ledger import ledger_file, read_ledger, samples_seen

pytestmark = pytest.mark.slow
# fp32 and no dropout: the two runs differ only in how a step's samples are split into micro-batches
TRAIN = ["--max_seq_length", "128", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
         "--precision", "fp32", "--lora_dropout", "0", "--learning_rate", "1e-3", "--max_steps", "6",
         "--save_steps", "2"]


def test_batch_rung_resumes_on_the_exact_next_sample(cache, tmp_path):
    import transformers

    straight_run, straight = tmp_path / "straight-run", tmp_path / "straight"
    recipe(cache, "--output_dir", str(straight), *TRAIN, run_dir=straight_run,
           knobs={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    run_dir, out = tmp_path / "run", tmp_path / "out"
    first = recipe(cache, "--output_dir", str(out), *TRAIN, run_dir=run_dir, inject="cuda_oom@step=4", check=False,
                   knobs={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    assert first.returncode == 1, first.stderr[-3000:]
    [save] = events(run_dir, "emergency_save")
    assert save["step"] == 3
    recipe(cache, "--output_dir", str(out), *TRAIN, run_dir=run_dir, attempt=2, inject="cuda_oom@step=4",
           resume=out / "checkpoint-3", knobs={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4})

    want, got = read_ledger(ledger_file(straight_run)), read_ledger(ledger_file(run_dir))
    assert [e.step for e in want] == [e.step for e in got] == [1, 2, 3, 4, 5, 6]
    assert [e.attempt for e in got] == [1, 1, 1, 2, 2, 2]
    assert all(len(e.samples) == 4 for e in want)
    # step by step, the same rows in the same order (the effective batch is unchanged)
    assert [e.samples for e in got] == [e.samples for e in want], f"transformers {transformers.__version__}"
    assert samples_seen(got) == samples_seen(want) and max(samples_seen(got).values()) == 1
    assert state(out / "checkpoint-6")["global_step"] == 6

    # Losses: steps 4-6 ran on the same samples from the same weights; only the micro-batch split differs.
    lw, lg = losses(straight / "checkpoint-6"), losses(out / "checkpoint-6")
    assert all(lg[k] == pytest.approx(lw[k], rel=1e-4) for k in range(1, 7)), (lg, lw)
    # Weights: summing the same gradients in another order (2x2 vs 1x4 micro-batches) only changes
    # roundings. The tolerance is one bf16 step, 2**-8 of each tensor's norm, so it holds whether the
    # adapter is kept in bf16 (measured 1.6e-3 when it was) or fp32; three fewer steps move it by > 1.
    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        assert float((x - y).norm() / x.norm().clamp_min(1e-12)) <= 2 ** -8, key
