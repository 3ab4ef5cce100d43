"""ShutdownCallback: on SIGTERM/SIGINT (and SIGUSR1/SIGUSR2 where the script left them alone), or when
the supervisor is gone, save at the step end and stop.

The supervisor forwards SIGTERM/SIGINT to the child's group and waits a grace period
(process.Watch.grace_s) before SIGKILL; when the supervisor itself dies, the kernel sends the
child SIGTERM (PR_SET_PDEATHSIG). Python's default would end the process mid-step and lose
every step since the last regular save. Instead the signal only sets a flag; the next
``on_step_end`` asks the Trainer to save ``checkpoint-<global_step>`` and stop, and
``on_train_end`` (after that save) exits with 128 + signal so the stop never reads as success.
A second SIGINT gets the previous handler (a second Ctrl-C ends at once); a second SIGTERM
does not: a supervisor that finds an orphan still saving sends one more and waits.

A grandchild of a launcher (torchrun, accelerate) gets no PDEATHSIG from the supervisor, so
the supervisor's pid (``OOMGUARD_SUPERVISOR_PID``) is also checked, at most once a second.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from oomguard import protocol
from oomguard.guard.env import process_alive
from oomguard.guard.writer import EventWriter

__all__ = ["CHECK_EVERY_S", "HANDLED", "ShutdownCallback", "WARNINGS"]

HANDLED = (signal.SIGTERM, signal.SIGINT)
# A scheduler's warning before its kill (SLURM's --signal=USR1@120 reaches every process of the job
# step): handled only where the script left Python's default (which would end the process unsaved).
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
CHECK_EVERY_S = 1.0  # seconds between checks that the supervisor is alive


def _supervisor_pid() -> int | None:
    raw = os.environ.get(protocol.ENV_SUPERVISOR_PID, "").strip()
    return int(raw) if raw.isdigit() else None


class ShutdownCallback(TrainerCallback):
    """Turns a stop signal (or a dead supervisor) into save-then-exit at the next step end."""

    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0, supervisor_pid: int | None = None):
        self.journal = EventWriter(run_dir, rank)
        self.supervisor_pid = supervisor_pid if supervisor_pid is not None else _supervisor_pid()
        self.signum: int | None = None
        self.reason = ""
        self._previous: dict[int, object] = {}
        self._checked = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int, reason: str) -> None:
        if self.signum is None:
            self.signum, self.reason = signum, reason

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signum == signal.SIGINT:  # Ctrl-C twice: do what the process would have done
            previous = self._previous.get(signum)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.request(signum, f"received {signal.Signals(signum).name}")

    def _supervisor_gone(self) -> bool:
        now = time.monotonic()
        if self.supervisor_pid is None or now - self._checked < CHECK_EVERY_S:
            return False
        self._checked = now
        return not process_alive(self.supervisor_pid)

    # -- trainer events ---------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for s in HANDLED:
            self._previous[s] = signal.signal(s, self._handle)
        for s in WARNINGS:
            if signal.getsignal(s) == signal.SIG_DFL:
                self._previous[s] = signal.signal(s, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.requested and self._supervisor_gone():
            self.request(signal.SIGTERM, f"supervisor pid {self.supervisor_pid} is gone")
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.journal.emit("shutdown_requested", step=state.global_step, reason=self.reason)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self.requested:
            self.journal.emit("shutdown_saved", step=state.global_step, reason=self.reason,
                              path=str(Path(args.output_dir) / f"checkpoint-{state.global_step}"))
            raise SystemExit(128 + int(self.signum))  # not Exception: guarded_train lets it pass
