"""The run directory's small file helpers: atomic JSON write, append-one-line, torn-line-tolerant read.

``Appender`` and ``Beat`` are the per-step forms of ``append_jsonl`` and ``touch``: they keep the file
open, so a step costs two syscalls and no path lookup (issue 17: inside a training step, with the caches
cold, each syscall costs tens of µs; an open on a cluster's network file system costs far more)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_json", "append_jsonl", "Appender", "Beat", "read_jsonl", "touch"]


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


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()


def _append(fd: int, line: bytes, size: int, ours: bool = False) -> int:
    """One O_APPEND write (no interleaving between writers) to a file of ``size`` bytes; ``ours``: its last
    bytes are a line this writer ended. The file's size after the line (-1 when it was not all written)."""
    if size and not ours and os.pread(fd, 1, size - 1) != b"\n":
        line = b"\n" + line  # a writer was killed mid-line: do not glue onto its torn line
    return size + len(line) if os.write(fd, line) == len(line) else -1


def _open_append(path: str | os.PathLike[str]) -> int:
    return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def append_jsonl(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """Append one line with a single O_APPEND write (no interleaving between writers)."""
    line = _line(obj)
    fd = _open_append(path)
    try:
        _append(fd, line, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class _Held:
    """A file kept open by path; reopened when it was removed or replaced (its inode has no link left)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._end = -1  # the file's size right after this writer's last whole line

    def _fd(self) -> tuple[int, os.stat_result]:
        """The open descriptor and its stat, opening (again) where needed; OSError when it cannot be opened."""
        if self.fd is not None:
            try:
                st = os.fstat(self.fd)
            except OSError:
                st = None  # closed behind our back
            if st is None or (st.st_dev, st.st_ino) != self._inode:
                self.fd = None  # closed behind our back, the number maybe another file's now: never close that
            elif st.st_nlink:
                return self.fd, st
            else:
                self.close()  # removed or renamed over: reopen what is at the path now
        fd = self._open()
        st = os.fstat(fd)
        self.fd, self._inode, self._end = fd, (st.st_dev, st.st_ino), -1
        return fd, st

    def _open(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()


class Appender(_Held):
    """``append_jsonl`` on a file kept open: per line one fstat and one write (and a pread for the torn-line
    check when another writer wrote last)."""

    def _open(self) -> int:
        return _open_append(self.path)

    def append(self, obj: dict[str, Any]) -> None:
        line = _line(obj)
        fd, st = self._fd()
        try:
            # another writer's line since ours moves the size off _end: then the torn-line check reads
            self._end = _append(fd, line, st.st_size, ours=st.st_size == self._end)
        except OSError:
            self.close()  # the next line opens it afresh
            raise


class Beat(_Held):
    """``touch`` on a file kept open: per beat one fstat and one futimens, no path lookup."""

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def touch(self) -> None:
        fd, _ = self._fd()
        try:
            os.utime(fd)
        except OSError:
            self.close()
            raise


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
        os.utime(path)  # one-off touches (the probe, the fake child); the guard's per-step beat is Beat
    except FileNotFoundError:
        Path(path).touch()
