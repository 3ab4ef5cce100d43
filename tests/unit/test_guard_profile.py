import pytest

from oomguard.guard.callbacks.profile import dataset_lengths, length_profile, sample_indices
from oomguard.guard.device.vram import vram_fraction


def test_length_profile_quantiles():
    lengths = list(range(1, 101))  # 1..100
    prof = length_profile(lengths)
    assert prof["count"] == 100 and prof["max_len"] == 100 and prof["total_tokens"] == 5050
    q = dict((round(a, 2), b) for a, b in prof["quantiles"])
    assert len(prof["quantiles"]) == 101
    assert q[0.0] == 1 and q[0.5] == 50 and q[1.0] == 100
    assert all(isinstance(v, int) for v in q.values())


def test_sampled_profile_scales_total():
    prof = length_profile([10, 10, 10], count=300)
    assert prof["total_tokens"] == 3000 and prof["sampled"]


def test_sampling_is_deterministic_and_bounded():
    a, b = sample_indices(1000, 100), sample_indices(1000, 100)
    assert a == b and len(a) == 100 and len(set(a)) == 100


def test_dataset_lengths_of_rows_and_datasets():
    rows = [{"input_ids": [1] * n} for n in (3, 5, 7)]
    assert dataset_lengths(rows) == ([3, 5, 7], 3)
    assert dataset_lengths([{"text": "x"}]) is None
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(rows)
    assert dataset_lengths(ds) == ([3, 5, 7], 3)


def test_vram_fraction_accounts_for_context_and_paged():
    gib = 2**30
    assert vram_fraction(24 * gib, 80 * gib, gib // 2) == pytest.approx(23.5 / 80)
    assert vram_fraction(24 * gib, 80 * gib, gib // 2, 2 * gib) == pytest.approx(21.5 / 80)
    assert vram_fraction(100 * gib, 80 * gib, gib // 2) == 1.0
    with pytest.raises(ValueError, match="raise OOMGUARD_VRAM_LIMIT"):
        vram_fraction(gib // 4, 80 * gib, gib // 2)


def test_vram_limit_is_a_warned_noop_without_cuda():
    import torch

    from oomguard.guard.device.vram import apply_vram_limit

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert apply_vram_limit(None) is None
    with pytest.warns(RuntimeWarning, match="needs CUDA"):
        assert apply_vram_limit(24 * 2**30) is None


def test_packed_dataset_is_profiled_by_its_samples_not_its_rows():
    from datasets import Dataset

    from oomguard.guard.callbacks.profile import dataset_lengths

    packed = Dataset.from_dict({"input_ids": [[1] * 8, [1] * 8], "seq_lengths": [[5, 3], [8]]})
    lengths, n = dataset_lengths(packed)
    assert sorted(lengths) == [3, 5, 8] and n == 3
