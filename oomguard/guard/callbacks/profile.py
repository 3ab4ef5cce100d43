"""DataProfileCallback: the token-length distribution of the training set, once at train begin."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from transformers import TrainerCallback

from oomguard.guard.writer import EventWriter

__all__ = ["DataProfileCallback", "dataset_lengths", "is_packed", "length_profile", "MAX_ROWS", "sample_indices"]

MAX_ROWS = 100_000  # rows read at most; larger sets are sampled with a fixed seed


def length_profile(lengths: Sequence[int], *, count: int | None = None) -> dict[str, Any]:
    """count, [q, length] at every 0.01, max, total tokens (scaled up when ``lengths`` is a sample)."""
    if len(lengths) == 0:
        return {"count": count or 0, "quantiles": [], "max_len": 0, "total_tokens": 0, "sampled": False}
    arr = np.asarray(lengths, dtype=np.int64)
    qs = np.round(np.linspace(0.0, 1.0, 101), 2)
    values = np.quantile(arr, qs, method="inverted_cdf")  # a length that occurs, not an interpolation
    n = count if count is not None else len(arr)
    total = int(arr.sum()) if n == len(arr) else int(round(arr.mean() * n))
    return {"count": int(n), "quantiles": [[float(q), int(v)] for q, v in zip(qs, values)],
            "max_len": int(arr.max()), "total_tokens": total, "sampled": n != len(arr)}


def sample_indices(n: int, limit: int = MAX_ROWS) -> list[int]:
    if n <= limit:
        return list(range(n))
    return sorted(random.Random(0).sample(range(n), limit))


def is_packed(dataset: Any) -> bool:
    """TRL's packed rows carry ``seq_lengths``: each row is max_length long, whatever its samples."""
    return "seq_lengths" in (getattr(dataset, "column_names", None) or ())


def dataset_lengths(dataset: Any, limit: int = MAX_ROWS) -> tuple[list[int], int] | None:
    """(input_ids lengths of up to ``limit`` rows, row count), or None when it has no length/ids."""
    try:
        n = len(dataset)
    except TypeError:
        return None  # an iterable dataset: reading it would consume it
    idx = sample_indices(n, limit)
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):  # datasets.Dataset: columnar read
        if "input_ids" not in dataset.column_names:
            return None
        rows = dataset.select(idx) if len(idx) < n else dataset
        if "seq_lengths" in dataset.column_names:
            # packed (TRL): a row holds several samples; a max_seq_length cut acts on the samples,
            # so profile those (each already cut to the current max_length by TRL)
            lengths = [int(x) for row in rows["seq_lengths"] for x in row]
            return lengths, round(len(lengths) * n / max(1, len(rows)))
        return [len(x) for x in rows["input_ids"]], n
    lengths = []
    for i in idx:
        row = dataset[i]
        if not isinstance(row, dict) or "input_ids" not in row:
            return None
        lengths.append(len(row["input_ids"]))
    return lengths, n


class DataProfileCallback(TrainerCallback):
    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0, dataset: Any = None):
        self.journal = EventWriter(run_dir, rank)
        self.rank = rank
        self.dataset = dataset
        self.profile: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.rank != 0 or self.profile is not None:
            return
        dataset = self.dataset if self.dataset is not None else getattr(train_dataloader, "dataset", None)
        found = dataset_lengths(dataset) if dataset is not None else None
        if found is None:
            return
        lengths, n = found
        self.profile = {**length_profile(lengths, count=n), "packed": is_packed(dataset)}
        self.journal.emit("data_profile", step=state.global_step, **self.profile)
