"""The shutdown callback's watch on its supervisor: once a second, the parent's pid read without /proc when the
supervisor is the parent, kill(0) and /proc's state through a launcher."""

from __future__ import annotations

import os
import subprocess
import sys

from oomguard.guard.callbacks import shutdown
from oomguard.guard.callbacks.shutdown import ShutdownCallback, StopAgreement


def _watch(pid: int) -> ShutdownCallback:
    return ShutdownCallback(None, supervisor_pid=pid, agreement=StopAgreement(None), attempt=1)


def test_a_supervisor_that_is_the_parent_is_alive_without_a_proc_read(monkeypatch):
    monkeypatch.setattr(shutdown, "process_alive", lambda pid: (_ for _ in ()).throw(AssertionError("read /proc")))
    assert not _watch(os.getppid())._supervisor_gone()


def test_a_supervisor_behind_a_launcher_is_read_from_proc_and_a_dead_one_is_gone():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # exited and reaped: its pid names no process
    watch = _watch(dead.pid)
    assert watch._supervisor_gone()
    alive = _watch(os.getpid())  # not our parent: the kill(0) and /proc path
    assert not alive._supervisor_gone()
    assert not watch._supervisor_gone()  # checked less than CHECK_EVERY_S ago: not asked again
