"""The guard's ``TrainerCallback``s, one concern each (DESIGN §10.6); every one is usable on its own.

- :mod:`phase`: where in the step the child is (for the error record);
- :mod:`heartbeat`: the heartbeat file, ``step`` / ``trainer_log`` / ``checkpoint_saved`` events;
- :mod:`monitor` (numbers in :mod:`memory`): allocator figures per step, growth detection;
- :mod:`pressure`: a save ahead of a projected OOM; :mod:`cache`: the CUDA cache cleared where it pays;
- :mod:`nan`: a non-finite loss or gradient caught before its update; :mod:`rewarm`: warm-up again after
  a NaN rollback;
- :mod:`profile`: the training set's length distribution; :mod:`in_force`: the recipe in force;
- :mod:`faults`: injected failures (``OOMGUARD_INJECT``); :mod:`shutdown`: save-then-exit on a stop signal;
- :mod:`trackers`: ``oomguard/*`` into the ``report_to`` trackers, one tracker run across attempts.
"""

from oomguard.guard.callbacks.cache import CacheClearerCallback
from oomguard.guard.callbacks.faults import FaultInjectionCallback
from oomguard.guard.callbacks.heartbeat import HeartbeatCallback
from oomguard.guard.callbacks.in_force import RecipeCallback
from oomguard.guard.callbacks.monitor import MemoryMonitorCallback
from oomguard.guard.callbacks.nan import NanGuardCallback, NonFiniteLossError
from oomguard.guard.callbacks.phase import PhaseTrackerCallback
from oomguard.guard.callbacks.pressure import PressureCheckpointCallback
from oomguard.guard.callbacks.profile import DataProfileCallback
from oomguard.guard.callbacks.rewarm import RewarmCallback
from oomguard.guard.callbacks.shutdown import ShutdownCallback
from oomguard.guard.callbacks.trackers import TrackerCallback, install_tracker_callback

__all__ = ["CacheClearerCallback", "DataProfileCallback", "FaultInjectionCallback", "HeartbeatCallback",
           "MemoryMonitorCallback", "NanGuardCallback", "NonFiniteLossError", "PhaseTrackerCallback",
           "PressureCheckpointCallback", "RecipeCallback", "RewarmCallback", "ShutdownCallback", "TrackerCallback",
           "install_tracker_callback"]
