"""Which rank of a multi-process child (torchrun, accelerate) failed first, and why. Pure.

Evidence, best first: the ranks' own error records (``protocol.read_error_records``, earliest
first), where a rank that only reports that a peer went away is a symptom, not the cause;
then the launcher's own report (torchrun prints a "Root Cause (first observed failure)"
block naming the rank, its exit code and the signal that ended it).
"""

from __future__ import annotations

import dataclasses
import re
import signal as _signal
from typing import Any, Mapping, Sequence

from ..protocol import HEARTBEAT, ErrorRecord, FailureKind, rank_of_file

__all__ = ["PEER_LOST_PATTERNS", "peer_lost", "root_record", "WorkerExit", "first_failed_worker", "heartbeat_note",
           "rank_of_heartbeat", "root_cause_text", "rank_records"]

# What a rank reports when a *peer* died under it (gloo, NCCL, the c10d store) or the launcher
# stopped it: a symptom, never the root cause while another rank's record says why it died.
PEER_LOST_PATTERNS = (
    r"Connection closed by peer",
    r"Connection reset by peer",
    r"remote worker crashing",
    r"Broken pipe",
    r"NCCL communicator was aborted",
    r"ProcessGroupNCCL.*(?:Watchdog|timeout|aborted)",
    r"Watchdog caught collective operation timeout",
    r"DistBackendError",
    r"DistNetworkError",
    r"TCPStore.*(?:failed|timed out|closed)",
)
_PEER_LOST_RE = re.compile("|".join(PEER_LOST_PATTERNS), re.IGNORECASE)

# torchrun (torch.distributed.elastic ChildFailedError), e.g.
#   Root Cause (first observed failure):
#   [0]:
#     rank      : 1 (local_rank: 1)
#     exitcode  : -9 (pid: 4242)
_ROOT_BLOCK_RE = re.compile(
    r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+)(?:\s*\(local_rank:\s*(\d+)\))?.*?"
    r"exitcode\s*:\s*(-?\d+)", re.DOTALL)


def peer_lost(record: ErrorRecord) -> bool:
    """True for a crash record that only says a peer rank went away."""
    return record.kind is FailureKind.CRASH and bool(_PEER_LOST_RE.search(f"{record.detail}\n{record.traceback}"))


def root_record(records: Sequence[ErrorRecord]) -> ErrorRecord | None:
    """The root cause among the ranks' records, given earliest first: the earliest that is not a
    peer-lost symptom; the earliest of all when every one is; None without records."""
    return next((r for r in records if not peer_lost(r)), records[0] if records else None)


@dataclasses.dataclass(frozen=True)
class WorkerExit:
    """The first worker a launcher saw fail."""

    rank: int
    local_rank: int | None
    exit_code: int  # as the launcher reports it: negative for a signal (-9: SIGKILL)

    @property
    def signal(self) -> int | None:
        return -self.exit_code if self.exit_code < 0 else None

    def describe(self) -> str:
        if self.signal is not None:
            name = _signal.Signals(self.signal).name if self.signal in _signal.Signals._value2member_map_ \
                else str(self.signal)
            how = f"was killed by {name}"
        else:
            how = f"exited with code {self.exit_code}"
        return f"rank {self.rank} {how} first (as the launcher reports)"


def first_failed_worker(stderr: str) -> WorkerExit | None:
    """The launcher's "first observed failure", read from the child's stderr, or None."""
    found = None
    for m in _ROOT_BLOCK_RE.finditer(stderr):
        found = m  # the last block: a restarting launcher prints one per round
    if found is None:
        return None
    local = found.group(2)
    return WorkerExit(rank=int(found.group(1)), local_rank=int(local) if local else None,
                      exit_code=int(found.group(3)))


def heartbeat_note(ages: Mapping[int, float] | None) -> str:
    """Seconds since each rank's last heartbeat when a hang was declared. Which rank stopped
    first is not told by these: a rank waiting in a collective for a hung peer stops beating too."""
    if not ages or len(ages) < 2:
        return ""
    return " (seconds since each rank's last heartbeat: " + ", ".join(
        f"rank {r} {a:.0f}" for r, a in sorted(ages.items())) + ")"


def rank_of_heartbeat(name: str) -> int | None:
    """``heartbeat`` -> 0, ``heartbeat.rank3`` -> 3, anything else None (protocol.rank_of_file)."""
    return rank_of_file(name, HEARTBEAT)


def root_cause_text(failure: Mapping[str, Any] | None, world_size: int) -> str | None:
    """"rank 1: cuda_oom at step 3" for a multi-process run, "cuda_oom at step 3" for one process."""
    if not failure:
        return None
    text = f"{failure['kind']} at step {failure.get('step')}"
    return f"rank {failure.get('rank', 0)}: {text}" if world_size > 1 else text


def rank_records(records: Sequence[ErrorRecord]) -> list[dict[str, Any]]:
    """Every rank's record, root cause first, for the journal."""
    root = root_record(records)
    ordered = ([root] if root else []) + [r for r in records if r is not root]
    return [{"rank": r.rank, "kind": r.kind.value, "step": r.step, "phase": r.phase.value, "time": r.time,
             "symptom": peer_lost(r)} for r in ordered]
