"""Turn how a child ended into a Failure (or None for success). Pure.

Evidence in order of trust (DESIGN §4): the child's own error record (root cause = the
earliest rank's), our own hang kill, a SIGKILL while host memory was near full, an OOM
message in stderr, then anything else is a crash.
"""

from __future__ import annotations

import signal as _signal
from typing import Sequence

from ..policy import Failure
from ..protocol import ErrorRecord, FailureKind, Phase, find_oom
from .process import ChildOutcome


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def _crash_detail(outcome: ChildOutcome) -> str:
    tail = _last_line(outcome.stderr_tail)
    if outcome.signal is not None:
        name = _signal.Signals(outcome.signal).name if outcome.signal in _signal.Signals._value2member_map_ else outcome.signal
        return f"killed by {name}" + (f"; last stderr line: {tail}" if tail else "")
    return tail or f"exit code {outcome.exit_code} with no stderr"


def _from_record(rec: ErrorRecord) -> Failure:
    return Failure(kind=rec.kind, step=rec.step, phase=rec.phase, detail=rec.detail[:500], rank=rec.rank)


def classify(outcome: ChildOutcome, records: Sequence[ErrorRecord], *, host_oom_percent: float,
             last_step: int | None = None) -> Failure | None:
    """None when the child succeeded. ``last_step``: the newest step seen (heartbeat/checkpoints)."""
    if outcome.exit_code == 0 and not outcome.hung:
        return None
    if outcome.hung:
        return Failure(kind=FailureKind.HANG, step=last_step, phase=Phase.UNKNOWN,
                       detail="no heartbeat within hang_timeout_s; the process group was killed")
    if records:
        return _from_record(records[0])
    if outcome.signal == _signal.SIGKILL and outcome.host_mem_peak_percent >= host_oom_percent:
        return Failure(kind=FailureKind.HOST_OOM, step=last_step, detail=(
            f"SIGKILL while host memory was {outcome.host_mem_peak_percent:.0f}% used "
            f"(threshold {host_oom_percent:.0f}%): the kernel's OOM killer, most likely"))
    oom_line = find_oom(outcome.stderr_tail)
    if oom_line:
        return Failure(kind=FailureKind.CUDA_OOM, step=last_step, detail=oom_line[:500])
    return Failure(kind=FailureKind.CRASH, step=last_step, detail=_crash_detail(outcome))
