"""Find the checkpoints a run can resume from, newest complete first. Reads, never deletes.

HF writes a checkpoint file by file, ``trainer_state.json`` last, nothing atomic, and
``get_last_checkpoint`` validates nothing (DESIGN §7): a kill mid-save leaves a directory
that looks like a checkpoint. We check it before trusting it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin",
                "pytorch_model.bin", "model.safetensors.index.json")
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt")


@dataclasses.dataclass(frozen=True)
class CheckpointScan:
    path: Path
    step: int
    problems: tuple[str, ...]  # empty = complete
    warnings: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.problems


def safetensors_problem(path: Path) -> str | None:
    """None if the header parses and the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                return f"{path.name} header length {header_len} exceeds the file ({size} bytes)"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as exc:
        return f"{path.name} unreadable: {exc}"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    if size < needed:
        return f"{path.name} is truncated ({size} of {needed} bytes)"
    return None


def inspect_checkpoint(path: Path) -> CheckpointScan:
    step = int(_CKPT_RE.match(path.name).group(1))  # type: ignore[union-attr]
    problems: list[str] = []
    warnings: list[str] = []
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
        if int(state.get("global_step", -1)) != step:
            problems.append(f"trainer_state.json says global_step {state.get('global_step')}, name says {step}")
    except (OSError, ValueError) as exc:
        problems.append(f"trainer_state.json missing or unreadable ({exc.__class__.__name__})")
    weights = [path / n for n in WEIGHT_FILES if (path / n).exists()]
    if not weights:
        problems.append(f"no weights file (looked for {', '.join(WEIGHT_FILES)})")
    for w in weights:
        if w.suffix == ".safetensors" and (p := safetensors_problem(w)):
            problems.append(p)
    for name in TRAINING_STATE_FILES:
        if not (path / name).exists():
            warnings.append(f"{name} missing: the optimizer/LR schedule restarts from scratch")
        elif (path / name).stat().st_size == 0:
            problems.append(f"{name} is empty")
    return CheckpointScan(path=path, step=step, problems=tuple(problems), warnings=tuple(warnings))


def scan_checkpoints(directory: str | Path | None) -> list[CheckpointScan]:
    """Every ``checkpoint-N`` under ``directory``, newest first."""
    if not directory or not Path(directory).is_dir():
        return []
    found = [inspect_checkpoint(p) for p in Path(directory).iterdir()
             if p.is_dir() and _CKPT_RE.match(p.name)]
    return sorted(found, key=lambda c: c.step, reverse=True)
