from types import SimpleNamespace

from transformers import TrainerControl

from oomguard.guard.callbacks.memory import Growth
from oomguard.guard.callbacks.monitor import MemoryMonitorCallback
from oomguard.guard.callbacks.pressure import PressureCheckpointCallback


def test_pressure_saves_once_when_cap_is_near(tmp_path):
    monitor = MemoryMonitorCallback(tmp_path)
    pressure = PressureCheckpointCallback(monitor, within_steps=3)
    control = TrainerControl()
    monitor.growth = Growth(slope=1.0, level=0.0, step=10, cap=100, projected_step=20)
    pressure.on_step_end(None, SimpleNamespace(global_step=10), control)
    assert not control.should_save  # 10 steps left
    monitor.growth = Growth(slope=1.0, level=0.0, step=18, cap=100, projected_step=20)
    pressure.on_step_end(None, SimpleNamespace(global_step=18), control)
    assert control.should_save and pressure.saved_at == 18
    control = TrainerControl()
    pressure.on_step_end(None, SimpleNamespace(global_step=19), control)
    assert not control.should_save  # once
    assert '"pressure_save"' in (tmp_path / "events.jsonl").read_text()
