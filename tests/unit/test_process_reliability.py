"""Process control, pure parts: the heartbeat clock (monotonic, not mtimes), stop-signal
escalation, bounded echo, the exec diagnosis."""

from __future__ import annotations

import io
import os
import signal

from oomguard.supervisor.process import StopFlag, Watch, _Echo, _stale_heartbeat, exec_problem
from oomguard.supervisor.progress import HeartbeatClock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_hang_deadline_runs_from_launch_before_any_heartbeat(tmp_path):
    clock = FakeClock()
    (tmp_path / "heartbeat").touch()  # a previous attempt's beat: not one of this attempt
    beats = HeartbeatClock(tmp_path, clock)
    watch = Watch(heartbeat_dir=tmp_path, hang_timeout_s=10)
    clock.now += 9
    assert _stale_heartbeat(watch, beats) is None
    clock.now += 2
    assert _stale_heartbeat(watch, beats) == {0: 11}


def test_only_an_mtime_change_counts_never_its_value(tmp_path):
    """An mtime an hour ahead (clock jumped forward) or a day behind (jumped back) is only 'it moved'."""
    clock, hb = FakeClock(), tmp_path / "heartbeat"
    beats = HeartbeatClock(tmp_path, clock)
    watch = Watch(heartbeat_dir=tmp_path, hang_timeout_s=10)
    hb.touch()
    os.utime(hb, (4e9, 4e9))  # far in the future
    clock.now += 5
    assert beats.ages() == {0: 0}  # first seen moving now
    clock.now += 9
    assert _stale_heartbeat(watch, beats) is None  # 9 s since it moved, whatever the mtime says
    os.utime(hb, (1e6, 1e6))  # far in the past: still a beat
    clock.now += 1
    assert beats.ages() == {0: 0}
    clock.now += 11
    assert _stale_heartbeat(watch, beats) == {0: 11}  # unchanged for 11 s on our clock


def test_one_rank_that_stops_beating_is_a_hang(tmp_path):
    clock = FakeClock()
    beats = HeartbeatClock(tmp_path, clock)
    watch = Watch(heartbeat_dir=tmp_path, hang_timeout_s=10)
    for n, name in enumerate(("heartbeat", "heartbeat.rank1")):
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (1e9 + n, 1e9 + n))
    beats.ages()
    for t in range(1, 13):
        clock.now += 1
        os.utime(tmp_path / "heartbeat", (2e9 + t, 2e9 + t))  # rank 0 keeps beating, rank 1 stopped
        stale = _stale_heartbeat(watch, beats)
    assert stale == {0: 0, 1: 12}


def test_a_second_stop_signal_is_urgent_sighup_never_escalates():
    stop = StopFlag()
    stop.set(signal.SIGHUP)
    assert stop.forward == signal.SIGTERM  # the guard saves on SIGTERM; SIGHUP would kill it unsaved
    stop.set(signal.SIGHUP)
    assert not stop.urgent
    stop.set(signal.SIGINT)
    assert stop.urgent and stop.signum == signal.SIGHUP
    ctrl_c = StopFlag()
    ctrl_c.set(signal.SIGINT)
    assert ctrl_c.forward == signal.SIGINT and not ctrl_c.urgent


def test_echo_reads_in_bounded_pieces(tmp_path):
    log = tmp_path / "stderr.log"
    log.write_bytes(b"")
    sink = io.BytesIO()
    echo = _Echo(log, sink, fd=-1)
    log.write_bytes(b"y" * (3 * 2**20))  # one 3 MiB line
    echo.pump(budget=2**20)
    assert echo.offset == 2**20 and len(sink.getvalue()) == 2**20
    echo.pump(None)
    assert echo.offset == 3 * 2**20 and sink.getvalue() == log.read_bytes()


def test_exec_problem_names_the_cause_and_the_fix(tmp_path):
    plain, missing, crlf = tmp_path / "run.sh", tmp_path / "train.py", tmp_path / "win.sh"
    plain.write_text("echo hi\n")
    missing.write_text("#!/opt/nowhere/python3\nprint(1)\n")
    crlf.write_bytes(b"#!/bin/sh\r\necho hi\r\n")
    good = tmp_path / "ok.sh"
    good.write_text("#!/bin/sh\necho hi\n")
    for script in (plain, missing, crlf, good):
        script.chmod(0o755)
    assert "#!" in exec_problem([str(plain)]) and "bash" in exec_problem([str(plain)])
    assert "/opt/nowhere/python3" in exec_problem([str(missing)])
    assert "dos2unix" in exec_problem([str(crlf)])
    assert exec_problem([str(good)]) is None and exec_problem(["sh"]) is None


def test_slurms_sigterm_after_its_own_sigusr1_warning_does_not_cut_the_save_short():
    stop = StopFlag()
    stop.set(signal.SIGUSR1)  # --signal=USR1@120: the child starts saving at the step end
    assert stop.forward == signal.SIGTERM
    stop.set(signal.SIGTERM)  # the time limit
    assert not stop.urgent and stop.signum == signal.SIGUSR1
    person = StopFlag()
    person.set(signal.SIGTERM)
    person.set(signal.SIGTERM)
    assert person.urgent
