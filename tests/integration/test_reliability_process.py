"""Process-control faults of the supervisor itself (hang before the first heartbeat, a closed
stderr, an unexecutable command, a flood of output, a daemonized grandchild, a second Ctrl-C,
SIGHUP). Each drives the real supervisor (`python -m oomguard run`) and the stdlib fake child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from _env import user_env

from oomguard.supervisor.process import StopFlag
from oomguard.supervisor.tree import run_processes

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_child.py")
POLICY = HERE / "policies" / "fast.yaml"
ROOT = HERE.parents[1]
ENV = {**user_env(), "PYTHONPATH": str(ROOT)}


@pytest.fixture
def run_dir(tmp_path):
    """The run dir; whatever of it is still running after the test is killed (never leak a hang)."""
    rd = tmp_path / "run"
    yield rd
    for proc in run_processes(rd):
        try:
            proc.kill()
        except psutil.Error:
            pass


def argv(run_dir: Path, *child: str, policy: Path = POLICY, quiet: bool = True) -> list[str]:
    head = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir)]
    return head + (["--quiet"] if quiet else []) + ["--", sys.executable, FAKE, *child]


def start(args: list[str], **kw) -> subprocess.Popen:
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(args, cwd=ROOT, env=ENV, **kw)


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def policy_variant(tmp_path: Path, **limits) -> Path:
    data = yaml.safe_load(POLICY.read_text())
    data["limits"].update(limits)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for_step(run_dir: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").exists() and any(e.get("event") == "step" for e in events(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError("the child never stepped")


# --- 1. a hang before the first heartbeat ------------------------------------------------------
def test_hang_before_the_first_heartbeat_on_every_attempt_stops_with_no_progress(tmp_path, run_dir):
    policy = policy_variant(tmp_path, hang_timeout_s=0.5)
    r = subprocess.run(argv(run_dir, "--hang_at_start", policy=policy), cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 4, r.stderr
    run = run_json(run_dir)
    assert run["status"] == "gave_up" and run["give_up"] == "no_progress"
    assert [a["failure"]["kind"] for a in run["attempts"]] == ["hang"] * len(run["attempts"])


# --- 11. stderr closed under us (`oomguard run ... 2>&1 | head`) ---------------------------------
def test_a_closed_stderr_does_not_kill_the_supervisor(run_dir):
    proc = start(argv(run_dir, "--max_steps", "12", "--step_s", "0.05", "--stderr_chatter", "20", quiet=False),
                 stderr=subprocess.PIPE)
    proc.stderr.readline()  # `head -1`: one line, then the reader is gone
    proc.stderr.close()
    assert proc.wait(timeout=20) == 0
    run = run_json(run_dir)
    assert run["status"] == "succeeded" and run["attempts"][0]["max_step"] == 12


# --- 13. a command the OS cannot execute -----------------------------------------------------------
@pytest.mark.parametrize("first_line,needle", [("echo no shebang\n", "#!"),
                                                ("#!/nonexistent/python3\nprint(1)\n", "/nonexistent/python3")])
def test_an_unexecutable_command_is_refused_before_anything_starts(tmp_path, run_dir, first_line, needle):
    script = tmp_path / "train.sh"
    script.write_text(first_line)
    script.chmod(0o755)
    r = subprocess.run([sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir),
                        "--quiet", "--", str(script)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=20)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2 and needle in r.stderr, r.stderr  # exit 2: nothing was started
    assert not (run_dir / "run.json").exists()


def test_a_command_that_cannot_exec_at_launch_is_a_recorded_failure(tmp_path):
    """The check before start cannot see everything (the interpreter vanishes later): a failed exec
    at launch is a recorded crash with the reason, never a traceback."""
    from oomguard.supervisor.process import Watch, run_child

    script = tmp_path / "train.sh"
    script.write_text("echo no shebang\n")
    script.chmod(0o755)
    outcome = run_child([str(script)], dict(os.environ), tmp_path / "a", Watch(tmp_path, None, echo=False),
                        StopFlag())
    assert outcome.exit_code in (126, 127) and "#!" in (tmp_path / "a" / "stderr.log").read_text()


# --- 15. a flood of output: the supervisor's memory stays flat ----------------------------------------
MAXRSS_OF_CHILDREN = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, "
                      "stderr=subprocess.DEVNULL); "
                      "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")


def test_a_200_mb_stderr_line_keeps_the_supervisor_small(run_dir):
    child = argv(run_dir, "--spew_bytes", str(200 * 10**6), "--max_steps", "2", quiet=False)
    r = subprocess.run([sys.executable, "-c", MAXRSS_OF_CHILDREN, *child], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    peak_kib, rc = map(int, r.stdout.split())
    assert rc == 0 and run_json(run_dir)["status"] == "succeeded"
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"  # the largest of supervisor and child
    assert (run_dir / "attempts" / "001" / "stderr.log").stat().st_size >= 200 * 10**6


# --- 16. a daemonized grandchild ------------------------------------------------------------------------
def test_a_daemonized_grandchild_does_not_outlive_the_run(run_dir):
    r = subprocess.run(argv(run_dir, "--daemon_sleeper", "60", "--max_steps", "2", quiet=False), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert run_processes(run_dir) == []
    assert "outlived the attempt" in r.stderr


# --- 17. a second Ctrl-C ends it at once ------------------------------------------------------------------
def test_a_second_ctrl_c_kills_the_child_at_once(run_dir):
    proc = start(argv(run_dir, "--max_steps", "100000", "--step_s", "0.05", "--stop_delay_s", "60"))
    wait_for_step(run_dir)
    proc.send_signal(signal.SIGINT)  # the child keeps stepping: its save would take the whole grace (30 s)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 130
    assert time.monotonic() - t0 < 3
    run = run_json(run_dir)
    assert run["status"] == "interrupted" and run["attempts"][0]["interrupted"] == "SIGINT"
    assert not psutil.pid_exists(run["attempts"][0]["pid"]) or \
        psutil.Process(run["attempts"][0]["pid"]).status() == psutil.STATUS_ZOMBIE


# --- 21. SIGHUP (the terminal closed) is a stop, the run continues later -------------------------------------
def test_sighup_lets_the_child_save_and_the_run_continues(run_dir):
    proc = start(argv(run_dir, "--max_steps", "40", "--step_s", "0.05", "--save_steps", "100"))
    wait_for_step(run_dir)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=10) == 130
    run = run_json(run_dir)
    assert run["status"] == "interrupted" and run["attempts"][0]["interrupted"] == "SIGHUP"
    saved = [e["step"] for e in events(run_dir) if e["event"] == "shutdown_saved"]
    assert len(saved) == 1
    r = subprocess.run([sys.executable, "-m", "oomguard", "run", "--run-dir", str(run_dir), "--quiet"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    run = run_json(run_dir)
    assert run["status"] == "succeeded" and run["attempts"][1]["resumed_step"] == saved[0]
