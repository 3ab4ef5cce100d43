"""oomguard's own failure inside a child must never be what ends the user's run.

A bootstrap hook or patch that raises (an oomguard bug, or a stack it does not know) is caught here:
the error is said once on stderr, journaled as ``guard_degraded`` (part, error, what is lost), and the
user's code goes on as it would without that part. A CUDA out-of-memory error is never swallowed: it
is the run's failure, not oomguard's. Standard library only (it runs inside import hooks).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator

from oomguard import protocol

__all__ = ["failsafe", "report_degraded"]

_said: set[str] = set()


def report_degraded(part: str, exc: BaseException, consequence: str) -> None:
    """Say that ``part`` failed with ``exc`` (stderr, once a process; the run's journal, rank 0)."""
    error = f"{type(exc).__name__}: {exc}"[:500]
    if part not in _said:
        _said.add(part)
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" at {where.filename}:{where.lineno}" if where else ""
        print(f"oomguard: {part} failed ({error}{at}); {consequence}. Please report this to oomguard.",
              file=sys.stderr, flush=True)
    run_dir = os.environ.get(protocol.ENV_RUN_DIR, "").strip()
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")).strip() or "0"
    if run_dir and rank == "0":
        try:
            protocol.emit_event(run_dir, protocol.Event.GUARD_DEGRADED.value, part=part, error=error,
                                consequence=consequence)
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def failsafe(part: str, consequence: str) -> Iterator[None]:
    """Run the block; an exception of oomguard's own (not an OOM) is reported and swallowed."""
    try:
        yield
    except Exception as exc:
        if protocol.is_oom(type(exc).__name__, str(exc)):
            raise
        report_degraded(part, exc, consequence)
