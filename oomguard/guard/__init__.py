"""The in-child guard: callbacks, emergency checkpoint, error record, fault injection, VRAM emulation.

Runs inside the training process (imports torch/transformers); never imports the supervisor
or the policy. Every callback is usable on its own in a user's script.
"""

from oomguard.guard.allocator import apply_allocator_defaults
from oomguard.guard.cache import CacheClearerCallback
from oomguard.guard.env import GuardEnv
from oomguard.guard.faults import FaultInjectionCallback
from oomguard.guard.heartbeat import HeartbeatCallback
from oomguard.guard.monitor import MemoryMonitorCallback
from oomguard.guard.nan import NanGuardCallback, NonFiniteLossError
from oomguard.guard.phase import PhaseTrackerCallback
from oomguard.guard.pressure import PressureCheckpointCallback
from oomguard.guard.profile import DataProfileCallback
from oomguard.guard.train import guard_callbacks, guarded_train
from oomguard.guard.vram import apply_vram_limit

__all__ = [
    "CacheClearerCallback", "DataProfileCallback", "FaultInjectionCallback", "GuardEnv",
    "HeartbeatCallback", "MemoryMonitorCallback", "NanGuardCallback", "NonFiniteLossError",
    "PhaseTrackerCallback", "PressureCheckpointCallback", "apply_allocator_defaults",
    "apply_vram_limit", "guard_callbacks", "guarded_train",
]
