"""The in-child guard: callbacks, emergency checkpoint, error record, fault injection, VRAM emulation.

Runs inside the training process (imports torch/transformers); never imports the supervisor
or the policy. Every callback is usable on its own in a user's script. Layout:

- :mod:`oomguard.guard.train`: :func:`guarded_train` and :func:`guard_callbacks`, the guard on a Trainer;
- :mod:`oomguard.guard.callbacks`: one ``TrainerCallback`` per concern;
- :mod:`oomguard.guard.resume`: resuming under changed knobs (ledger, data position, adapter cut);
- :mod:`oomguard.guard.device`: allocator figures, allocator defaults, VRAM emulation;
- :mod:`oomguard.guard.trainer_patches`: every private transformers/trl/peft internal oomguard touches;
- :mod:`oomguard.guard.env` (what the supervisor said), :mod:`oomguard.guard.writer` (events),
  :mod:`oomguard.guard.recorder` (the error record), :mod:`oomguard.guard.observe` (the recipe read back),
  :mod:`oomguard.guard.notices` (the guard's own warnings, once per run).
"""

from oomguard.guard.callbacks import (
    CacheClearerCallback,
    DataProfileCallback,
    FaultInjectionCallback,
    HeartbeatCallback,
    MemoryMonitorCallback,
    NanGuardCallback,
    NonFiniteLossError,
    PhaseTrackerCallback,
    PressureCheckpointCallback,
)
from oomguard.guard.device import apply_allocator_defaults, apply_vram_limit
from oomguard.guard.env import GuardEnv
from oomguard.guard.notices import OomguardWarning
from oomguard.guard.resume import remember_raw_dataset
from oomguard.guard.train import guard_callbacks, guarded_train
from oomguard.guard.writer import EventWriter

__all__ = [
    "CacheClearerCallback", "DataProfileCallback", "EventWriter", "FaultInjectionCallback", "GuardEnv",
    "HeartbeatCallback", "MemoryMonitorCallback", "NanGuardCallback", "NonFiniteLossError", "OomguardWarning",
    "PhaseTrackerCallback", "PressureCheckpointCallback", "apply_allocator_defaults", "apply_vram_limit",
    "guard_callbacks", "guarded_train", "remember_raw_dataset",
]
