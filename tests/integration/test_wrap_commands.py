"""Unchanged training commands under ``oomguard run``: the real TRL CLI, ``accelerate launch`` of a
plain ``transformers.Trainer`` script, and a plain ``SFTTrainer`` + ``LoraConfig`` script.

Each gets a ``cuda_oom`` injected at step 3 (after checkpoint-2), resumes, and must end with the
degraded knob in the child's *own* saved arguments (``training_args.bin``, ``adapter_config.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _wrap_run import BIN, oomguard_run
from oomguard.protocol import read_jsonl

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
POLICY = HERE / "policies" / "wrap.yaml"  # cuda_oom: batch 4 -> 2, accumulation 1 -> 2
LORA_POLICY = HERE / "policies" / "wrap_lora.yaml"  # cuda_oom: lora_r 8 -> 4


def recovered(run_dir: Path) -> tuple[dict, list[dict]]:
    """run.json and events after one injected OOM and one resumed, successful attempt."""
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "succeeded"
    first, second = run["attempts"]
    assert first["failure"]["kind"] == "cuda_oom" and first["failure"]["step"] == 2
    assert second["failure"] is None and second["resumed_from"].endswith("checkpoint-2")
    return run, list(read_jsonl(run_dir / "events.jsonl"))


def of(events: list[dict], name: str, attempt: int | None = None) -> list[dict]:
    return [e for e in events if e["event"] == name and (attempt is None or e.get("attempt") == attempt)]


def saved_args(path: Path):
    import torch

    return torch.load(path, weights_only=False)


def knob_paths(event: dict) -> dict[str, str]:
    return {k["field"]: k["via"] for k in event["knobs"]}


def test_trl_sft_cli(tmp_path, model_dir, data_dir):
    out = tmp_path / "out"
    oomguard_run(tmp_path / "run", POLICY, str(BIN / "trl"), "sft", "--model_name_or_path", str(model_dir),
                 "--dataset_name", str(data_dir), "--use_peft", "--lora_r", "8", "--lora_alpha", "16",
                 "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2",
                 "--per_device_train_batch_size", "4", "--max_length", "64", "--use_cpu", "--report_to", "none",
                 "--logging_steps", "1", "--learning_rate", "1e-3", "--dataloader_num_workers", "0")
    run, events = recovered(tmp_path / "run")
    assert of(events, "attempt_started", 1)[0]["launch"]["launcher"] == "trl"
    # the batch reached the child as a rewritten flag, accumulation (not in the command) in-process
    assert run["attempts"][1]["delivered"]["per_device_train_batch_size"] == "flag"
    paths = knob_paths(of(events, "bootstrap_trainer", 2)[0])
    assert paths["per_device_train_batch_size"] == "flag" and paths["gradient_accumulation_steps"] == "in_process"
    assert [e["bootstrap"] for e in of(events, "attempt_ended")] == ["in_process", "in_process"]
    for saved in (out / "checkpoint-4" / "training_args.bin", out / "training_args.bin"):  # checkpoint, final
        args = saved_args(saved)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
        assert args.auto_find_batch_size is False


def test_accelerate_launch_of_a_plain_trainer_script(tmp_path):
    run_dir = tmp_path / "run"
    oomguard_run(run_dir, POLICY, str(BIN / "accelerate"), "launch", "--num_processes", "1", "--cpu",
                 str(HERE / "_wrap_trainer_script.py"), str(tmp_path / "out"), "4")
    run, events = recovered(run_dir)
    assert of(events, "attempt_started", 1)[0]["launch"] == {
        "launcher": "accelerate", "delivery": "bootstrap", "reason": "accelerate: bootstrap on PYTHONPATH"}
    # the script hard-codes its output_dir: checkpoints went where the supervisor resumes from
    trainer_event = of(events, "bootstrap_trainer", 2)[0]
    assert trainer_event["output_dir"]["new"] == run["checkpoint_dir"]
    assert knob_paths(trainer_event)["per_device_train_batch_size"] == "in_process"
    args = saved_args(Path(run["checkpoint_dir"]) / "checkpoint-4" / "training_args.bin")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
    # the script's own auto_find_batch_size=True ran off, and the journal says so on every attempt
    assert args.auto_find_batch_size is False
    assert [e["attempt"] for e in of(events, "bootstrap_trainer") if e["auto_find_batch_size_forced_off"]] == [1, 2]
    assert len(of(events, "auto_find_batch_size_off")) == 2


def test_plain_sft_script_with_lora_config_gets_the_new_rank(tmp_path, model_dir, data_dir):
    out = tmp_path / "out"
    oomguard_run(tmp_path / "run", LORA_POLICY, sys.executable, str(HERE / "_wrap_sft_script.py"), str(model_dir),
                 str(data_dir / "train.jsonl"), str(out), "4")
    run, events = recovered(tmp_path / "run")
    assert run["config"]["lora_r"] == 4
    lora = of(events, "bootstrap_lora")
    # attempt 1: the script's own lora_alpha=16 (LoraConfig's default is 8) is kept as offered
    assert [(e["r"]["old"], e["r"]["new"], e["via"]) for e in lora] == [(8, 8, "adopted"), (8, 4, "in_process")]
    assert lora[0]["adopted"] == {"lora_alpha": 16}
    final = json.loads((out / "adapter_config.json").read_text())  # the script's own save_model
    resumed = json.loads((Path(run["checkpoint_dir"]) / "checkpoint-4" / "adapter_config.json").read_text())
    assert final["r"] == resumed["r"] == 4 and final["lora_alpha"] == 16
    assert saved_args(out / "training_args.bin").max_length == 64


def test_a_script_value_the_policy_only_offers_is_kept_and_the_ladder_starts_there(tmp_path):
    """The script hard-codes batch 4; the policy starts at 16. Attempt 1 trains at 4 (the policy's
    value is only an offer for a knob no rung has changed), the journal says so, and the batch rung
    halves 4 -> 2 (accumulation x2) — an order the bootstrap applies over the script's value."""
    run_dir = tmp_path / "run"
    oomguard_run(run_dir, HERE / "policies" / "wrap_adopt.yaml", sys.executable,
                 str(HERE / "_wrap_trainer_script.py"), str(tmp_path / "out"), "4")
    run, events = recovered(run_dir)
    assert run["attempts"][0]["delivered"]["per_device_train_batch_size"] == "offer"
    assert knob_paths(of(events, "bootstrap_trainer", 1)[0])["per_device_train_batch_size"] == "adopted"
    assert [e["knobs"] for e in of(events, "knobs_adopted")] == [{"per_device_train_batch_size": 4}]
    assert run["requested"]["per_device_train_batch_size"] == 4 and run["attempts"][0]["knobs"][
        "per_device_train_batch_size"] == 4
    assert run["attempts"][1]["delivered"]["per_device_train_batch_size"] == "env"  # changed by a rung: an order
    assert knob_paths(of(events, "bootstrap_trainer", 2)[0])["per_device_train_batch_size"] == "in_process"
    args = saved_args(Path(run["checkpoint_dir"]) / "checkpoint-4" / "training_args.bin")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
