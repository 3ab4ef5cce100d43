"""A LoRA rank rung is passed over, with its reason, when the checkpoint to resume from is sharded
(issue 21): the rank cut reads ``adapter_model.safetensors``, which an FSDP/DeepSpeed sharded save does
not write. The other rungs are unaffected."""

from __future__ import annotations

from pathlib import Path

from test_policy_decide import attempt, policy

from oomguard.policy import CheckpointInfo, Evidence, RungRef, decide
from oomguard.protocol import FailureKind
from oomguard.supervisor.checkpoints import scan_checkpoints
from oomguard.supervisor.evidence import held_knobs


def _checkpoint(root: Path, step: int, *, sharded: bool) -> Path:
    ckpt = root / f"checkpoint-{step}"
    if sharded:
        (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
        (ckpt / "optimizer_0").mkdir()
    else:
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_model.safetensors").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return ckpt


def test_held_only_when_the_newest_complete_checkpoint_is_sharded_without_an_adapter_file(tmp_path):
    _checkpoint(tmp_path / "a", 2, sharded=False)
    _checkpoint(tmp_path / "a", 4, sharded=True)
    scans = scan_checkpoints(tmp_path / "a")
    held = held_knobs(scans)  # scan completeness aside: the newest given decides
    assert set(held) == {"lora_r", "lora_alpha"} and "(checkpoint-4) is fsdp-sharded" in held["lora_r"]
    assert held_knobs([s for s in scans if s.step == 2]) == {}
    assert held_knobs([]) == {}


def test_a_held_lora_rank_rung_is_passed_over_with_its_reason_and_the_next_rung_taken():
    pol = policy(ladders={"cuda_oom": {"rungs": [
        {"knob": "lora_r", "op": "step_down", "values": [64, 32, 16, 8, 4], "max_times": 2, "resume": "transform"},
        {"op": "halve_batch", "floor": 1, "max_times": 3, "resume": "safe"}]}})
    why = "the checkpoint to resume from (checkpoint-30) is fsdp-sharded: the LoRA rank cut reads ..."
    history = [attempt(1, pol, FailureKind.CUDA_OOM, step=30, max_step=30)]
    ckpts = (CheckpointInfo("/run/ckpt/checkpoint-30", 30),)
    free = decide(pol, Evidence(attempts=history, checkpoints=ckpts))
    assert free.rung == RungRef(FailureKind.CUDA_OOM, 0) and free.knobs["lora_r"] == 8
    held = decide(pol, Evidence(attempts=history, checkpoints=ckpts, held={"lora_r": why, "lora_alpha": why}))
    assert held.rung == RungRef(FailureKind.CUDA_OOM, 1)
    assert held.knobs["lora_r"] == 16 and held.knobs["per_device_train_batch_size"] == 4
    assert f"passed over cuda_oom rung 0 (lora_r step_down): {why}" in held.reason
