"""The run directory's small file helpers: atomic JSON write, append-one-line, torn-line-tolerant read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_json", "append_jsonl", "read_jsonl", "touch"]


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write tmp, fsync, rename: a reader sees the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def append_jsonl(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """Append one line with a single O_APPEND write (no interleaving between writers)."""
    line = (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # a writer was killed mid-line: do not glue onto its torn line
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield each parseable object; a torn or garbled line (a kill mid-write) is skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def touch(path: str | os.PathLike[str]) -> None:
    try:
        os.utime(path)  # the heartbeat, every step: no Path object on the way
    except FileNotFoundError:
        Path(path).touch()
