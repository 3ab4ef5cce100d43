"""Small text readers both sides share: sizes (``24GiB``) and the messages that mean a GPU OOM."""

from __future__ import annotations

import re

__all__ = ["parse_size", "OOM_PATTERNS", "find_oom", "is_oom"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "ki": 2**10,
               "m": 1000**2, "mb": 1000**2, "mib": 2**20, "mi": 2**20,
               "g": 1000**3, "gb": 1000**3, "gib": 2**30, "gi": 2**30,
               "t": 1000**4, "tb": 1000**4, "tib": 2**40, "ti": 2**40}


def parse_size(text: str, *, require_unit: bool = False) -> int:
    """'24GiB' -> bytes. 'G' alone is taken as GiB (as nvidia-smi users mean it).

    ``require_unit``: a bare number is refused (the CLI's ``--vram-limit 24`` meant 24 GiB, not
    24 bytes); the child side keeps accepting what the supervisor already checked."""
    m = _SIZE_RE.match(text or "")
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write it like 24GiB, 16GB or 15.5GiB")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if require_unit and not unit:
        raise ValueError(f"size {text!r} has no unit (it would be read as {text.strip()} bytes); "
                         f"write it with one, like {text.strip()}GiB or {text.strip()}GB")
    if unit in ("g", "m", "k", "t"):
        unit += "ib"
    value = int(number * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


# One list of the messages that mean "the GPU ran out of memory" (DESIGN §4).
OOM_PATTERNS = (
    r"CUDA out of memory",
    r"torch\.OutOfMemoryError",
    r"torch\.cuda\.OutOfMemoryError",
    r"CUDA error: out of memory",
    r"CUBLAS_STATUS_ALLOC_FAILED",
    r"CUDNN_STATUS_(?:ALLOC_FAILED|NOT_ENOUGH_WORKSPACE)",
    r"cudaErrorMemoryAllocation",
    r"out of memory at line \d+ in file",  # bitsandbytes native: "Error out of memory at line N in file F"
    r"HIP out of memory",
    r"NCCL.*(?:out of memory|Cuda failure 'out of memory')",
)
_OOM_RE = re.compile("|".join(OOM_PATTERNS), re.IGNORECASE)


def find_oom(text: str) -> str | None:
    """The first line of ``text`` that reports a GPU OOM, or None."""
    for line in text.splitlines():
        if _OOM_RE.search(line):
            return line.strip()
    return None


def is_oom(exc_type: str, message: str) -> bool:
    """A GPU OOM by the exception's type name (``OutOfMemoryError``) or by any line of ``message`` in
    :data:`OOM_PATTERNS`: the one rule both the guard's classifier and the bootstrap's failsafe use."""
    return exc_type.endswith("OutOfMemoryError") or find_oom(message) is not None
