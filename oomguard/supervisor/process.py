"""Process control: the only place that starts a child. Own process group, tee, watch, kill."""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

import psutil

from ..protocol import HEARTBEAT, STDERR_LOG, STDOUT_LOG
from .ranks import rank_of_heartbeat
from .tree import ProcessTree

POLL_S = 0.2
TAIL_LINES = 200
TAIL_BYTES = 256 * 1024  # of stderr read back for classification
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
    heartbeat_ages: dict[int, float] = dataclasses.field(default_factory=dict)  # rank -> s, when hung


def _set_parent_death_signal() -> None:
    """Linux: the child gets SIGTERM if the supervisor dies (orphans do not train forever)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Echo:
    """Copies what the child appended to its log file to our terminal, from where it left off.

    The child writes its stdout/stderr straight into the attempt's log files, not into pipes:
    a pipe dies with the supervisor, and an orphan's next print (a loss line, a progress bar)
    would then raise BrokenPipeError before its guard could save. A file outlives us."""

    def __init__(self, path: Path, target: IO[bytes] | None):
        self.path, self.target, self.offset = path, target, path.stat().st_size

    def pump(self) -> None:
        if self.target is None:
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        try:
            self.target.write(chunk)
            self.target.flush()
        except (OSError, ValueError):
            pass  # our own terminal went away; the log file has it all


def _tail(path: Path, since: int, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines the child wrote to ``path`` after byte ``since`` (this attempt's)."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(since, size - TAIL_BYTES))
        text = f.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _heartbeat_ages(watch: Watch, since: float, now: float) -> dict[int, float]:
    """Seconds since each rank's heartbeat (``heartbeat``, ``heartbeat.rank<k>``) last moved, for
    the files touched during this attempt (an older file is a previous attempt's)."""
    ages = {}
    for hb in watch.heartbeat_dir.glob(f"{HEARTBEAT}*"):
        rank = rank_of_heartbeat(hb.name)
        try:
            mtime = hb.stat().st_mtime
        except FileNotFoundError:
            continue
        if rank is not None and mtime >= since:
            ages[rank] = now - mtime
    return ages


def _stale_heartbeat(watch: Watch, since: float, now: float) -> dict[int, float] | None:
    """Every rank's heartbeat age when any rank's has not moved for hang_timeout_s, else None.
    Per rank: one rank stuck (or blocked in a collective after its peer died) is a hang."""
    if not watch.hang_timeout_s:
        return None
    ages = _heartbeat_ages(watch, since, now)
    return ages if any(age > watch.hang_timeout_s for age in ages.values()) else None


def _terminate(popen: subprocess.Popen, tree: ProcessTree, first: int, grace_s: float) -> None:
    """``first`` to every group of the tree (a launcher's ranks lead groups of their own), up to
    ``grace_s`` for the child *and* its ranks to end, then SIGKILL to whatever is left."""
    tree.refresh()
    tree.signal(first)
    deadline = time.monotonic() + grace_s
    try:
        popen.wait(timeout=grace_s)  # the guard saves at the next step end, then exits
    except subprocess.TimeoutExpired:
        pass
    tree.wait(max(0.0, deadline - time.monotonic()))
    tree.signal(signal.SIGKILL)


def _hang_grace(watch: Watch) -> float:
    """Seconds a hung child gets after SIGTERM: it has not stepped for hang_timeout_s, so it
    will not reach the step end where the guard saves; more than 10 s is waiting for nothing."""
    return min(watch.grace_s, 10.0, watch.hang_timeout_s or watch.grace_s)


def _group_alive(pgid: int) -> bool:
    """Any live (not zombie) process in group ``pgid``: an orphan's exit leaves a zombie until
    init reaps it, and a zombie has nothing left to save."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def process_started(pid: int) -> float | None:
    """The start time of ``pid`` (seconds since the epoch, as psutil reports), None if gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def reap_orphan(pid: int, started: float | None, grace_s: float) -> str | None:
    """Stop what is left of a dead supervisor's child group ``pid`` (it was a session leader).

    The child got SIGTERM from PR_SET_PDEATHSIG and should be saving; it gets ``grace_s``
    seconds to finish, then SIGKILL. Returns what was done, or None when nothing was left.
    A live ``pid`` whose start time differs from ``started`` is a reused pid: left alone.
    """
    now_started = process_started(pid)
    if now_started is not None and started is not None and abs(now_started - started) > 1.0:
        return None
    if not _group_alive(pid):
        return None
    _kill_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if not _group_alive(pid):
        return f"the previous supervisor's child group {pid} was still running; it stopped on SIGTERM"
    _kill_group(pid, signal.SIGKILL)
    return f"the previous supervisor's child group {pid} was still running; killed after {grace_s:g} s"


def run_child(argv: Sequence[str], env: Mapping[str, str], attempt_dir: Path, watch: Watch,
              stop: StopFlag, on_tick: Callable[[], None] | None = None,
              on_start: Callable[[int], None] | None = None) -> ChildOutcome:
    """Start ``argv`` in its own session, tee its output into ``attempt_dir``, watch it to its end.

    ``on_start(pid)`` runs right after the start (the journal records the pid, so a supervisor
    that dies can be followed by one that finds the orphan); ``on_tick`` once per poll.
    """
    attempt_dir.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.monotonic()
    out_path, err_path = attempt_dir / STDOUT_LOG, attempt_dir / STDERR_LOG
    with out_path.open("ab") as out_log, err_path.open("ab") as err_log:
        err_start = err_path.stat().st_size
        echoes = [_Echo(out_path, sys.stdout.buffer if watch.echo else None),
                  _Echo(err_path, sys.stderr.buffer if watch.echo else None)]
        popen = subprocess.Popen(list(argv), env=dict(env), stdout=out_log, stderr=err_log,
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 preexec_fn=_set_parent_death_signal)
    if on_start is not None:
        on_start(popen.pid)
    tree = ProcessTree(popen.pid)
    mem: collections.deque = collections.deque()
    hung: dict[int, float] | None = None
    interrupted: int | None = None
    while popen.poll() is None:
        now = time.time()
        mem.append((now, psutil.virtual_memory().percent))
        while mem and now - mem[0][0] > HOST_MEM_WINDOW_S:
            mem.popleft()
        tree.refresh()
        if stop.is_set and interrupted is None:
            interrupted = stop.signum
            _terminate(popen, tree, stop.signum or signal.SIGTERM, watch.grace_s)
        elif (stale := _stale_heartbeat(watch, started, now)) is not None:
            hung = stale
            _terminate(popen, tree, signal.SIGTERM, _hang_grace(watch))
        elif on_tick is not None:
            on_tick()
        for echo in echoes:
            echo.pump()
        try:
            popen.wait(timeout=POLL_S)  # returns at once when the child ends: no idle poll
        except subprocess.TimeoutExpired:
            pass
    tree.signal(signal.SIGKILL)  # stragglers a launcher left behind, in its group or their own
    for echo in echoes:
        echo.pump()
    rc = popen.returncode
    return ChildOutcome(
        exit_code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None, hung=hung is not None,
        interrupted_by=interrupted, duration_s=time.monotonic() - t0,
        host_mem_peak_percent=max((p for _, p in mem), default=0.0),
        stderr_tail=_tail(err_path, err_start), pids=tree.pids,
        heartbeat_ages={r: round(a, 1) for r, a in (hung or {}).items()})
