"""What the terminal shows during a run: oomguard's own lines, always on their own line, and the
child's output echoed from its log files, a traceback condensed to its last line and last frame.

The supervisor is one thread: the poll loop echoes the child's bytes and prints oomguard's lines
in turn, so one module-level record of "the child left a line open" (a tqdm bar ends in ``\\r``, not
``\\n``) is enough to start every line of ours on a fresh line.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["Verbosity", "PREFIX", "say", "note_child_output", "child_line_open", "own_text", "Tolerant",
           "tolerate_gone_output", "divert", "divert_gone_output", "TracebackCondenser", "log_pointer"]

PREFIX = "[oomguard] "


class Verbosity(int, enum.Enum):
    QUIET = 0  # -q: the child's output is not echoed; oomguard's decisions and status are
    NORMAL = 1  # the child's output, its tracebacks condensed (the full text is in the attempt's log)
    VERBOSE = 2  # -v: everything the child prints, tracebacks whole


_OPEN: dict[int, bool] = {}  # fd -> the last byte echoed from the child there was not a newline


def note_child_output(fd: int, chunk: bytes) -> None:
    """Record what the echo just wrote to ``fd`` (1 or 2): does the child's line stay open?"""
    if chunk:
        _OPEN[fd] = not chunk.endswith(b"\n")


def child_line_open(fd: int = 2) -> bool:
    """The child left a line open where a write to ``fd`` lands: on ``fd`` itself, or on the other
    standard stream when both are the same terminal."""
    if _OPEN.get(fd):
        return True
    other = 1 if fd == 2 else 2
    return bool(_OPEN.get(other)) and _same_terminal()


def _same_terminal() -> bool:
    try:
        return os.isatty(1) and os.isatty(2) and os.ttyname(1) == os.ttyname(2)
    except OSError:
        return False


def own_text(text: str, fd: int = 2) -> str:
    """``text`` as oomguard writes it to ``fd``: a newline first when the child left its line open."""
    if text and child_line_open(fd) and not text.startswith("\n"):
        _OPEN[1] = _OPEN[2] = False
        return "\n" + text
    return text


def say(text: str) -> None:
    """One line of oomguard's own on stderr, on a line of its own (shown under every verbosity)."""
    try:
        print(own_text(PREFIX + text), file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # our stderr went away: the journal has it


def divert(fd: int) -> None:
    """Point ``fd`` at /dev/null: every later print to it (ours, the loop's, the summary's,
    the interpreter's last flush) succeeds silently. The attempt's log files keep everything."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _output_gone(fd: int) -> bool:
    """The reader of ``fd`` is gone: a pipe whose reader exited (``| head``) reports POLLERR, a
    closed terminal POLLHUP, a closed fd POLLNVAL. A file or a live terminal reports none."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    try:
        events = poller.poll(0)
    except OSError:
        return True
    return any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in events)


def divert_gone_output() -> None:
    """Divert stdout/stderr whose reader is gone, before anything writes to them again."""
    for fd in (1, 2):
        if _output_gone(fd):
            divert(fd)


class Tolerant:
    """A text stream that never raises when its reader is gone (a ``BrokenPipeError`` from a status
    line would leave the run ``running``), and starts oomguard's text on a fresh line when the child
    left one open: every ``print`` of the supervisor and the CLI during a run goes through it."""

    def __init__(self, inner: IO[str], fd: int):
        self._inner, self._fd = inner, fd

    def write(self, text: str) -> int:
        try:
            return self._inner.write(own_text(text, self._fd))
        except (OSError, ValueError):
            divert(self._fd)
            return len(text)

    def flush(self) -> None:
        try:
            self._inner.flush()
        except (OSError, ValueError):
            divert(self._fd)  # the buffered rest goes to /dev/null on the next flush

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def tolerate_gone_output() -> Iterator[None]:
    """stdout/stderr tolerate a reader that went away (EPIPE, a closed terminal) for the duration."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tolerant(sys.stdout, 1), Tolerant(sys.stderr, 2)  # type: ignore[assignment]
    try:
        yield
    finally:
        divert_gone_output()  # the CLI prints a summary after us, with the plain streams
        sys.stdout, sys.stderr = saved


def log_pointer(path: Path) -> str:
    """``path`` as a reader finds it: relative to the working directory when below it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except (OSError, ValueError):
        return str(path)


_TB_START = b"Traceback (most recent call last):"
_CHAIN = (b"During handling of the above exception", b"The above exception was the direct cause")
IDLE_FLUSH_S = 2.0  # an exception line with nothing after it for this long is shown (the child lives on)
MAX_SHOWN = 300  # characters of the exception line shown


class TracebackCondenser:
    """Filters a child's stderr stream: everything passes through at once, except a Python
    traceback, which becomes three lines of oomguard's: the exception line, the last frame, and
    where the full text is (the log file the child wrote, never touched)."""

    def __init__(self, log_path: Path, clock=time.monotonic):
        self.log_path, self.clock = log_path, clock
        self.pending = b""  # bytes held back: an incomplete line of a traceback, or a marker's start
        self.state: str | None = None  # None: passing through; "frames" | "exc" | "gap"
        self._reset()
        self.last_fed = clock()

    def _reset(self) -> None:
        self.lines, self.last_frame, self.exc_line, self.first_exc = 0, b"", b"", b""
        self.in_marker = False

    def feed(self, chunk: bytes) -> bytes:
        """What to echo of ``chunk`` now (the rest is held until it is known not to be a traceback)."""
        if chunk:
            self.last_fed = self.clock()
        data, self.pending, out = self.pending + chunk, b"", []
        while data:
            data = self._pass(data, out) if self.state is None else self._condense(data, out)
        return b"".join(out)

    def idle(self) -> bytes:
        """Called when nothing new came: a traceback whose exception line stands alone for a while ends."""
        if self.clock() - self.last_fed < IDLE_FLUSH_S:
            return b""
        if self.state is None:
            held, self.pending = self.pending, b""
            return held  # a line that began like a traceback's first and stopped there
        return self._summary() if self.state in ("exc", "gap") else b""

    def flush(self) -> bytes:
        """The end of the stream (the child is gone): whatever is held back."""
        held, self.pending = self.pending, b""
        if self.state is None:
            return held
        if held:
            self._line(held.rstrip(b"\r\n"))
        return self._summary() if self.state is not None else b""

    def _pass(self, data: bytes, out: list[bytes]) -> bytes:
        j = data.find(_TB_START)
        if j < 0:
            tail_at = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
            tail = data[tail_at:]
            if tail and _TB_START.startswith(tail):
                out.append(data[:tail_at])
                self.pending = tail  # "Traceb" at the end of a chunk: wait for the rest
            else:
                out.append(data)
            return b""
        before = data[:j]
        out.append(before + (b"\n" if before and not before.endswith(b"\n") else b""))
        self.state, self.lines = "frames", 1
        self.in_marker = True  # the rest of the marker's line is not needed
        return data[j + len(_TB_START):]

    def _condense(self, data: bytes, out: list[bytes]) -> bytes:
        nl = data.find(b"\n")
        if self.in_marker:
            self.in_marker = nl < 0
            return b"" if nl < 0 else data[nl + 1:]
        if nl < 0:
            self.pending = data
            return b""
        line, rest = data[:nl].rstrip(b"\r"), data[nl + 1:]
        if self._line(line):
            return rest
        out.append(self._summary())
        return line + b"\n" + rest  # not the traceback's: echoed as it came

    def _line(self, line: bytes) -> bool:
        """Take one line of a traceback; False when the line is past its end."""
        stripped = line.strip()
        if stripped.startswith(_TB_START) or stripped.startswith(_CHAIN):
            self.state = "frames"
        elif self.state == "frames" or line.startswith((b" ", b"\t")) and self.state == "exc":
            if line[:1] in (b" ", b"\t") or not stripped:
                if stripped.startswith(b'File "'):
                    self.last_frame = stripped
            else:
                self.exc_line = stripped
                self.first_exc = self.first_exc or stripped
                self.state = "exc"
        elif not stripped:
            self.state = "gap"
        else:
            return False
        self.lines += 1
        return True

    def _summary(self) -> bytes:
        exc = (self.exc_line or b"(no exception line)").decode(errors="replace")
        text = f"{PREFIX}child error: {exc[:MAX_SHOWN]}\n"
        if self.first_exc and self.first_exc != self.exc_line:
            text += f"{PREFIX}  while handling: {self.first_exc.decode(errors='replace')[:MAX_SHOWN]}\n"
        if self.last_frame:
            text += f"{PREFIX}  last frame: {self.last_frame.decode(errors='replace')}\n"
        text += f"{PREFIX}  full traceback ({self.lines} lines): {log_pointer(self.log_path)}\n"
        self.state = None
        self._reset()
        return text.encode()
