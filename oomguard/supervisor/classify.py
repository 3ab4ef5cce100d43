"""Turn how a child ended into a Failure (or None for success). Pure.

Evidence in order of trust (DESIGN §4): the child's own error record (root cause = the
earliest rank's that is not a peer-lost symptom, ``ranks.root_record``; it wins even over
our hang kill), our own hang kill, a SIGKILL while host memory was near full (of the child,
or of the worker a launcher names as its first failure), an OOM message in stderr, a
peer-lost record, then anything else is a crash. An OOM line in stderr counts only when the
last exception the child printed is that OOM (``final_oom``): a caught one earlier does not. A crash
that is a full disk (or a file size or quota limit) says so first: no rung helps, freeing space does.
"""

from __future__ import annotations

import dataclasses
import re
import signal as _signal
from typing import Sequence

from ..protocol import ErrorRecord, FailureKind, Phase, find_oom
from ..protocol.run_record import Failure
from .process import ChildOutcome
from .ranks import first_failed_worker, heartbeat_note, peer_lost, root_record

__all__ = ["DISK_FULL_PATTERNS", "DISK_FULL_PREFIX", "TRACEBACK_HEADER", "USAGE_EXIT_CODE", "classify",
           "classify_outcome", "final_exception", "final_oom", "find_disk_full", "find_usage_error"]


# What a write to a full disk looks like from Python (OSError), safetensors (Rust io error)
# and torch.save (PytorchStreamWriter): ENOSPC, EDQUOT and EFBIG (RLIMIT_FSIZE).
DISK_FULL_PATTERNS = (
    r"No space left on device",
    r"\[Errno 28\]",
    r"os error 28",
    r"Disk quota exceeded",
    r"\[Errno 122\]",
    r"File too large",
    r"\[Errno 27\]",
    r"PytorchStreamWriter failed writing file",
)
_DISK_FULL_RE = re.compile("|".join(DISK_FULL_PATTERNS), re.IGNORECASE)
DISK_FULL_PREFIX = "disk full"


def find_disk_full(text: str) -> str | None:
    """The first line of ``text`` saying a write failed for lack of space, or None."""
    for line in text.splitlines():
        if _DISK_FULL_RE.search(line):
            return line.strip()
    return None


def _disk_full(failure: Failure, evidence: str) -> Failure:
    line = find_disk_full(f"{failure.detail}\n{evidence}")
    if failure.kind is not FailureKind.CRASH or line is None:
        return failure
    during = "" if failure.phase is Phase.UNKNOWN else f" during {failure.phase.value}"
    return dataclasses.replace(failure, detail=(
        f"{DISK_FULL_PREFIX}{during}: {line[:300]} — free space on the checkpoint filesystem (or raise the "
        "quota / file-size limit), then rerun `oomguard run --run-dir DIR`"))


TRACEBACK_HEADER = "Traceback (most recent call last):"


def final_exception(text: str) -> tuple[int, str] | None:
    """(line index, text) of the exception line that ends the LAST traceback in ``text``, or None.

    Python prints the frames indented under the header, then the exception at column 0; in a
    chain ("During handling of the above exception…") the last traceback is the one that killed it.
    """
    lines = text.splitlines()
    headers = [i for i, ln in enumerate(lines) if ln.strip() == TRACEBACK_HEADER]
    if not headers:
        return None
    for i in range(headers[-1] + 1, len(lines)):
        if lines[i].strip() and not lines[i][0].isspace():
            return i, lines[i].strip()
    return None  # the tail ends inside the frames: cut off before the exception line


def final_oom(text: str) -> str | None:
    """The OOM line that ended the child, or None (defect 9).

    A caught, harmless "CUDA out of memory" earlier in the tail must not outrank the exception that
    really ended the process: with a traceback, it is an OOM only when the last traceback's own
    exception line is one, or an OOM line comes after that traceback (bitsandbytes' native
    ``Error out of memory at line N`` is printed, then C ``exit(1)``: no traceback of its own).
    Without a traceback, the first OOM line is the evidence (as before).
    """
    last = final_exception(text)
    if last is None:
        return find_oom(text)
    index, line = last
    if find_oom(line):
        return line
    return find_oom("\n".join(text.splitlines()[index + 1:]))


_USAGE_RE = re.compile(r"^\s*usage:\s", re.IGNORECASE | re.MULTILINE)
_PARSER_ERROR_RE = re.compile(r"^(?:\S+: )?error: .+$|^Error: .+$", re.MULTILINE)
USAGE_EXIT_CODE = 2  # argparse, click and typer exit 2 on a usage error


def find_usage_error(text: str) -> str | None:
    """The argument parser's own complaint (argparse ``prog: error: ...``, click ``Error: ...``)
    when ``text`` holds a usage message, else None."""
    if not _USAGE_RE.search(text):
        return None
    errors = _PARSER_ERROR_RE.findall(text)
    return errors[-1].strip()[:500] if errors else None


def _usage(outcome: ChildOutcome, last_step: int | None) -> Failure | None:
    """A command line its own parser rejects, before any step: deterministic, never retried."""
    if outcome.exit_code != USAGE_EXIT_CODE or outcome.signal is not None or last_step is not None:
        return None
    line = find_usage_error(outcome.stderr_tail)
    if line is None:
        return None
    return Failure(kind=FailureKind.CRASH, step=None, phase=Phase.STARTUP, usage=True,
                   detail=f"the command's argument parser rejected it: {line}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def _crash_detail(outcome: ChildOutcome) -> str:
    tail = _last_line(outcome.stderr_tail)
    if outcome.signal is not None:
        known = outcome.signal in _signal.Signals._value2member_map_
        name = _signal.Signals(outcome.signal).name if known else outcome.signal
        return f"killed by {name}" + (f"; last stderr line: {tail}" if tail else "")
    return tail or f"exit code {outcome.exit_code} with no stderr"


def _from_record(rec: ErrorRecord) -> Failure:
    return Failure(kind=rec.kind, step=rec.step, phase=rec.phase, detail=rec.detail[:500], rank=rec.rank)


def classify_outcome(outcome: ChildOutcome, records: Sequence[ErrorRecord], *, host_oom_percent: float,
                     last_step: int | None = None) -> Failure | None:
    """How a child ended, as a Failure; None when it succeeded. ``last_step``: the newest step seen
    (heartbeat/checkpoints). (The child classifies an exception with ``guard``'s own rule; this one
    reads what the child left: its records, exit code, signal and stderr.)"""
    if outcome.exit_code == 0 and not outcome.hung:
        return None
    root = root_record(records)
    if root is not None and not peer_lost(root):  # before the hang check: a child that wrote its record
        # and then went quiet (emergency save, torch teardown) was already dying of what the record says
        failure = _disk_full(_from_record(root), root.traceback)
        if outcome.lingered:  # peers blocked in a collective were stopped by the supervisor: said once, here
            failure = dataclasses.replace(failure, detail=f"{failure.detail}\n[oomguard: {outcome.lingered}]")
        return failure
    if outcome.hung:
        return Failure(kind=FailureKind.HANG, step=last_step, phase=Phase.UNKNOWN,
                       detail="no heartbeat within hang_timeout_s; the process group was killed"
                       + heartbeat_note(outcome.heartbeat_ages))
    worker = first_failed_worker(outcome.stderr_tail)  # a launcher's own report, when no record says more
    rank = worker.rank if worker else (root.rank if root else 0)
    killed = outcome.signal or (worker.signal if worker else None)
    if killed == _signal.SIGKILL and outcome.host_mem_peak_percent >= host_oom_percent:
        return Failure(kind=FailureKind.HOST_OOM, step=last_step, rank=rank, detail=(
            f"SIGKILL while host memory was {outcome.host_mem_peak_percent:.0f}% used "
            f"(threshold {host_oom_percent:.0f}%): the kernel's OOM killer, most likely"))
    oom_line = final_oom(outcome.stderr_tail)
    if oom_line:
        return Failure(kind=FailureKind.CUDA_OOM, step=last_step, rank=rank, detail=oom_line[:500])
    if root is not None:  # only a peer-lost symptom was recorded: still the best words we have
        return _disk_full(_from_record(root), root.traceback)
    usage = _usage(outcome, last_step)
    if usage is not None:
        return usage
    detail = _crash_detail(outcome) if worker is None else f"{worker.describe()}; {_crash_detail(outcome)}"
    crash = Failure(kind=FailureKind.CRASH, step=last_step, rank=rank, detail=detail[:800])
    return _disk_full(crash, outcome.stderr_tail)


classify = classify_outcome  # the former name
