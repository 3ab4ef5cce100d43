"""Process control: the only place that starts a child. Own process group, tee, watch, kill."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import psutil

from ..protocol import ENV_ERROR_FILE, ENV_RUN_DIR, STDERR_LOG, STDOUT_LOG, ErrorRecord, read_error_records
from .console import TracebackCondenser, divert_gone_output, note_child_output, say, tolerate_gone_output
from .console import divert as _divert
from .progress import HeartbeatClock
from .tree import ProcessTree, stop_run_strays

if TYPE_CHECKING:  # spare.py imports this module (start_spare); the keeper reaches us through Watch
    from .spare import Spares

__all__ = ["SCHEDULER_SIGNALS", "STOP_SIGNALS", "StopFlag", "handle_stop_signals", "Watch", "ChildOutcome",
           "run_child", "exec_problem", "reap_orphan", "process_started", "divert_gone_output",
           "tolerate_gone_output", "start_spare"]

POLL_S = 0.2
# A rank that wrote its error record is on its way out, and its launcher takes the other ranks down
# within seconds; a rank blocked in a collective for a dead peer (NCCL and gloo wait up to their
# timeout, 10-30 min by default, and a Python SIGTERM handler cannot run inside the wait) does not.
# ``Watch.linger_s`` (limits.failed_rank_linger_s) after the first record, whatever of the attempt still
# runs is stopped.
LINGER_GRACE_S = 5.0  # SIGTERM -> SIGKILL then: the attempt has failed, only a peer's own save is left
TAIL_LINES = 200
TAIL_BYTES = 256 * 1024  # of stderr read back for classification
HOST_MEM_WINDOW_S = 10.0  # seconds of host-memory history kept to judge a SIGKILL
ECHO_CHUNK = 64 * 1024  # bytes read from a child's log at a time: memory stays flat whatever it prints
ECHO_PER_PUMP = 8 * 1024 * 1024  # bytes echoed per poll at most (the rest next poll, all of it at the end)
STRAY_GRACE_S = 5.0  # SIGTERM -> SIGKILL for a process that outlived its attempt (it is not training)


# SIGHUP: the terminal was closed; SIGUSR1/SIGUSR2: a scheduler's warning before its kill (SLURM's
# --signal=USR1@120); SIGTERM: a scheduler's or a person's stop (SLURM at the time limit, Kubernetes)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # the run ends "requeue me"
_INSISTING = (signal.SIGINT, signal.SIGTERM)
_WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)


class StopFlag:
    """Set from a signal handler; read by the poll loop (a STOP_SIGNALS signal to the supervisor).

    The first stop signal lets the child save (grace period); a second SIGINT or SIGTERM is the
    user insisting ("a second Ctrl-C ends it at once"). SIGHUP, SIGUSR1 and SIGUSR2 never escalate
    (a terminal closed after a Ctrl-C is not the user asking twice), and a SIGTERM after a scheduler's
    SIGUSR1/SIGUSR2 warning does not either: SLURM's time-limit SIGTERM must not cut short the save
    its own warning started."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.urgent = False

    def set(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        elif signum in _INSISTING and self.signum not in _WARNINGS:
            self.urgent = True

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    @property
    def forward(self) -> int:
        """What the child gets: the guard saves on SIGINT/SIGTERM only, and SIGHUP would kill it unsaved."""
        return signal.SIGINT if self.signum == signal.SIGINT else signal.SIGTERM


@contextlib.contextmanager
def handle_stop_signals(stop: StopFlag) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP set ``stop`` for the duration; the previous handlers come back after."""
    previous = {s: signal.signal(s, lambda n, _f: stop.set(n)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass(frozen=True)
class Watch:
    heartbeat_dir: Path
    hang_timeout_s: float | None
    grace_s: float = 30.0  # SIGTERM -> SIGKILL; the child's guard saves in this time
    startup_timeout_s: float | None = None  # to the first heartbeat; None: hang_timeout_s
    echo: bool = True  # the child's output on our terminal (``-q``: only in the logs)
    condense: bool = True  # its tracebacks as three lines of ours (``-v``: whole)
    spares: "Spares | None" = None  # the run's warm-spare keeper (supervisor/spare.py); None: always cold
    linger_s: float = 15.0  # after a rank's error record, the rest of the attempt is stopped this much later


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
    strays: tuple[int, ...] = ()  # pids of this run stopped after the attempt (daemonized grandchildren)
    lingered: str | None = None  # what was said when ranks outlived a rank's error record by linger_s (stopped)


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
    would then raise BrokenPipeError before its guard could save. A file outlives us.
    Reads go in ECHO_CHUNK pieces: a chatty child's 1 GiB line never sits in our memory.
    ``condense``: a traceback is shown as its exception line, last frame and the log's path."""

    def __init__(self, path: Path, target: IO[bytes] | None, fd: int, condense: bool = False):
        self.path, self.target, self.fd, self.offset = path, target, fd, path.stat().st_size
        self.condenser = TracebackCondenser(path) if condense else None

    def pump(self, budget: int | None = ECHO_PER_PUMP) -> None:
        """Copy up to ``budget`` bytes (None: to the end, the child is gone), so one poll never
        stalls on a flood."""
        if self.target is None:
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            while budget is None or budget > 0:
                chunk = f.read(ECHO_CHUNK if budget is None else min(ECHO_CHUNK, budget))
                if not chunk:
                    break
                if not self._write(self.condenser.feed(chunk) if self.condenser else chunk):
                    return
                self.offset += len(chunk)
                budget = None if budget is None else budget - len(chunk)
        if self.condenser is not None:
            self._write(self.condenser.flush() if budget is None else self.condenser.idle())

    def _write(self, chunk: bytes) -> bool:
        if not chunk:
            return True
        try:
            self.target.write(chunk)  # type: ignore[union-attr]
            self.target.flush()  # type: ignore[union-attr]
            note_child_output(self.fd, chunk)
            return True
        except (OSError, ValueError):
            self.target = None  # our terminal went away: stop echoing, the log file has it all
            _divert(self.fd)
            return False


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


def _stale_heartbeat(watch: Watch, clock: HeartbeatClock) -> dict[int, float] | None:
    """Every rank's heartbeat age when any rank's has not moved for hang_timeout_s, else None.
    Per rank: one rank stuck (or blocked in a collective after its peer died) is a hang; before
    the first beat the deadline runs from launch (``HeartbeatClock``)."""
    if not watch.hang_timeout_s:
        return None
    ages = clock.ages()
    limit = watch.hang_timeout_s if clock.moved else (watch.startup_timeout_s or watch.hang_timeout_s)
    return ages if any(age > limit for age in ages.values()) else None


def _terminate(popen: subprocess.Popen, tree: ProcessTree, first: int, grace_s: float, stop: StopFlag) -> None:
    """``first`` to every group of the tree (a launcher's ranks lead groups of their own), up to
    ``grace_s`` for the child *and* its ranks to end, then SIGKILL to whatever is left. A second
    stop signal (``stop.urgent``) cuts the grace short: the user asked twice."""
    tree.refresh()
    tree.signal(first)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not stop.urgent and (popen.poll() is None or tree.alive()):
        time.sleep(0.05)  # the guard saves at the next step end, then exits; a signal wakes us
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


def exec_problem(argv: Sequence[str], path: str | None = None) -> str | None:
    """Why the OS cannot execute ``argv[0]``, with the fix, or None when nothing is seen wrong.
    Callable before anything starts; ``run_child`` uses it to explain a failed exec."""
    exe = shutil.which(argv[0], path=path) if argv else None
    if exe is None:
        return (f"command not found: {argv[0] if argv else ''!r} (not on PATH and not an executable file); "
                "check the spelling or give a full path")
    try:
        with open(exe, "rb") as f:
            head = f.read(256)
    except OSError as exc:
        return f"cannot read {exe}: {exc.strerror}; make it readable (chmod +r) or run it through its interpreter"
    if head.startswith(b"#!"):
        return _shebang_problem(exe, head)
    if head.startswith(b"\x7fELF") or b"\0" in head:
        return None  # a binary: whether it runs is the kernel's business (binfmt_misc and all)
    return (f"{exe} is a text file without a `#!` first line, so the OS cannot execute it (Exec format error); "
            "add one such as `#!/usr/bin/env bash` or `#!/usr/bin/env python3`, or name the interpreter in the "
            f"command (`oomguard run -- bash {argv[0]} ...`)")


def _shebang_problem(exe: str, head: bytes) -> str | None:
    """The ``#!`` line's interpreter that the kernel would fail to start (ENOENT names the script)."""
    line = head[2:].split(b"\n")[0]
    if line.endswith(b"\r"):
        return (f"{exe}: its `#!` line ends in a carriage return (Windows line endings), so the interpreter "
                f"`{line.strip().decode(errors='replace')}\\r` does not exist; convert it with `dos2unix {exe}`")
    words = line.split()
    interpreter = words[0].decode(errors="replace") if words else ""
    if not interpreter:
        return f"{exe}: its `#!` line names no interpreter; write one, e.g. `#!/usr/bin/env python3`"
    if not os.path.isfile(interpreter) or not os.access(interpreter, os.X_OK):
        return (f"{exe}: its `#!` line names the interpreter {interpreter}, which does not exist or is not "
                f"executable; fix the first line (e.g. `#!/usr/bin/env python3`) or name the interpreter in "
                f"the command (`oomguard run -- python3 {exe} ...`)")
    return None


def _spawn(argv: Sequence[str], env: Mapping[str, str], out_log: IO[bytes],
           err_log: IO[bytes]) -> subprocess.Popen | OSError:
    """The child in its own session, its output straight into the log files; the OSError when
    the exec itself failed (ENOEXEC, a missing ``#!`` interpreter, EACCES)."""
    try:
        return subprocess.Popen(list(argv), env=dict(env), stdout=out_log, stderr=err_log,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_set_parent_death_signal)
    except OSError as exc:
        return exc


def start_spare(argv: Sequence[str], env: Mapping[str, str], out_log: IO[bytes], err_log: IO[bytes],
                pass_fds: Sequence[int]) -> subprocess.Popen | OSError:
    """A warm spare (``supervisor/spare.py``): started as a child is (own session, parent-death
    signal, stdin closed) so that, handed an attempt, it is one; ``pass_fds`` its two pipes."""
    try:
        return subprocess.Popen(list(argv), env=dict(env), stdout=out_log, stderr=err_log,
                                stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=tuple(pass_fds),
                                preexec_fn=_set_parent_death_signal)
    except OSError as exc:
        return exc


def _not_started(argv: Sequence[str], env: Mapping[str, str], exc: OSError, err_path: Path,
                 echoes: list[_Echo], t0: float) -> ChildOutcome:
    """An exec that failed, as an attempt that failed at startup: the loop records it (a crash that
    repeats identically stops the run, exit 5, with this text as its root cause), never a traceback."""
    why = exec_problem(argv, env.get("PATH")) or f"could not start {argv[0]!r}: {exc}; check the command"
    with err_path.open("ab") as f:
        f.write(f"oomguard: the command could not be started: {why}\n".encode())
    for echo in echoes:
        echo.pump(None)
    code = 127 if exc.errno == errno.ENOENT else 126  # as a shell reports "not found" / "cannot execute"
    return ChildOutcome(exit_code=code, signal=None, hung=False, interrupted_by=None,
                        duration_s=time.monotonic() - t0, host_mem_peak_percent=0.0,
                        stderr_tail=f"oomguard: the command could not be started: {why}", pids=frozenset())


def _stop_strays(env: Mapping[str, str], stop: StopFlag) -> tuple[int, ...]:
    """What of this run outlived the attempt (a daemonized grandchild) is stopped now, not left
    to pile up one per attempt; a line of oomguard's says so."""
    pids = stop_run_strays(env.get(ENV_RUN_DIR), 0.0 if stop.urgent else STRAY_GRACE_S)
    if pids:
        say(f"stopped {len(pids)} process(es) of this run that outlived the attempt "
            f"(daemonized?): pids {', '.join(map(str, pids))}")
    return tuple(pids)


@dataclasses.dataclass
class _Watching:
    """What the poll loop learns about a running child."""

    mem: collections.deque = dataclasses.field(default_factory=collections.deque)
    hung: dict[int, float] | None = None
    interrupted: int | None = None
    error_file: Path | None = None  # this attempt's error record (every rank's sits beside it)
    first_record: ErrorRecord | None = None  # the first rank's error record (its time starts the linger)
    lingered: str | None = None


def _poll_once(popen: subprocess.Popen, tree: ProcessTree, watch: Watch, stop: StopFlag, beats: HeartbeatClock,
               seen: _Watching, on_tick: Callable[[], None] | None) -> None:
    """One poll: host memory, the tree, a stop signal, a stale heartbeat, the status line."""
    now = time.monotonic()
    seen.mem.append((now, psutil.virtual_memory().percent))
    while seen.mem and now - seen.mem[0][0] > HOST_MEM_WINDOW_S:
        seen.mem.popleft()
    tree.refresh()
    if stop.is_set and seen.interrupted is None:
        seen.interrupted = stop.signum
        _terminate(popen, tree, stop.forward, watch.grace_s, stop)
    elif (stale := _stale_heartbeat(watch, beats)) is not None:
        seen.hung = stale
        _terminate(popen, tree, signal.SIGTERM, _hang_grace(watch), stop)
    elif (lingering := _lingering_after_failure(seen, watch.linger_s, set(beats.moved))) is not None:
        seen.lingered = lingering
        say(lingering)
        _terminate(popen, tree, signal.SIGTERM, min(LINGER_GRACE_S, watch.grace_s), stop)
    elif on_tick is not None:
        on_tick()


def _lingering_after_failure(seen: _Watching, linger_s: float, beating: set[int],
                             now: float | None = None) -> str | None:
    """What to say when a group of several ranks still runs ``linger_s`` after one wrote its error
    record, else None. A single process that recorded its failure is left to end by itself: it has no
    peer to wait for, and its own exit may be slow for a reason (a tracker uploading at exit)."""
    if seen.error_file is None or seen.lingered is not None:
        return None
    if seen.first_record is None:
        records = read_error_records(seen.error_file)
        if not records or not (len(beating) > 1 or any(r.rank > 0 for r in records)):
            return None
        seen.first_record = records[0]
    first = seen.first_record
    if (time.time() if now is None else now) - first.time < linger_s:
        return None
    return (f"rank {first.rank} recorded {first.kind.value} and the attempt had not ended {linger_s:g} s later "
            "(a rank blocked in a collective for it waits out its timeout): stopped what was left of it")


def _beat_moved(beats: HeartbeatClock) -> bool:
    """True once a heartbeat of this attempt moved (the child trains)."""
    if not beats.moved:
        beats.ages()  # reads the heartbeat files' mtimes (the hang check may not, without a timeout)
    return bool(beats.moved)


def run_child(argv: Sequence[str], env: Mapping[str, str], attempt_dir: Path, watch: Watch,
              stop: StopFlag, on_tick: Callable[[], None] | None = None,
              on_start: Callable[[int], None] | None = None) -> ChildOutcome:
    """Start ``argv`` in its own session, tee its output into ``attempt_dir``, watch it to its end.

    ``on_start(pid)`` runs right after the start (the journal records the pid, so a supervisor
    that dies can be followed by one that finds the orphan); ``on_tick`` once per poll.
    """
    attempt_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    out_path, err_path = attempt_dir / STDOUT_LOG, attempt_dir / STDERR_LOG
    with out_path.open("ab") as out_log, err_path.open("ab") as err_log:
        err_start = err_path.stat().st_size
        echoes = [_Echo(out_path, sys.stdout.buffer if watch.echo else None, 1),
                  _Echo(err_path, sys.stderr.buffer if watch.echo else None, 2, condense=watch.condense)]
        popen = watch.spares.take(argv, env, out_path, err_path, stop) if watch.spares is not None else None
        beats = HeartbeatClock(watch.heartbeat_dir)  # before the start: the hang deadline runs from launch
        if popen is None:
            popen = _spawn(argv, env, out_log, err_log)
    if isinstance(popen, OSError):
        return _not_started(argv, env, popen, err_path, echoes, t0)
    if on_start is not None:
        on_start(popen.pid)
    tree, seen = ProcessTree(popen.pid), _Watching()
    seen.error_file = Path(env[ENV_ERROR_FILE]) if env.get(ENV_ERROR_FILE) else None
    while popen.poll() is None:
        _poll_once(popen, tree, watch, stop, beats, seen, on_tick)
        if watch.spares is not None:  # the next attempt's spare, once this one trains
            watch.spares.tick(argv, env, time.monotonic() - t0, _beat_moved(beats), popen.pid)
        for echo in echoes:
            echo.pump()
        divert_gone_output()  # a reader gone while we watched: no later print may raise
        try:
            popen.wait(timeout=POLL_S)  # returns at once when the child ends: no idle poll
        except subprocess.TimeoutExpired:
            pass
    tree.signal(signal.SIGKILL)  # stragglers a launcher left behind, in its group or their own
    if watch.spares is not None:
        watch.spares.ended(popen.returncode, _beat_moved(beats))
        if popen.returncode == 0 or seen.interrupted is not None:
            watch.spares.close()  # no next attempt: the spare would only hold memory
    strays = _stop_strays(env, stop)
    for echo in echoes:
        echo.pump(None)
    return _outcome(popen.returncode, seen, t0, _tail(err_path, err_start), tree, strays)


def _outcome(rc: int, seen: _Watching, t0: float, tail: str, tree: ProcessTree,
             strays: tuple[int, ...]) -> ChildOutcome:
    return ChildOutcome(
        exit_code=rc if rc >= 0 else None, signal=-rc if rc < 0 else None, hung=seen.hung is not None,
        interrupted_by=seen.interrupted, duration_s=time.monotonic() - t0,
        host_mem_peak_percent=max((p for _, p in seen.mem), default=0.0),
        stderr_tail=tail, pids=tree.pids, strays=strays, lingered=seen.lingered,
        heartbeat_ages={r: round(a, 1) for r, a in (seen.hung or {}).items()})
