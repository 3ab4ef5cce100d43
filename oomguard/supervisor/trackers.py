"""One tracker run across attempts: hand the run an earlier attempt wrote to the next one.

The child reports the runs its ``report_to`` integrations write (``tracker_observed``: TensorBoard
log dir, W&B run id, MLflow run id; ``oomguard/guard/trackers.py``). A restarted child would open
a new run each (TensorBoard's default dir has the launch time in its name, W&B and MLflow make a
new id), so from attempt 2 on the supervisor sets each tracker's own variable to the run already
open. Attempt 1 gets nothing (it is the user's command); a variable the user set is never
replaced. Pure: events in, environment additions out.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..protocol import Event

__all__ = ["TRACKER_ENV", "tracker_env"]

# reported field -> the variables that make the tracker continue that run (name, value or None = the field)
TRACKER_ENV: dict[str, tuple[tuple[str, str | None], ...]] = {
    "tensorboard_dir": (("TENSORBOARD_LOGGING_DIR", None),),  # transformers' TensorBoardCallback reads it
    "wandb_run_id": (("WANDB_RUN_ID", None), ("WANDB_RESUME", "allow")),  # wandb.init reads both
    "mlflow_run_id": (("MLFLOW_RUN_ID", None),),  # transformers' MLflowCallback reattaches to it
}


def tracker_env(events: Iterable[Mapping[str, Any]], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables the next attempt needs to write into the runs the first reporting attempt opened."""
    first: dict[str, str] = {}
    for event in events:
        if event.get("event") != Event.TRACKER_OBSERVED.value or event.get("rank", 0) != 0:
            continue
        for field in TRACKER_ENV:
            if isinstance(event.get(field), str) and field not in first:
                first[field] = event[field]
    out: dict[str, str] = {}
    for field, value in first.items():
        names = TRACKER_ENV[field]
        if names[0][0] in environ:  # the user chose the run: theirs stands
            continue
        for name, fixed in names:
            if name not in environ:
                out[name] = fixed if fixed is not None else value
    return out
