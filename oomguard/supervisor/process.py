"""Process control: the only place that starts a child. Own process group, tee, watch, kill."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

import psutil

from ..protocol import HEARTBEAT, STDERR_LOG, STDOUT_LOG

POLL_S = 0.2
TAIL_LINES = 200
HOST_MEM_WINDOW_S = 10.0  # seconds of host-memory history kept to judge a SIGKILL


class StopFlag:
    """Set from a signal handler; read by the poll loop (SIGINT/SIGTERM to the supervisor)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum is not None


@dataclasses.dataclass(frozen=True)
class Watch:
    heartbeat_dir: Path
    hang_timeout_s: float | None
    grace_s: float = 30.0  # SIGTERM -> SIGKILL; the child's guard saves in this time
    echo: bool = True


@dataclasses.dataclass(frozen=True)
class ChildOutcome:
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    hung: bool  # we killed it for a stale heartbeat
    interrupted_by: int | None  # the signal the supervisor received, forwarded to the child
    duration_s: float
    host_mem_peak_percent: float  # over the last HOST_MEM_WINDOW_S before exit
    stderr_tail: str
    pids: frozenset[int]  # every pid seen in the child's tree (for GPU-release checks)


def _set_parent_death_signal() -> None:
    """Linux: the child gets SIGTERM if the supervisor dies (orphans do not train forever)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pump(src: IO[bytes], log: IO[bytes], echo: IO[bytes] | None, tail: collections.deque) -> None:
    for line in iter(src.readline, b""):
        log.write(line)
        log.flush()
        if tail is not None:
            tail.append(line)
        if echo is not None:
            try:
                echo.write(line)
                echo.flush()
            except (OSError, ValueError):
                pass
    src.close()


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stale_heartbeat(watch: Watch, since: float, now: float) -> bool:
    """A heartbeat file touched during this attempt that has not moved for hang_timeout_s."""
    if not watch.hang_timeout_s:
        return False
    for hb in watch.heartbeat_dir.glob(f"{HEARTBEAT}*"):
        try:
            mtime = hb.stat().st_mtime
        except FileNotFoundError:
            continue
        if mtime >= since and now - mtime > watch.hang_timeout_s:
            return True
    return False


def _tree_pids(proc: psutil.Process) -> set[int]:
    try:
        return {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return {proc.pid}


def _terminate(popen: subprocess.Popen, pgid: int, first: int, grace_s: float) -> None:
    _kill_group(pgid, first)
    deadline = time.monotonic() + grace_s
    while popen.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    _kill_group(pgid, signal.SIGKILL)


def run_child(argv: Sequence[str], env: Mapping[str, str], attempt_dir: Path, watch: Watch,
              stop: StopFlag, on_tick: Callable[[], None] | None = None) -> ChildOutcome:
    attempt_dir.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.monotonic()
    out_log = (attempt_dir / STDOUT_LOG).open("ab")
    err_log = (attempt_dir / STDERR_LOG).open("ab")
    popen = subprocess.Popen(list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=_set_parent_death_signal)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    pumps = [threading.Thread(target=_pump, daemon=True, args=a) for a in (
        (popen.stdout, out_log, sys.stdout.buffer if watch.echo else None, None),
        (popen.stderr, err_log, sys.stderr.buffer if watch.echo else None, tail))]
    for t in pumps:
        t.start()
    proc, pids = psutil.Process(popen.pid), {popen.pid}
    mem: collections.deque = collections.deque()
    hung = False
    interrupted: int | None = None
    while popen.poll() is None:
        now = time.time()
        mem.append((now, psutil.virtual_memory().percent))
        while mem and now - mem[0][0] > HOST_MEM_WINDOW_S:
            mem.popleft()
        pids |= _tree_pids(proc)
        if stop.is_set and interrupted is None:
            interrupted = stop.signum
            _terminate(popen, popen.pid, stop.signum or signal.SIGTERM, watch.grace_s)
        elif _stale_heartbeat(watch, started, now):
            hung = True
            _terminate(popen, popen.pid, signal.SIGTERM, min(watch.grace_s, 10.0))
        elif on_tick is not None:
            on_tick()
        time.sleep(POLL_S)
    _kill_group(popen.pid, signal.SIGKILL)  # stragglers a launcher left behind
    for t in pumps:
        t.join(timeout=10)
    out_log.close()
    err_log.close()
    rc = popen.returncode
    return ChildOutcome(
        exit_code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None, hung=hung,
        interrupted_by=interrupted, duration_s=time.monotonic() - t0,
        host_mem_peak_percent=max((p for _, p in mem), default=0.0),
        stderr_tail=b"".join(tail).decode(errors="replace"), pids=frozenset(pids))
