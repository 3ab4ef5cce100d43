"""The accelerator as the child sees it: allocator and NVML figures (:mod:`stats`), the allocator's
defaults (:mod:`allocator`), and an emulated smaller card (:mod:`vram`)."""

from oomguard.guard.device.allocator import apply_allocator_defaults
from oomguard.guard.device.vram import apply_vram_limit

__all__ = ["apply_allocator_defaults", "apply_vram_limit"]
