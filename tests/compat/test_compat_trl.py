"""Compatibility matrix: the real ``trl sft`` CLI (LoRA via ``--use_peft``, the embedded tiny model, the
shipped chat dataset) under ``oomguard run`` through an injected OOM and then an injected NaN, on the stack
of the venv running this test (``_compat_checks`` says what is run and checked). The batch and the
learning rate are flags here, so they are edited in place; accumulation goes in-process."""

from __future__ import annotations

import json

import pytest
from _compat_checks import BATCH, LR, SAVE, STEPS, check_recovered, torch_load, wrapped
from _wrap_run import BIN

pytestmark = pytest.mark.slow


def test_trl_sft_recovers_from_an_oom_then_a_nan_with_exact_resume(tmp_path, model_dir, data_dir):
    out = tmp_path / "out"
    command = [str(BIN / "trl"), "sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
               "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--output_dir", str(out),
               "--max_steps", str(STEPS), "--save_steps", str(SAVE), "--per_device_train_batch_size", str(BATCH),
               "--max_length", "64", "--use_cpu", "--report_to", "none", "--logging_steps", "1",
               "--learning_rate", str(LR), "--dataloader_num_workers", "0"]
    child = wrapped(tmp_path, command, out)
    check_recovered(child)

    def flag(attempt: int, name: str) -> str:
        argv = child.run["attempts"][attempt]["command"]
        return argv[argv.index(name) + 1]

    assert [flag(a, "--per_device_train_batch_size") for a in (0, 1, 2)] == ["4", "2", "2"]
    assert [flag(a, "--learning_rate") for a in (0, 1, 2)] == [str(LR), str(LR), "0.0005"]
    assert torch_load(out / "training_args.bin").learning_rate == pytest.approx(LR / 2)
    adapter = json.loads((out / "adapter_config.json").read_text())  # trl's own final save
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
