"""Journal <-> policy records: the child's memory growth reaches decide() through the failure."""

from oomguard.policy import Failure
from oomguard.protocol import FailureKind, Phase
from oomguard.supervisor.history import failure_dict, memory_growth


def test_memory_growth_is_the_last_report_of_this_attempt():
    events = [{"event": "memory_growth", "time": 5.0, "slope_bytes_per_step": 1e6},  # an earlier attempt
              {"event": "memory", "time": 12.0, "step": 3},
              {"event": "memory_growth", "time": 14.0, "slope_bytes_per_step": 5e8}]
    assert memory_growth(events, since=10.0) == 5e8
    assert memory_growth(events[:2], since=10.0) is None
    assert memory_growth([{"event": "memory_growth", "time": 11, "slope_bytes_per_step": -3}], 10.0) is None


def test_failure_dict_keeps_growth_only_when_seen():
    grown = Failure(FailureKind.CUDA_OOM, 24, Phase.FORWARD_BACKWARD, "oom", 0, 5e8)
    assert failure_dict(grown)["memory_growth"] == 5e8
    assert "memory_growth" not in failure_dict(Failure(FailureKind.CUDA_OOM, 3))


def test_offers_go_only_to_env_knobs_no_decision_changed():
    from oomguard.supervisor.history import offer_unchanged

    delivered = {"per_device_train_batch_size": "env", "gradient_accumulation_steps": "env", "lora_r": "flag"}
    assert offer_unchanged(delivered, {"gradient_accumulation_steps"}) == {
        "per_device_train_batch_size": "offer", "gradient_accumulation_steps": "env", "lora_r": "flag"}


def test_adopted_knobs_from_rank_zero_banners_of_this_attempt():
    from oomguard.supervisor.history import adopted_knobs

    banner = {"event": "bootstrap_trainer", "time": 20.0, "rank": 0, "knobs": [
        {"knob": "per_device_train_batch_size", "field": "per_device_train_batch_size", "old": 16, "new": 16,
         "via": "adopted"},
        {"knob": "precision", "field": "bf16", "old": True, "new": True, "via": "adopted"},
        {"knob": "precision", "field": "fp16", "old": False, "new": False, "via": "adopted"},
        {"knob": "gradient_accumulation_steps", "field": "gradient_accumulation_steps", "old": 1, "new": 2,
         "via": "in_process"}]}
    lora = {"event": "bootstrap_lora", "time": 21.0, "adopted": {"lora_alpha": 64}}
    older = {**banner, "time": 5.0, "knobs": [{**banner["knobs"][0], "new": 99, "old": 99}]}
    rank1 = {**banner, "rank": 1, "knobs": [{**banner["knobs"][0], "new": 7, "old": 7}]}
    assert adopted_knobs([older, banner, rank1, lora], since=10.0) == {
        "per_device_train_batch_size": 16, "precision": "bf16", "lora_alpha": 64}
