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
from test_spare_training import STEPS as SPARE_STEPS
from test_spare_training import shared_train
from test_wrap_matrix import shared_oom

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


def test_trl_sft_cli(tmp_path_factory):
    """``trl sft --model_name_or_path .. --use_peft --lora_r 8 --lora_alpha 16 --per_device_train_batch_size 4
    --max_length 64 --max_steps 4 --save_steps 2 ...`` with the warm spare on, through a cuda_oom at step 3 whose
    rung halves the batch (4 -> 2, accumulation 1 -> 2): the run test_wrap_matrix.py's trl_flags style makes for
    its OOM case (shared, one run per session; the matrix checks the rest of what the child trained)."""
    style, run_dir = shared_oom(tmp_path_factory, "trl_flags")
    out = style.out
    run, events = recovered(run_dir)
    assert of(events, "attempt_started", 1)[0]["launch"]["launcher"] == "trl"
    # the batch reached the child as a rewritten flag, accumulation (not in the command) in-process
    assert run["attempts"][1]["delivered"]["per_device_train_batch_size"] == "flag"
    paths = knob_paths(of(events, "bootstrap_trainer", 2)[0])
    assert paths["per_device_train_batch_size"] == "flag" and paths["gradient_accumulation_steps"] == "in_process"
    assert [e["bootstrap"] for e in of(events, "attempt_ended")] == ["in_process", "in_process"]
    # with the warm spare (the default outside the tests): attempt 2's trl launcher ran in it, its worker a fork
    assert of(events, "child_start", 2)[0]["start"] == "warm"
    assert [e["start"] for e in of(events, "worker_start")] == ["fork"]
    for saved in (out / "checkpoint-4" / "training_args.bin", out / "training_args.bin"):  # checkpoint, final
        args = saved_args(saved)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
        assert args.auto_find_batch_size is False


def test_accelerate_launch_of_a_plain_trainer_script(tmp_path):
    run_dir = tmp_path / "run"
    oomguard_run(run_dir, POLICY, str(BIN / "accelerate"), "launch", "--num_processes", "1", "--cpu",
                 str(HERE / "_wrap_trainer_script.py"), str(tmp_path / "out"), "4", warm_spare=True)
    run, events = recovered(run_dir)
    assert of(events, "attempt_started", 1)[0]["launch"] == {
        "launcher": "accelerate", "delivery": "bootstrap", "reason": "accelerate: bootstrap on PYTHONPATH"}
    # the script's own output_dir (no flag): the supervisor found its checkpoints there
    trainer_event = of(events, "bootstrap_trainer", 2)[0]
    assert trainer_event["output_dir"] is None and run["checkpoint_dir"] == str(tmp_path / "out")
    assert knob_paths(trainer_event)["per_device_train_batch_size"] == "in_process"
    assert of(events, "child_start", 2)[0]["start"] == "warm"  # the launcher in the spare, its worker a fork of it
    assert [e["start"] for e in of(events, "worker_start")] == ["fork"]
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
    # attempt 1 ran the script's own LoraConfig untouched (r=8 equals peft's default: still the script's);
    # the rung's order reached attempt 2's config in-process, and the live adapter showed it
    assert [(e["r"]["old"], e["r"]["new"], e["via"]) for e in lora] == [(8, 4, "in_process")]
    assert run["requested"]["lora_r"] == 8 and run["attempts"][1]["verified"] == {"lora_r": "verified"}
    final = json.loads((out / "adapter_config.json").read_text())  # the script's own save_model
    resumed = json.loads((Path(run["checkpoint_dir"]) / "checkpoint-4" / "adapter_config.json").read_text())
    assert final["r"] == resumed["r"] == 4 and final["lora_alpha"] == 16
    assert saved_args(out / "training_args.bin").max_length == 64


def test_the_scripts_own_values_run_and_the_ladder_starts_there(tmp_path_factory):
    """The script hard-codes batch 4; the policy's knobs say 16. Attempt 1 trains at 4 (the policy is
    no order for a wrapped command), requested says 4 as observed in the child, and the batch rung
    halves 4 -> 2 (accumulation x2): an order the bootstrap applies in-process and the child shows.
    The run (6 steps, the warm spare on) is test_spare_training.py's warm one, shared (one run per session)."""
    run_dir, _ = shared_train(tmp_path_factory, "--warm-spare")
    run, events = recovered(run_dir)
    assert run["attempts"][0]["orders"] == {} and run["attempts"][0]["delivered"] == {}
    assert run["requested_source"] == "observed" and run["requested"]["per_device_train_batch_size"] == 4
    assert run["attempts"][1]["delivered"]["per_device_train_batch_size"] == "in_process"
    assert knob_paths(of(events, "bootstrap_trainer", 2)[0])["per_device_train_batch_size"] == "in_process"
    assert [(e["knob"], e["observed"]) for e in of(events, "change_verified", 2)] == [
        ("per_device_train_batch_size", 2), ("gradient_accumulation_steps", 2)]
    args = saved_args(Path(run["checkpoint_dir"]) / f"checkpoint-{SPARE_STEPS}" / "training_args.bin")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)


def test_trl_sft_nan_learning_rate_rung_is_in_force_after_the_rollback(tmp_path, model_dir, data_dir):
    """NaN at step 3 -> roll back to checkpoint-2 with learning_rate 1e-3 -> 5e-4. HF restores the
    checkpoint's scheduler/optimizer LR over the edited flag; the child's own trainer_state.json must
    still log 5e-4 for every step after the rollback (checked from the child's files)."""
    out = tmp_path / "out"
    oomguard_run(tmp_path / "run", HERE / "policies" / "wrap_nan.yaml", str(BIN / "trl"), "sft",
                 "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--use_peft",
                 "--lora_r", "8", "--output_dir", str(out), "--max_steps", "5", "--save_steps", "2",
                 "--per_device_train_batch_size", "4", "--max_length", "64", "--use_cpu", "--report_to", "none",
                 "--logging_steps", "1", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
                 "--dataloader_num_workers", "0", inject="nan@step=3")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    first, second = run["attempts"]
    assert first["failure"]["kind"] == "nan_loss" and second["resumed_from"].endswith("checkpoint-2")
    assert second["command"][second["command"].index("--learning_rate") + 1] == "0.0005"  # edited in place
    assert second["verified"] == {"learning_rate": "verified"}
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    lrs = {h["step"]: h["learning_rate"] for h in state["log_history"] if "loss" in h}
    assert sorted(lrs) == [1, 2, 3, 4, 5]
    assert [lrs[s] for s in (1, 2)] == [1e-3, 1e-3] and all(lrs[s] == 5e-4 for s in (3, 4, 5)), lrs
