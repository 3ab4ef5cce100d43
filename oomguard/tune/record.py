"""The probe's contract: what the supervisor side asks (``OOMGUARD_PROBE``) and what the child
writes (``<run-dir>/probe.json``). Stdlib only: the in-child probe and the pure fit both import it.

The env name and the file name live here, not in :mod:`oomguard.protocol` (issue 18; the lead may
move them there).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ENV_PROBE", "PROBE_JSON", "PROBE_SCHEMA", "ProbePoint", "ProbeRecord", "ProbeSpec", "read_probe"]

ENV_PROBE = "OOMGUARD_PROBE"  # JSON ProbeSpec; set: Trainer.train() probes instead of training, then exits 0
PROBE_JSON = "probe.json"
PROBE_SCHEMA = "oomguard.probe/1"


@dataclass(frozen=True)
class ProbeSpec:
    """What to probe. ``batches`` None: 1, 2, 4 … up to the effective batch (those that divide it)
    and the command's own batch; ``lengths``: shares of the worst row's length (1.0 first)."""

    batches: tuple[int, ...] | None = None
    lengths: tuple[float, ...] = (1.0, 0.5, 0.25)
    steps: int = 2  # optimizer steps per configuration; the last one is timed
    accumulation: int = 1  # micro-steps per probe optimizer step (memory does not depend on it)
    max_batch: int = 64  # never probe a per-device batch above this

    def __post_init__(self) -> None:
        if self.steps < 1 or self.accumulation < 1 or self.max_batch < 1:
            raise ValueError(f"probe spec: steps ({self.steps}), accumulation ({self.accumulation}) and max_batch "
                             f"({self.max_batch}) must be >= 1; fix {ENV_PROBE}")
        if not self.lengths or any(not 0 < s <= 1 for s in self.lengths):
            raise ValueError(f"probe spec: lengths {list(self.lengths)} must be shares in (0, 1]; fix {ENV_PROBE}")
        if self.batches is not None and (not self.batches or any(b < 1 for b in self.batches)):
            raise ValueError(f"probe spec: batches {list(self.batches)} must be >= 1; fix {ENV_PROBE}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ProbeSpec":
        """``{}`` (or "1") is the default spec; an unknown key is an error that names it."""
        text = text.strip()
        data = {} if text in ("", "1", "true") else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{ENV_PROBE}={text!r}: expected a JSON object such as {{\"steps\": 2}}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{ENV_PROBE}: unknown keys {unknown}; known: {sorted(known)}")
        if data.get("batches") is not None:
            data["batches"] = tuple(int(b) for b in data["batches"])
        if "lengths" in data:
            data["lengths"] = tuple(float(s) for s in data["lengths"])
        return cls(**data)


@dataclass(frozen=True)
class ProbePoint:
    """One probed configuration at the worst batch: ``batch`` copies of the longest row cut to
    ``length``. ``tokens``: the most tokens one micro-batch really held (``input_ids`` as the model
    saw them, padding included); peaks in bytes as torch reports them, None without CUDA."""

    batch: int
    length: int
    fits: bool
    tokens: int | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    step_s: float | None = None  # wall seconds of the timed optimizer step
    tokens_per_s: float | None = None
    error: str | None = None  # why it did not fit (first line of the OOM)
    implied: bool = False  # not run: a smaller configuration at a length not longer already did not fit

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbePoint":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class ProbeRecord:
    """``probe.json``. ``requested``: the recipe the child really runs (observed), at least
    ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``max_seq_length`` (None:
    the command sets none), ``world_size``. ``worst_row``: tokens of the longest training row."""

    device: str
    cuda: bool
    total_bytes: int | None
    vram_limit: int | None
    requested: dict[str, Any]
    worst_row: int
    rows: int
    packed: bool
    points: tuple[ProbePoint, ...]
    capacity: int | None = None  # bytes the allocator may hold (the emulated cap's fraction × total), if known
    profile: dict[str, Any] = field(default_factory=dict)  # row lengths: count, quantiles [[q, len]], max_len
    base_allocated: int | None = None  # bytes held before the first probe step (weights, adapter)
    wall_s: float = 0.0
    date: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    schema: str = PROBE_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeRecord":
        if data.get("schema") != PROBE_SCHEMA:
            raise ValueError(f"not a probe record: schema {data.get('schema')!r}, expected {PROBE_SCHEMA!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in data.items() if k in known}
        body["points"] = tuple(ProbePoint.from_dict(p) for p in data.get("points", ()))
        body["notes"] = tuple(data.get("notes", ()))
        return cls(**body)


def read_probe(path: str | Path) -> ProbeRecord:
    """``probe.json`` (or a run dir holding one) as a ProbeRecord; the error names the file."""
    path = Path(path)
    if path.is_dir():
        path = path / PROBE_JSON
    try:
        return ProbeRecord.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no probe record; the probe child wrote none (see its stderr.log)") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable probe record: {exc}") from None
