"""The guard's own warnings: said by oomguard, attributed to oomguard, once per run.

A warning the guard raises from inside a Trainer callback would be attributed by ``stacklevel`` to
transformers' callback dispatcher (``trainer_callback.py``) and repeated by every attempt's fresh
process. :func:`warn_once` names the oomguard line that warned (``stacklevel`` counts from its
caller), uses its own category (:class:`OomguardWarning`, a ``RuntimeWarning``: filter it with
``warnings.filterwarnings("ignore", category=OomguardWarning)``), and remembers each key in
``<run_dir>/guard-warnings.txt`` so a later attempt of the same run stays quiet.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

from oomguard import protocol

__all__ = ["OomguardWarning", "WARNED_FILE", "warn_once"]

WARNED_FILE = "guard-warnings.txt"  # under the run dir: the keys already warned in this run, one a line
_warned: set[str] = set()  # this process


class OomguardWarning(RuntimeWarning):
    """A warning of oomguard's guard (not of the training script or its libraries)."""


def _warned_in_run(run_dir: Path, key: str) -> bool:
    try:
        return key in (run_dir / WARNED_FILE).read_text().splitlines()
    except OSError:
        return False


def _remember(run_dir: Path, key: str) -> None:
    try:
        fd = os.open(run_dir / WARNED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{key}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass  # at worst the next attempt says it again


def warn_once(key: str, message: str, *, stacklevel: int = 1, environ: Mapping[str, str] = os.environ) -> bool:
    """Warn ``message`` unless ``key`` was warned already in this process or this run; True if it warned.

    ``stacklevel`` 1 names the line that called :func:`warn_once`, 2 its caller, and so on.
    """
    if key in _warned:
        return False
    _warned.add(key)
    raw = environ.get(protocol.ENV_RUN_DIR, "").strip()
    run_dir = Path(raw) if raw else None
    if run_dir is not None and _warned_in_run(run_dir, key):
        return False
    text = message if message.startswith("oomguard") else f"oomguard: {message}"
    warnings.warn(text, OomguardWarning, stacklevel=stacklevel + 1)
    if run_dir is not None:
        _remember(run_dir, key)
    return True
