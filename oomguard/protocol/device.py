"""What a device can do, as both sides judge it (one rule each). Stdlib only."""

from __future__ import annotations

from typing import Sequence

__all__ = ["BF16_MIN_CAPABILITY", "bf16_capable"]

BF16_MIN_CAPABILITY = (8, 0)  # CUDA compute capability from which bf16 runs natively (Ampere)


def bf16_capable(capability: Sequence[int] | None) -> bool | None:
    """Whether a CUDA device of compute ``capability`` (major, minor) has bf16; None when unknown
    (no capability given, or not a pair of integers)."""
    if capability is None:
        return None
    try:
        major, minor = (int(c) for c in capability)
    except (TypeError, ValueError):
        return None
    return (major, minor) >= BF16_MIN_CAPABILITY
