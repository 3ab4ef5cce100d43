"""The child's process tree: every process it started, remembered and signalled as one child.

``killpg(child)`` is not enough for a launcher: torchrun (``torch.distributed.elastic``)
starts each worker with ``start_new_session=True``, so the ranks live in process groups of
their own. A hung rank ignores torchrun's SIGTERM for its 30 s close timeout; if the
launcher is SIGKILLed first the ranks are re-parented to init and keep training (or keep
waiting in a collective) forever, holding their GPU memory. The tree remembers each
descendant (a ``psutil.Process`` checks its start time, so a reused pid is never
signalled) and signals every process group in it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from ..protocol import ENV_RUN_DIR


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ProcessTree:
    """A child (its pid leads its own session) and every descendant seen while it ran."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.known: dict[int, psutil.Process] = {}

    def refresh(self) -> None:
        """Remember the descendants alive now (call once per poll: an orphan is no longer a child)."""
        try:
            children = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return
        for proc in children:
            self.known.setdefault(proc.pid, proc)

    @property
    def pids(self) -> frozenset[int]:
        return frozenset({self.root_pid, *self.known})

    def alive(self) -> list[psutil.Process]:
        """Descendants still running (the root is waited for by its Popen, never here)."""
        return [p for p in self.known.values() if _running(p)]

    def signal(self, sig: int) -> None:
        """``sig`` to the root's group and to every group a live descendant leads or belongs to."""
        groups = {self.root_pid}
        for proc in self.alive():
            try:
                groups.add(os.getpgid(proc.pid))
            except OSError:
                continue
        groups.discard(os.getpgrp())  # never our own group (a descendant that joined it: impossible, but cheap)
        for pgid in groups:
            _kill_group(pgid, sig)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every live descendant to end; True when none is left."""
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        return not self.alive()


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Live processes (not this one, nor its ancestors) whose environment names ``run_dir``:
    the ranks a dead supervisor's launcher left behind, found without knowing their pids."""
    target = str(Path(run_dir).absolute())
    me = psutil.Process()
    exclude = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in exclude:
            continue
        try:
            if proc.environ().get(ENV_RUN_DIR) == target and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue  # gone, or another user's: not ours to stop
    return found


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for ``procs`` to end; those still running. A zombie counts as
    ended: a process not our child is reaped by init, maybe never in a container."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in procs if _running(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _running(p)]
    return left


def stop_processes(procs: list[psutil.Process], grace_s: float) -> int:
    """SIGTERM (the guard saves at its next step end), ``grace_s`` seconds, then SIGKILL.
    Returns how many were still running when SIGKILL came."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)  # psutil refuses a reused pid
        except psutil.Error:
            continue
    left = _wait_gone(procs, grace_s)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            continue
    return len(left)


def stop_run_strays(run_dir: str | os.PathLike[str] | None, grace_s: float) -> list[int]:
    """Stop what is left of a run once an attempt has ended: a grandchild that daemonized
    (double fork, ``setsid``) is in no group or tree of the child, but it still carries the
    run dir in its environment. Returns the pids stopped (SIGTERM, ``grace_s``, SIGKILL)."""
    if not run_dir:
        return []
    strays = run_processes(Path(run_dir))
    if strays:
        stop_processes(strays, grace_s)
    return [p.pid for p in strays]
