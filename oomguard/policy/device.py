"""The device a run trains on: what it can train in, and which policy fits it (match by name
pattern and memory range, highest priority wins)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from oomguard.errors import PolicyError
from oomguard.policy.records import DeviceCapabilities
from oomguard.policy.schema import Policy
from oomguard.protocol import BF16_MIN_CAPABILITY, bf16_capable

__all__ = ["BF16_MIN_CAPABILITY", "DEFAULT_POLICY", "GpuInfo", "bf16_capable", "bf16_supported",
           "device_capabilities", "matches", "select_policy"]

DEFAULT_POLICY = "default"
# Names of cards with bf16, used only when the capability is unknown (a GPU described by name alone).
_BF16_NAMES = re.compile(r"A\d{2,3}\b|A\d{2,3}-|H\d{3}|H200|B\d{3}|GB\d{3}|L4|L40|"
                         r"RTX\s*[345]0\d0|RTX\s*A\d{4}|RTX\s*\d{4}\s*Ada", re.I)


@dataclass(frozen=True)
class GpuInfo:
    """One device as the supervisor sees it. ``total_gib``: GiB, as torch/NVML report.

    ``emulated``: a VRAM cap makes a big card act as a smaller one; only the
    memory then says which class it is.
    """

    name: str
    total_gib: float
    compute_capability: tuple[int, int] | None = None
    emulated: bool = False


def bf16_supported(gpu: GpuInfo | None) -> bool:
    """bf16 needs compute capability >= 8.0 (Ampere); no GPU -> False; unknown capability: by name."""
    if gpu is None:
        return False
    known = bf16_capable(gpu.compute_capability)
    return bool(_BF16_NAMES.search(gpu.name)) if known is None else known


def device_capabilities(gpu: GpuInfo | None) -> DeviceCapabilities:
    """What a run on ``gpu`` can train in, for ``decide()``: no GPU -> neither fp16 nor bf16 (the child
    trains in fp32, or in a CPU bf16 it chose itself); else fp16, and bf16 as its compute capability
    says (unknown: the policy's ``capabilities.bf16`` stands)."""
    if gpu is None:
        return DeviceCapabilities(bf16=False, fp16=False)
    return DeviceCapabilities(bf16=bf16_capable(gpu.compute_capability), fp16=True)


def matches(policy: Policy, gpu: GpuInfo) -> bool:
    """Does ``policy`` claim this GPU? A policy without ``match`` claims none."""
    m = policy.match
    if m is None:
        return False
    mem = m.memory_gib
    if mem is not None and not (mem.min <= gpu.total_gib <= (mem.max if mem.max is not None else float("inf"))):
        return False
    if gpu.emulated or not m.name:
        return True
    return any(re.search(pattern, gpu.name, re.IGNORECASE) for pattern in m.name)


def select_policy(policies: Sequence[Policy], gpu: GpuInfo | None) -> Policy:
    """The matching policy of highest priority (ties: narrowest memory range, then name).

    No GPU, or no match: the policy named ``default``.
    """
    candidates = [p for p in policies if gpu is not None and matches(p, gpu)]
    if candidates:
        return min(candidates, key=lambda p: (-p.match.priority, _range_width(p), p.name))  # type: ignore[union-attr]
    for p in policies:
        if p.name == DEFAULT_POLICY:
            return p
    names = ", ".join(p.name for p in policies) or "none"
    what = "no GPU" if gpu is None else f"GPU {gpu.name!r} with {gpu.total_gib:.1f} GiB"
    raise PolicyError([f"(policies): {what} matches no policy and there is no {DEFAULT_POLICY!r} policy "
                       f"(got {names}, expected a policy named {DEFAULT_POLICY}; pass --policy NAME)"])


def _range_width(policy: Policy) -> float:
    mem = policy.match.memory_gib if policy.match else None
    if mem is None or mem.max is None:
        return float("inf")
    return float(mem.max - mem.min)
