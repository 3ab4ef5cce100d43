"""Flags, then the supervisor's env overrides (OOMGUARD_KNOBS and friends)."""

import json

import pytest

from oomguard import protocol
from oomguard.errors import UsageError
from oomguard.recipes.options import RecipeOptions, resolve_options
from oomguard.recipes.sft import warmup_steps


@pytest.fixture(autouse=True)
def _own_bootstrap_skip(monkeypatch):
    """``main(--no_guard)`` in-process sets OOMGUARD_BOOTSTRAP_SKIP in this process's environment (in a
    recipe process that is the point); here it must not outlive the test, or every later child of this
    pytest worker inherits ``callbacks`` skipped and trains unguarded (it broke test_demo once)."""
    monkeypatch.setenv(protocol.ENV_BOOTSTRAP_SKIP, "")


FLAGS = ["--per_device_train_batch_size", "8", "--lora_r", "32", "--precision", "fp16", "--output_dir", "flags-out"]


def test_flags_use_hf_underscored_names():
    o = resolve_options(FLAGS + ["--no_4bit", "--packing", "--max_grad_norm", "0.5"], environ={})
    assert (o.per_device_train_batch_size, o.lora_r, o.precision) == (8, 32, "fp16")
    assert (o.load_in_4bit, o.packing, o.max_grad_norm) == (False, True, 0.5)


def test_defaults_are_the_classic_qlora_recipe():
    o = resolve_options([], environ={})
    assert (o.max_grad_norm, o.load_in_4bit, o.save_total_limit) == (0.3, True, None)
    assert o.target_modules == "q_proj,k_proj,v_proj,o_proj"


def test_knobs_from_the_supervisor_override_flags():
    env = {protocol.ENV_KNOBS: json.dumps({"per_device_train_batch_size": 2, "gradient_accumulation_steps": "4",
                                           "precision": "bf16", "max_seq_length": 128})}
    o = resolve_options(FLAGS, environ=env)
    assert (o.per_device_train_batch_size, o.gradient_accumulation_steps) == (2, 4)
    assert (o.precision, o.max_seq_length, o.lora_r) == ("bf16", 128, 32)  # lora_r: flag, not overridden


def test_checkpoint_dir_and_resume_from_env():
    env = {protocol.ENV_CHECKPOINT_DIR: "/ckpt", protocol.ENV_RESUME_FROM: "/ckpt/checkpoint-8"}
    o = resolve_options(FLAGS + ["--resume_from_checkpoint", "elsewhere"], environ=env)
    assert (o.output_dir, o.resume_from_checkpoint) == ("/ckpt", "/ckpt/checkpoint-8")


def test_empty_resume_from_means_a_fresh_start():
    o = resolve_options(["--resume_from_checkpoint", "x"], environ={protocol.ENV_RESUME_FROM: ""})
    assert o.resume_from_checkpoint is None


def test_unknown_knob_is_ignored_with_a_message(capsys):
    o = resolve_options([], environ={protocol.ENV_KNOBS: '{"flux_capacitor": 3}'})
    assert o == RecipeOptions(output_dir="oomguard-sft")
    assert "flux_capacitor" in capsys.readouterr().err


def test_output_dir_defaults_into_the_run_dir_under_oomguard_and_a_flag_wins():
    assert resolve_options([], environ={protocol.ENV_RUN_DIR: "/runs/a"}).output_dir == "/runs/a/checkpoints"
    assert resolve_options(["--output_dir", "mine"], environ={protocol.ENV_RUN_DIR: "/runs/a"}).output_dir == "mine"
    assert resolve_options([], environ={}).output_dir == "oomguard-sft"


@pytest.mark.parametrize("raw, match", [("{not json", "not JSON"), ("[1, 2]", "not a JSON object"),
                                        ('{"lora_r": "big"}', "lora_r='big'"),
                                        ('{"precision": "fp8"}', "fp8")])
def test_bad_knobs_say_what_and_how_to_fix(raw, match):
    with pytest.raises(UsageError, match=match):
        resolve_options([], environ={protocol.ENV_KNOBS: raw})


@pytest.mark.parametrize("max_steps, ratio, expected", [(100, 0.03, 3), (24, 0.1, 3), (10, 0.0, 0), (-1, 0.05, 0.05)])
def test_warmup_steps_from_ratio(max_steps, ratio, expected):
    assert warmup_steps(RecipeOptions(max_steps=max_steps, warmup_ratio=ratio)) == expected


def test_main_reports_a_bad_dataset_as_a_usage_error(tmp_path, capsys):
    from oomguard.errors import ExitCode
    from oomguard.recipes.sft import main

    code = main(["--dataset", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o"), "--no_guard"])
    assert code == ExitCode.USAGE
    assert "missing.jsonl" in capsys.readouterr().err


def test_main_refuses_a_model_that_is_not_a_local_folder(tmp_path, capsys):
    from oomguard.errors import ExitCode
    from oomguard.recipes.sft import main

    assert main(["--model", "meta-llama/Llama-3-8B", "--output_dir", str(tmp_path), "--no_guard"]) == ExitCode.USAGE
    assert "not a local directory" in capsys.readouterr().err
