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


def test_observation_is_rank_zero_of_this_attempt_in_force_over_built():
    from oomguard.protocol import EVENT_RECIPE_OBSERVED as EV
    from oomguard.supervisor.observation import observation_of

    built = {"event": EV, "time": 20.0, "rank": 0, "attempt": 2, "stage": "built", "output_dir": "/o",
             "knobs": {"per_device_train_batch_size": 4, "learning_rate": 1e-3}, "fields": {"learning_rate": "learning_rate"}}
    force = {**built, "time": 21.0, "stage": "in_force", "knobs": {"learning_rate": 5e-4}, "fields": {"learning_rate": "optimizer"}}
    older = {**built, "attempt": 1, "time": 5.0, "knobs": {"per_device_train_batch_size": 99}}
    rank1 = {**built, "rank": 1, "knobs": {"per_device_train_batch_size": 7}}
    seen = observation_of([older, built, rank1, force], attempt=2, since=10.0)
    assert seen.knobs == {"per_device_train_batch_size": 4, "learning_rate": 5e-4}
    assert seen.fields == {"learning_rate": "optimizer"} and seen.output_dir == "/o"
    assert not observation_of([older], attempt=2, since=10.0).seen


def test_verify_and_capabilities():
    from oomguard.supervisor.observation import NOT_APPLIED, UNVERIFIED, VERIFIED, Observation, capabilities, verify

    seen = Observation(built={"knobs": {"learning_rate": 1e-3, "per_device_train_batch_size": 2},
                              "fields": {"learning_rate": "learning_rate", "per_device_train_batch_size": "x"}})
    checks = {c.knob: c.status for c in verify({"learning_rate": 5e-4, "per_device_train_batch_size": 2.0,
                                                "lora_r": 4, "max_seq_length": 128}, seen, longest_row=100)}
    assert checks == {"learning_rate": NOT_APPLIED, "per_device_train_batch_size": VERIFIED,
                      "lora_r": UNVERIFIED, "max_seq_length": VERIFIED}
    assert {c.status for c in verify({"max_seq_length": 64}, seen, longest_row=100)} == {NOT_APPLIED}
    assert {c.status for c in verify({"learning_rate": 5e-4}, Observation())} == {UNVERIFIED}
    reach = capabilities(seen, {"max_seq_length": "--block_size"}, in_process=True, placeholders={"lora_r"})
    assert reach == {"max_seq_length": "flag --block_size", "lora_r": "placeholder",
                     "learning_rate": "in_process learning_rate", "per_device_train_batch_size": "in_process x"}
    assert set(capabilities(seen, {}, in_process=False)) == set()
