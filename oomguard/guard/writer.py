"""The child's side of the run journal: events and per-rank files, a no-op outside oomguard.

:class:`EventWriter` (formerly ``guard.journal.Journal``): only the child's appender; the run's state and
journal are the supervisor's ``oomguard.supervisor.journal.Journal``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from oomguard import protocol

__all__ = ["EventWriter"]

log = logging.getLogger("oomguard.guard")


class EventWriter:
    """Appends events to ``<run_dir>/events.jsonl`` tagged with the rank; silent without a run dir."""

    def __init__(self, run_dir: str | Path | None, rank: int = 0):
        self.run_dir = Path(run_dir) if run_dir else None
        self.rank = rank
        # kept open: a step's event costs no path lookup (protocol.Appender)
        self._file = protocol.Appender(self.run_dir / protocol.EVENTS_JSONL) if self.run_dir else None

    @property
    def active(self) -> bool:
        return self.run_dir is not None

    def emit(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        try:
            self._file.append(protocol.event_record(event, rank=self.rank, **fields))
        except OSError as exc:
            # A full disk must not kill training; the supervisor still has exit code and stderr.
            log.warning("oomguard: could not write event %r to %s: %s", event, self.run_dir, exc)

    def rank_file(self, name: str) -> Path | None:
        """``<run_dir>/<name>`` on rank 0, ``<run_dir>/<stem>.rank<k><suffix>`` on rank k."""
        if self.run_dir is None:
            return None
        return protocol.error_file_for_rank(self.run_dir / name, self.rank)

