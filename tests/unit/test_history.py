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
