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

Several ranks stop at one step end (:class:`StopAgreement`): a sharded save (FSDP, DeepSpeed) is a
collective every rank must enter at the same step, and under DDP too each rank writes its own
``rng_state_<rank>.pth`` into the checkpoint. The signal reaches the ranks at different moments (a
scheduler's, a user's ``kill`` of one rank), so the first rank to be asked proposes "the end of the next
step" in the group's c10d store (the one torchrun already runs; no collective on the device) and every
rank stops there. One step later is the earliest step no rank can have passed: the ranks run each step
in lockstep (its gradient collectives), so none can end step s+1 while another is still before the
end of step s.

Grow back (issue 18 item 5): the supervisor asks for a stop by writing ``<run_dir>/grow_request.json`` naming this
attempt. It is checked at every step end (one ``stat``) and goes through the same path as a signal, with
:data:`GROW_STOP` in place of a signal number (the ranks agree on its step too): save at that step end, stop,
journal ``grow_stopped`` and exit 0 (``SystemExit``: the script's code after ``train()`` does not run on a run
that is not over).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from oomguard import protocol
from oomguard.guard.env import process_alive
from oomguard.guard.writer import EventWriter

__all__ = ["CHECK_EVERY_S", "GROW_STOP", "HANDLED", "ShutdownCallback", "WARNINGS", "grow_requested"]

HANDLED = (signal.SIGTERM, signal.SIGINT)
# A scheduler's warning before its kill (SLURM's --signal=USR1@120 reaches every process of the job
# step): handled only where the script left Python's default (which would end the process unsaved).
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
CHECK_EVERY_S = 1.0  # seconds between checks that the supervisor is alive
GROW_STOP = 0  # the stop's "signal" when the supervisor asked for it to grow back (no signal is 0)
GROW_REASON = "the supervisor asked to save and stop here to grow the batch back"


def grow_requested(run_dir: Path | None, attempt: int | None) -> bool:
    """Whether ``<run_dir>/grow_request.json`` asks ``attempt`` to stop (a stale one names an earlier attempt)."""
    if run_dir is None or attempt is None:
        return False
    path = os.path.join(run_dir, protocol.GROW_REQUEST_JSON)  # every step: one stat, no Path object
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.read()).get("attempt") == attempt
    except (OSError, ValueError, AttributeError):
        return False  # torn or foreign: the supervisor writes it atomically, so it is not ours


def _last_step(state) -> bool:
    max_steps = getattr(state, "max_steps", None)
    return isinstance(max_steps, int) and max_steps > 0 and state.global_step >= max_steps


def _supervisor_pid() -> int | None:
    raw = os.environ.get(protocol.ENV_SUPERVISOR_PID, "").strip()
    return int(raw) if raw.isdigit() else None


class StopAgreement:
    """One stop step for every rank of a ``torch.distributed`` group, agreed in its c10d store.

    ``store``: the group's store (None: found at the first use, from the default process group; still
    None for a single process, where a stop is this process's alone)."""

    KEY = "oomguard/stop_at"

    def __init__(self, store=None):
        self._store, self._looked = store, store is not None

    @property
    def store(self):
        if not self._looked:
            self._looked = True
            self._store = _default_store()
        return self._store

    def propose(self, step: int, signum: int) -> tuple[int, int]:
        """Ask every rank to stop at the end of ``step + 1``; the first proposal in the group wins.
        Returns the agreed ``(step, signum)``."""
        value = self.store.compare_set(self.KEY, "", f"{step + 1} {signum}")
        return _parse(value)

    def agreed(self) -> tuple[int, int] | None:
        """The agreed ``(step, signum)`` once a rank proposed one, else None (one store round trip)."""
        if not self.store.check([self.KEY]):
            return None
        return _parse(self.store.get(self.KEY))


def _parse(value: bytes | str) -> tuple[int, int]:
    step, signum = (value.decode() if isinstance(value, bytes) else value).split()
    return int(step), int(signum)


def _default_store():
    """The default process group's c10d store when several ranks train, else None."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        from torch.distributed.distributed_c10d import _get_default_store  # stable since torch 1.8

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError, AttributeError):
        return None


class ShutdownCallback(TrainerCallback):
    """Turns a stop signal (or a dead supervisor) into save-then-exit at the next step end."""

    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0, supervisor_pid: int | None = None,
                 agreement: StopAgreement | None = None, attempt: int | None = None):
        self.journal = EventWriter(run_dir, rank)
        self.rank = rank
        self.agreement = agreement or StopAgreement()
        self.supervisor_pid = supervisor_pid if supervisor_pid is not None else _supervisor_pid()
        self.attempt = attempt  # GuardEnv.attempt: a grow request names the attempt it is for
        self.signum: int | None = None
        self.reason = ""
        self._previous: dict[int, object] = {}
        self._checked = 0.0

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int, reason: str) -> None:
        """Stop at the next step end; a real signal replaces a pending grow-back stop (same save, other exit)."""
        if self.signum is None or (self.signum == GROW_STOP and signum != GROW_STOP):
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
        if os.getppid() == self.supervisor_pid:  # our parent: alive (an exited parent's children are re-parented)
            return False
        return not process_alive(self.supervisor_pid)  # a launcher between us: kill(0) and /proc

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
        if not self.requested and not _last_step(state) and grow_requested(self.journal.run_dir, self.attempt):
            self.request(GROW_STOP, GROW_REASON)  # on the last step the run is over anyway: no stop, no restart
        if self._stop_now(state.global_step):
            control.should_save = True
            control.should_training_stop = True
            self.journal.emit("shutdown_requested", step=state.global_step, reason=self.reason)
        return control

    def _stop_now(self, step: int) -> bool:
        """Whether to save and stop at the end of ``step``: at once for a single process; for several
        ranks, at the step the group agreed (this rank proposes one when it was asked first)."""
        if self.agreement.store is None:
            return self.requested
        agreed = self.agreement.agreed()
        if agreed is None and self.requested:
            agreed = self.agreement.propose(step, int(self.signum))
        if agreed is None or step < agreed[0]:
            return False
        if not self.requested:
            self.request(agreed[1], f"the group agreed to stop at step {agreed[0]} (another rank was asked to stop)")
        return True

    def on_train_end(self, args, state, control, **kwargs):
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if not self.requested:
            return
        path = str(Path(args.output_dir) / f"checkpoint-{state.global_step}")
        if self.signum == GROW_STOP:
            self.journal.emit("grow_stopped", step=state.global_step, path=path, attempt=self.attempt or 0)
            raise SystemExit(0)  # a clean stop the supervisor asked for; the script's post-train code must not run
        self.journal.emit("shutdown_saved", step=state.global_step, reason=self.reason, path=path)
        raise SystemExit(128 + int(self.signum))  # not Exception: guarded_train lets it pass
