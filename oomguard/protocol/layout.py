"""The run directory's file names (contract, DESIGN §3) and the one per-rank file-name scheme."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["RUN_JSON", "EVENTS_JSONL", "POLICY_COPY", "ATTEMPTS_DIR", "HEARTBEAT", "LEDGER_DIR", "STDOUT_LOG",
           "STDERR_LOG", "KNOBS_JSON", "ERROR_JSON", "LOCK_FILE", "CKPT_TRAINER_STATE", "CKPT_TRAINING_ARGS",
           "rank_file", "rank_of_file", "error_file_for_rank", "attempt_dir", "ledger_file"]

RUN_JSON = "run.json"
EVENTS_JSONL = "events.jsonl"
POLICY_COPY = "policy.yaml"
ATTEMPTS_DIR = "attempts"
HEARTBEAT = "heartbeat"
LEDGER_DIR = "ledger"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
KNOBS_JSON = "knobs.json"
ERROR_JSON = "error.json"
LOCK_FILE = ".lock"
# Files of an HF Trainer checkpoint that both sides read
CKPT_TRAINER_STATE = "trainer_state.json"  # written last; holds global_step
CKPT_TRAINING_ARGS = "training_args.bin"


def rank_file(path: str | os.PathLike[str], rank: int) -> Path:
    """The one per-rank scheme: rank 0 uses ``path`` itself, rank k>0 ``<stem>.rank<k><suffix>`` beside it
    (``error.json`` -> ``error.rank2.json``, ``heartbeat`` -> ``heartbeat.rank2``)."""
    p = Path(path)
    return p if rank == 0 else p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def rank_of_file(name: str, base: str) -> int | None:
    """The rank whose :func:`rank_file` of ``base`` is called ``name``: 0 for ``base`` itself, None for
    another file (``rank_of_file("heartbeat.rank3", "heartbeat") == 3``)."""
    if name == base:
        return 0
    stem, suffix = os.path.splitext(base)
    m = re.fullmatch(re.escape(stem) + r"\.rank([1-9]\d*)" + re.escape(suffix), name)
    return int(m.group(1)) if m else None


error_file_for_rank = rank_file  # the name callers know: rank k writes ``error.rank<k>.json``


def attempt_dir(run_dir: str | os.PathLike[str], attempt: int) -> Path:
    """``<run_dir>/attempts/003``: where attempt 3's logs, knobs and error records live."""
    return Path(run_dir) / ATTEMPTS_DIR / f"{attempt:03d}"


def ledger_file(run_dir: str | os.PathLike[str], rank: int, kind: str = "") -> Path:
    """``<run_dir>/ledger/rank<k>.jsonl`` (samples seen), ``rank<k>.<kind>.jsonl`` for another ledger."""
    middle = f".{kind}" if kind else ""
    return Path(run_dir) / LEDGER_DIR / f"rank{rank}{middle}.jsonl"
