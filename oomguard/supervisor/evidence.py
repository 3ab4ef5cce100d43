"""What an attempt left, read once: its failure, and the :class:`~oomguard.policy.Evidence` that
``decide()`` weighs. Reads the run dir; changes nothing.

- :func:`attempt_failure`: how a child ended, as a ``Failure`` (``classify``), with the memory growth
  the child saw attached for every OOM kind (a leak shows in any of them);
- :func:`gather_evidence`: the history, this run's checkpoints (complete or not), every rank's error
  record (root cause first), the data profile, the recipe observed, the device's capabilities, which
  knobs a change can reach (and which none can now: a LoRA rank on a sharded checkpoint), the wall
  clock used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..policy import OOM_KINDS, CheckpointInfo, Evidence, Failure, device_capabilities
from ..protocol import ERROR_JSON, KNOB_LORA_ALPHA, KNOB_LORA_R, ErrorRecord, read_error_records
from .checkpoints import WEIGHT_FILES, CheckpointScan
from .classify import classify_outcome
from .culprit import culprit_views
from .history import attempt_views, data_profile, memory_growth
from .journal import Journal
from .process import ChildOutcome
from .ranks import root_record
from .resume_point import CheckpointSurvey
from .sharded import find_layout
from .spec import RunSpec

__all__ = ["attempt_failure", "error_records", "gather_evidence", "held_knobs", "root_first"]


def error_records(journal: Journal, attempt: int) -> list[ErrorRecord]:
    """Every rank's error record of ``attempt``, earliest first (none: the child wrote none)."""
    return read_error_records(journal.attempt_dir(attempt) / ERROR_JSON)


def attempt_failure(spec: RunSpec, outcome: ChildOutcome, records: Sequence[ErrorRecord],
                    events: list[dict[str, Any]], started: float, last_step: int | None) -> Failure | None:
    """How the attempt that started at ``started`` failed (None: it succeeded)."""
    failure = classify_outcome(outcome, records, host_oom_percent=spec.policy.limits.host_oom_percent,
                               last_step=last_step)
    if failure is not None and failure.kind in OOM_KINDS:
        failure = dataclasses.replace(failure, memory_growth=memory_growth(events, started))
    return failure


def root_first(records: Sequence[ErrorRecord]) -> list[ErrorRecord]:
    """The records with the root cause (``ranks.root_record``) first, the others in time order."""
    root = root_record(records)
    return ([root] if root else []) + [r for r in records if r is not root]


def held_knobs(complete: Sequence[CheckpointScan]) -> dict[str, str]:
    """Knobs no change of which can land on the next resume, whatever the command takes, and why: the
    LoRA rank cut reads the adapter's own weights file, which a sharded (FSDP/DeepSpeed) save does not
    write (taking the rung would crash the resume, and the sound checkpoint would be set aside)."""
    newest = max(complete, key=lambda s: s.step, default=None)
    layout = find_layout(newest.path) if newest is not None else None
    if layout is None or any((newest.path / name).is_file() for name in WEIGHT_FILES):
        return {}
    why = (f"the checkpoint to resume from ({newest.path.name}) is {layout.kind}-sharded: the LoRA rank cut "
           "reads adapter_model.safetensors, which a sharded save does not write (save with FULL_STATE_DICT "
           "to allow it)")
    return {KNOB_LORA_R: why, KNOB_LORA_ALPHA: why}


def gather_evidence(spec: RunSpec, journal: Journal, survey: CheckpointSurvey, events: list[dict[str, Any]],
                    now: float) -> Evidence:
    """Everything ``decide()`` weighs after the last attempt failed, read once."""
    record = journal.record
    last = record.attempts[-1]
    return Evidence(
        attempts=culprit_views(attempt_views(record), record, spec.run_dir),
        checkpoints=[CheckpointInfo(str(s.path), s.step, s.complete) for s in survey.own],
        ranks=root_first(error_records(journal, last.n)),
        profile=data_profile(events),
        observed=last.observed,
        device=device_capabilities(spec.gpu),
        reach={k: v for k, v in record.capabilities.items() if k not in record.unavailable},
        held=held_knobs(survey.complete),
        elapsed_s=now - record.started,
        world_size=spec.world_size,
    )
