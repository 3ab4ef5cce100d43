"""The failed child's quick exit (bootstrap/fast_exit, issue 17 item 2), in real child processes.

The child is a user's script that leaves things to the interpreter's exit: a buffered file it never
closes, an unclosed gzip file (its trailer is written on close), a non-daemon thread still working,
an ``atexit`` handler, a ``finally`` block, a line on stdout and one through C's ``printf``. The guard's
``GuardExit(1)`` (what ``die()`` raises) must leave every one of them as the ordinary exit would, with
the same exit code, and skip only the teardown (an object's ``__del__`` at exit, which CPython does
not promise, shows which way the process ended). Stdlib only: no torch import, ~0.1 s per child.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USER = textwrap.dedent('''
    import atexit, ctypes, gzip, os, sys, threading, time
    from oomguard.bootstrap.fast_exit import GuardExit

    OUT = sys.argv[1]
    HOW = sys.argv[2]

    class Finalized:
        def __del__(self, path=os.path.join(OUT, "del"), write=os.open, close=os.close, flags=os.O_CREAT | os.O_WRONLY):
            close(write(path, flags))  # module globals may be gone by now: only what the defaults hold

    keep = Finalized()
    log = open(os.path.join(OUT, "log.txt"), "w")  # never closed
    log.write("".join(f"line {i}\\n" for i in range(5000)))
    packed = gzip.open(os.path.join(OUT, "log.gz"), "wt")  # never closed
    packed.write("x" * 100000)
    atexit.register(lambda: open(os.path.join(OUT, "atexit"), "w").write("ran"))

    def late():
        time.sleep(0.3)
        open(os.path.join(OUT, "thread"), "w").write("joined")

    threading.Thread(target=late).start()
    print("stdout line")
    ctypes.CDLL(None).printf(b"printf line\\n")

    def train():
        raise GuardExit(1)  # what guard/emergency.die() raises after the error record

    try:
        try:
            train()
        finally:
            open(os.path.join(OUT, "finally"), "w").write("ran")
    except SystemExit:
        if HOW == "caught-3":
            sys.exit(3)
        if HOW == "caught-on":
            pass  # the user goes on: the script ends normally
        else:
            raise
''')


def run_child(tmp_path: Path, how: str, *, module: bool = False, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "user_script.py").write_text(USER)
    out = tmp_path / "out"
    out.mkdir()
    target = ["-m", "user_script"] if module else [str(tmp_path / "user_script.py")]
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}, **env,
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    return subprocess.run([sys.executable, *target, str(out), how], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=environ)


def assert_user_files_complete(out: Path, proc: subprocess.CompletedProcess) -> None:
    assert (out / "log.txt").read_text() == "".join(f"line {i}\n" for i in range(5000))
    assert gzip.decompress((out / "log.gz").read_bytes()).decode() == "x" * 100000  # trailer written
    assert (out / "atexit").read_text() == "ran"
    assert (out / "thread").read_text() == "joined"
    assert (out / "finally").read_text() == "ran"
    assert "stdout line" in proc.stdout and "printf line" in proc.stdout


@pytest.mark.parametrize("module", [False, True], ids=["script", "-m"])
def test_the_guards_exit_keeps_what_the_user_left_to_the_exit_and_its_code(tmp_path, module):
    proc = run_child(tmp_path, "raise", module=module)
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stderr
    assert_user_files_complete(out, proc)
    assert not (out / "del").exists()  # the teardown was skipped: the fast path ran


@pytest.mark.parametrize("how, code", [("caught-3", 3), ("caught-on", 0)])
def test_a_user_who_catches_the_exit_gets_the_ordinary_one(tmp_path, how, code):
    proc = run_child(tmp_path, how)
    out = tmp_path / "out"
    assert proc.returncode == code, proc.stderr
    assert_user_files_complete(out, proc)
    assert (out / "del").exists()


def test_fast_exit_off_is_the_ordinary_exit(tmp_path):
    proc = run_child(tmp_path, "raise", OOMGUARD_FAST_EXIT="0")
    assert proc.returncode == 1, proc.stderr
    assert_user_files_complete(tmp_path / "out", proc)
    assert (tmp_path / "out" / "del").exists()


def test_the_exit_is_a_system_exit_everywhere_else():
    from oomguard.bootstrap.fast_exit import GuardExit

    with pytest.raises(SystemExit) as info:
        raise GuardExit(1)
    assert info.value.code == 1 and info.value.args == (1,)  # read from Python: no exit


LAUNCHER = textwrap.dedent('''\
    import atexit, os, sys
    OUT = sys.argv[1]
    class Mark:
        def __del__(self, path=os.path.join(OUT, "del"), write=os.open, close=os.close, flags=os.O_CREAT | os.O_WRONLY):
            close(write(path, flags))
    mark = Mark()
    log = open(os.path.join(OUT, "log.txt"), "w")
    log.write("".join(f"line {i}\\n" for i in range(5000)))
    atexit.register(lambda: open(os.path.join(OUT, "atexit"), "w").write("ran"))
    if sys.argv[2] == "printed":  # prints an exception and goes on: not the top level
        try:
            raise ValueError("shown, then the launcher goes on")
        except ValueError:
            sys.excepthook(*sys.exc_info())
        sys.exit(0)
    if sys.argv[2] == "interrupt":
        raise KeyboardInterrupt
    raise RuntimeError("the worker failed")
''')


def run_launcher(tmp_path: Path, how: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A process named like a launcher (``accelerate``) under the bootstrap, ending as ``how`` says."""
    script = tmp_path / "accelerate"
    script.write_text(LAUNCHER)
    out = tmp_path / f"out-{how}-{env.get('OOMGUARD_FAST_EXIT', 'on')}"
    out.mkdir()
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}, **env,
               "OOMGUARD_RUN_DIR": str(tmp_path / "run"),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "oomguard" / "bootstrap" / "site"), str(ROOT)])}
    (tmp_path / "run").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(script), str(out), how], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=environ)
    return proc, out


def test_a_launcher_whose_worker_failed_exits_fast_with_its_traceback_code_and_files(tmp_path):
    fast, fast_out = run_launcher(tmp_path, "raise")
    slow, slow_out = run_launcher(tmp_path, "raise", OOMGUARD_FAST_EXIT="0")
    assert fast.returncode == slow.returncode == 1
    assert fast.stderr == slow.stderr and fast.stderr.rstrip().endswith("RuntimeError: the worker failed")
    for out in (fast_out, slow_out):
        assert (out / "log.txt").read_text() == "".join(f"line {i}\n" for i in range(5000))
        assert (out / "atexit").read_text() == "ran"
    assert (slow_out / "del").exists() and not (fast_out / "del").exists()  # finalization skipped: the fast path ran


@pytest.mark.parametrize("how,code", [("printed", 0), ("interrupt", -signal.SIGINT)])
def test_a_launcher_that_prints_an_exception_or_is_interrupted_exits_as_ever(tmp_path, how, code):
    proc, out = run_launcher(tmp_path, how)
    assert proc.returncode == code, proc.stderr
    assert (out / "del").exists() or how == "interrupt"  # the ordinary exit ran its finalization
