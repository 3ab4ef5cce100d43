"""HeartbeatCallback: touch ``<run_dir>/heartbeat`` (rank k: ``heartbeat.rank<k>``) so hangs show."""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from oomguard import protocol


def heartbeat_path(run_dir: str | Path, rank: int) -> Path:
    base = Path(run_dir) / protocol.HEARTBEAT
    return base if rank == 0 else base.with_name(f"{protocol.HEARTBEAT}.rank{rank}")


class HeartbeatCallback(TrainerCallback):
    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0):
        self.path = heartbeat_path(run_dir, rank) if run_dir else None

    def beat(self) -> None:
        if self.path is not None:
            try:
                protocol.touch(self.path)
            except OSError:
                pass  # a missed beat is better than a dead run; the supervisor waits hang_timeout

    def on_train_begin(self, args, state, control, **kwargs):
        self.beat()

    def on_step_end(self, args, state, control, **kwargs):
        self.beat()

    def on_substep_end(self, args, state, control, **kwargs):
        self.beat()  # long gradient accumulation is progress too

    def on_prediction_step(self, args, state, control, **kwargs):
        self.beat()
