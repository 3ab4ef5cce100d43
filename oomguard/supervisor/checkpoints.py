"""Find the checkpoints a run can resume from, newest complete first. Never deletes.

HF writes a checkpoint file by file, ``trainer_state.json`` last, nothing atomic, and
``get_last_checkpoint`` validates nothing (DESIGN §7): a kill mid-save leaves a directory
that looks like a checkpoint. We check it before trusting it: the expected files present,
``trainer_state.json`` parses and names the same step, safetensors headers read and the
file is as long as they say, torch's zip files (``optimizer.pt`` …) end in a central directory and
every member matches its CRC. Sharded checkpoints (FSDP's DCP folders, DeepSpeed's ``global_step<N>``)
are checked shard by shard (:mod:`oomguard.supervisor.sharded`).

Checkpoints written after a NaN are quarantined: moved to ``<checkpoints>/quarantine/``
(out of reach of a resume and of HF's ``save_total_limit`` rotation), named in the journal.
An incomplete checkpoint that a resume skips is moved there too (``checkpoint-N.incomplete-<attempt>``):
the resumed run writes ``checkpoint-N`` again, and HF would save into the old folder, leaving stale files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

from ..protocol import CKPT_TRAINER_STATE, CKPT_TRAINING_ARGS, read_error_records
from .sharded import find_layout, sharded_problems

__all__ = ["ADAPTER_CONFIG", "CheckpointScan", "MTIME_SLACK_S", "QUARANTINE_DIR", "Quarantined", "TORCH_FILES",
           "TRAINING_STATE_FILES", "WEIGHT_FILES", "checkpoint_step", "inspect_checkpoint", "move_aside",
           "move_aside_incomplete", "quarantine_after", "quarantine_after_nan", "quarantine_checkpoint",
           "safetensors_problem", "scan_checkpoints", "torch_file_problem", "written_since"]

_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")  # HF's PREFIX_CHECKPOINT_DIR-<global_step>
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin",
                "pytorch_model.bin", "model.safetensors.index.json")
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt")
# torch.save files a resume reads; since torch 1.6 each is a zip archive
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", CKPT_TRAINING_ARGS,
               "adapter_model.bin", "pytorch_model.bin")
ADAPTER_CONFIG = "adapter_config.json"
QUARANTINE_DIR = "quarantine"


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


def torch_file_problem(path: Path) -> str | None:
    """None unless ``path`` starts as a zip (torch.save) but is cut short or damaged inside.

    The end-of-central-directory check catches a cut; the CRC of every member
    (``ZipFile.testzip``) catches bytes damaged inside with the end record intact, which would
    otherwise pass here and crash the resume. Measured: 0.04 s for a 100 MB file from the page
    cache (~2.5 GB/s; a cold disk is read-bound), and each file is checked once per size and
    mtime (``_MEMBER_CHECKS``), so rescans cost nothing. A legacy (pickle) torch file is not a
    zip and is passed: we cannot check it cheaply.
    """
    try:
        with path.open("rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return None
        if not zipfile.is_zipfile(path):  # reads only the end-of-central-directory record
            return f"{path.name} is truncated ({path.stat().st_size} bytes, no zip central directory)"
        return _member_problem(path)
    except OSError as exc:
        return f"{path.name} unreadable: {exc}"


_MEMBER_CHECKS: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime_ns) -> problem


def _member_problem(path: Path) -> str | None:
    """The first zip member whose CRC does not match (or an unreadable archive), else None. Cached."""
    st = path.stat()
    key = (str(path.absolute()), st.st_size, st.st_mtime_ns)
    if key not in _MEMBER_CHECKS:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            problem = None if bad is None else f"{path.name} is corrupt inside: member {bad} fails its CRC check"
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
            problem = f"{path.name} is a damaged zip archive ({type(exc).__name__}: {exc})"
        _MEMBER_CHECKS[key] = problem
    return _MEMBER_CHECKS[key]


def _file_problems(path: Path, weights: list[Path]) -> list[str]:
    problems = []
    for w in weights:
        if w.suffix == ".safetensors" and (p := safetensors_problem(w)):
            problems.append(p)
    for name in TORCH_FILES:
        f = path / name
        if f.is_file() and f.stat().st_size > 0 and (p := torch_file_problem(f)):
            problems.append(p)
    return problems


def checkpoint_step(path: str | Path | None) -> int | None:
    """The step in a ``checkpoint-N`` folder name (None: no checkpoint, or another name). The one
    reading of a checkpoint's step on the supervisor side; ``trainer_state.json`` must agree with it
    (:func:`inspect_checkpoint` reports a mismatch as a problem)."""
    m = _CKPT_RE.match(Path(path).name) if path else None
    return int(m.group(1)) if m else None


def inspect_checkpoint(path: Path) -> CheckpointScan:
    step = checkpoint_step(path)
    if step is None:
        raise ValueError(f"{path} is not a checkpoint-N folder; pass one that scan_checkpoints found")
    problems: list[str] = []
    warnings: list[str] = []
    state_file = path / CKPT_TRAINER_STATE
    try:
        state = json.loads(state_file.read_text())
        if int(state.get("global_step", -1)) != step:
            problems.append(f"trainer_state.json says global_step {state.get('global_step')}, name says {step}")
    except (OSError, ValueError) as exc:
        problems.append(f"trainer_state.json missing or unreadable ({exc.__class__.__name__})")
    weights = [path / n for n in WEIGHT_FILES if (path / n).exists()]
    layout = find_layout(path)
    if not weights and not (layout and layout.holds_weights):
        problems.append(f"no weights file (looked for {', '.join(WEIGHT_FILES)}, and FSDP/DeepSpeed shard folders)")
    problems.extend(_file_problems(path, weights))
    if layout is not None:
        problems.extend(sharded_problems(layout, path, torch_file_problem))
    if any(w.name.startswith("adapter_model") for w in weights) and not (path / ADAPTER_CONFIG).is_file():
        # a warning, not a problem: PEFT needs it to load, but a hand-made checkpoint may carry the
        # config elsewhere (and the supervisor's fake child writes none)
        warnings.append(f"{ADAPTER_CONFIG} missing beside the adapter weights: PEFT cannot load it from here")
    for name in TRAINING_STATE_FILES:
        if name == "optimizer.pt" and layout is not None:
            continue  # the optimizer state is in the shard folders (optimizer_0/, global_step<N>/)
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
             if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda c: c.step, reverse=True)


@dataclasses.dataclass(frozen=True)
class Quarantined:
    step: int
    path: Path  # where it was
    moved_to: Path


def quarantine_after(directory: str | Path | None, last_good_step: int,
                     own: Callable[[CheckpointScan], bool] | None = None) -> list[Quarantined]:
    """Move every ``checkpoint-N`` with N > ``last_good_step`` to ``<directory>/quarantine/``. Never deletes.

    ``own``: which checkpoints this run wrote; another run's are left where they are (not ours to move).
    """
    moved = []
    for scan in scan_checkpoints(directory):
        if scan.step <= last_good_step or (own is not None and not own(scan)):
            continue
        moved.append(Quarantined(step=scan.step, path=scan.path, moved_to=quarantine_checkpoint(scan.path)))
    return moved


def quarantine_checkpoint(path: Path) -> Path:
    """Move checkpoint ``path`` to ``<its dir>/quarantine/<name>`` (a free name); OSError on failure."""
    target = _quarantine_target(path.parent, path.name)
    path.rename(target)
    return target


def _quarantine_target(directory: Path, name: str) -> Path:
    """A free path ``<directory>/quarantine/<name>`` (``.2``, ``.3`` … when taken: keep both)."""
    target = directory / QUARANTINE_DIR / name
    n = 1
    while target.exists():  # the same step quarantined before (a second NaN): keep both
        n += 1
        target = target.with_name(f"{name}.{n}")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def move_aside_incomplete(scan: CheckpointScan, attempt: int) -> Path:
    """Move a skipped (incomplete) checkpoint to ``quarantine/checkpoint-N.incomplete-<attempt>``. Never deletes.

    ``attempt`` is the last attempt that ran before the checkpoint was found incomplete.
    Raises OSError when the move fails (the caller journals it).
    """
    return move_aside(scan.path, f"incomplete-{attempt}")


def move_aside(path: Path, why: str) -> Path:
    """Move checkpoint ``path`` to ``quarantine/<name>.<why>`` (a free name). Never deletes; OSError on failure."""
    target = _quarantine_target(path.parent, f"{path.name}.{why}")
    path.rename(target)
    return target


# A filesystem stamps mtimes from a coarse clock (one kernel tick, ~4-10 ms, behind time.time()):
# a file written right after the run started may read as written just before it.
MTIME_SLACK_S = 0.05


def written_since(scan: CheckpointScan, since: float) -> bool:
    """True when the checkpoint's ``trainer_state.json`` (HF writes it last) is no older than ``since``."""
    try:
        return (scan.path / CKPT_TRAINER_STATE).stat().st_mtime >= since - MTIME_SLACK_S
    except OSError:  # no trainer_state.json: an interrupted save; its folder's mtime says when
        try:
            return scan.path.stat().st_mtime >= since - MTIME_SLACK_S
        except OSError:
            return False


def quarantine_after_nan(directory: str | Path | None, error_file: Path, failed_step: int | None,
                         emit: Callable[..., Any], own: Callable[[CheckpointScan], bool] | None = None
                         ) -> list[Quarantined]:
    """After a nan_loss attempt: quarantine checkpoints newer than the last finite step, one event each.
    (The loop does not call this: ``policy.decide()`` names the checkpoints in ``Decision.quarantine``
    and ``resume_point.set_aside`` moves them; this stays for direct callers, with the same rule.)

    The last finite step is the lowest any rank recorded (``last_finite_step``), else the
    failure's step; with neither, nothing is known to be bad and nothing moves.
    """
    finite = [r.last_finite_step for r in read_error_records(error_file) if r.last_finite_step is not None]
    last_good = min(finite) if finite else failed_step
    if last_good is None:
        return []
    moved = quarantine_after(directory, last_good, own)
    for q in moved:
        emit("checkpoint_quarantined", step=q.step, path=str(q.path), moved_to=str(q.moved_to),
             last_finite_step=last_good,
             reason=f"written after the last finite step {last_good}: its weights may hold the NaN update")
    return moved
