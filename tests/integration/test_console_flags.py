"""`-q` hides the child's output, never oomguard's decisions; `-v` shows the child's tracebacks whole;
by default a traceback is its exception line, its last frame and the path of the full log.
The child is the stdlib fake (fast); the terminal is a pty, as a person's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_catalogue_runs import run_in_pty, strict_env

HERE = Path(__file__).parent
FAKE = str(HERE / "fake_child.py")
POLICY = HERE / "policies" / "fast.yaml"


def console_of(tmp_path: Path, *flags: str) -> tuple[Path, str]:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir), *flags,
            "--", sys.executable, FAKE, "--plan", "crash", "--max_steps", "4"]
    code, console = run_in_pty(argv, strict_env(), timeout=60)
    assert code == 0, console[-4000:]
    return run_dir, console.replace("\r\n", "\n")


def test_by_default_the_traceback_is_condensed_and_the_log_keeps_it(tmp_path):
    run_dir, console = console_of(tmp_path)
    assert "fake child: batch=" in console  # the child's own output is echoed
    assert "Traceback (most recent call last)" not in console
    assert "[oomguard] child error: RuntimeError: transient failure at step 2\n" in console
    pointer = next(line for line in console.splitlines() if line.startswith("[oomguard]   full traceback ("))
    assert pointer.startswith("[oomguard]   full traceback (2 lines): ") and pointer.endswith("attempts/001/stderr.log")
    assert "Traceback (most recent call last)" in (run_dir / "attempts/001/stderr.log").read_text()


def test_quiet_hides_the_child_but_not_oomguards_decisions(tmp_path):
    _, console = console_of(tmp_path, "-q")
    assert "fake child:" not in console and "child error:" not in console
    assert "[oomguard] attempt 1 failed: crash" in console
    assert "\n[oomguard] crash " in console  # the decision's reason, a line of its own


def test_verbose_shows_the_traceback_whole(tmp_path):
    _, console = console_of(tmp_path, "-v")
    if "No such option" in console:
        pytest.fail("oomguard run has no -v/--verbose yet (oomguard/cli.py: helper D, see .coord/NOTES.md)")
    assert "Traceback (most recent call last):\nRuntimeError: transient failure at step 2" in console
    assert "child error:" not in console
