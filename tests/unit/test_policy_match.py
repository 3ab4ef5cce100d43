"""GPU-class matching over the shipped policies, with memory as torch reports it (GiB)."""

import pytest

from oomguard.errors import PolicyError
from oomguard.policy import GpuInfo, bf16_supported, load_all_shipped, parse_policy, select_policy


@pytest.fixture(scope="module")
def shipped():
    return load_all_shipped()


@pytest.mark.parametrize("name, gib, cc, expected", [
    ("Tesla T4", 14.75, (7, 5), "t4-16gb"),
    ("NVIDIA GeForce RTX 4090", 23.99, (8, 9), "rtx-24gb"),
    ("NVIDIA GeForce RTX 3090", 23.69, (8, 6), "rtx-24gb"),
    ("NVIDIA L4", 22.49, (8, 9), "l4-24gb"),
    ("NVIDIA A100-SXM4-40GB", 39.39, (8, 0), "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", 79.15, (8, 0), "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", 79.65, (9, 0), "h100-80gb"),
    ("NVIDIA H200", 139.8, (9, 0), "h200-141gb"),
    ("Quadro P5000", 15.9, (6, 1), "default"),  # 16 GiB but not a T4: name decides
])
def test_real_gpus_pick_their_class(shipped, name, gib, cc, expected):
    assert select_policy(shipped, GpuInfo(name, gib, cc)).name == expected


def test_no_gpu_picks_default(shipped):
    assert select_policy(shipped, None).name == "default"


@pytest.mark.parametrize("cap_gib, expected", [(24.0, "rtx-24gb"), (15.0, "t4-16gb"), (40.0, "a100-40gb")])
def test_emulated_card_matches_by_memory_only(shipped, cap_gib, expected):
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", cap_gib, (9, 0), emulated=True)
    assert select_policy(shipped, gpu).name == expected


def test_demo_is_never_auto_selected(shipped):
    for gpu in (None, GpuInfo("demo", 1.0), GpuInfo("cpu", 0.5, emulated=True)):
        assert select_policy(shipped, gpu).name != "demo"


def test_priority_then_narrowest_range_wins(shipped):
    h100 = next(p for p in shipped if p.name == "h100-80gb")
    data = h100.model_dump(mode="json")
    wide = parse_policy({**data, "name": "wide", "match": {"name": ["H100"], "memory_gib": {"min": 0}, "priority": 10}})
    narrow = parse_policy({**data, "name": "narrow", "match": {"name": ["H100"], "memory_gib": {"min": 75, "max": 85}, "priority": 10}})
    high = parse_policy({**data, "name": "high", "match": {"name": [], "priority": 50}})
    gpu = GpuInfo("NVIDIA H100 80GB HBM3", 79.65)
    assert select_policy([wide, narrow, h100], gpu).name == "narrow"
    assert select_policy([wide, narrow, high], gpu).name == "high"


def test_no_match_and_no_default_is_an_error(shipped):
    specific = [p for p in shipped if p.name not in ("default",)]
    with pytest.raises(PolicyError, match="no 'default' policy"):
        select_policy(specific, GpuInfo("Radeon", 16.0))


@pytest.mark.parametrize("gpu, expected", [
    (None, False), (GpuInfo("Tesla T4", 14.75, (7, 5)), False), (GpuInfo("Tesla V100", 31.7, (7, 0)), False),
    (GpuInfo("NVIDIA A100 80GB PCIe", 79.15, (8, 0)), True), (GpuInfo("NVIDIA H100 80GB HBM3", 79.65), True),
    (GpuInfo("Tesla T4", 14.75), False), (GpuInfo("NVIDIA GeForce RTX 4090", 23.99), True),
])
def test_bf16_supported(gpu, expected):
    assert bf16_supported(gpu) is expected
