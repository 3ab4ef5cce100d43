"""One expensive run shared by the tests of several files (CI time: each run is real child processes that
import torch and train): ``shared_dir(tmp_path_factory, key, make)`` calls ``make(directory)`` once per test
session, even across the xdist workers (a file lock beside the directory; a second caller waits for the
first and reads what it left), and returns the directory. The run is the same one whichever file asks
first, so every file that reads it still checks it from the child's own files. A ``make`` that fails leaves
no result: the next caller runs it again (and fails the same way, with its own message).

``tests/integration/conftest.py`` orders the files so that a reader usually comes after its producer on
either worker (LONGEST_FIRST / LAST); the lock only makes a reader that is early wait, never wrong."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["shared_dir"]


def _root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's basetemp is <session>/popen-gwN: the session's dir is their common parent
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_dir(tmp_path_factory, key: str, make: Callable[[Path], object]) -> Path:
    root = _root(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / key, root / f"{key}.done"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir()
                make(path)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def shared_demo(tmp_path_factory, max_steps: int = 24) -> tuple[int, str, Path]:
    """``oomguard demo --run-dir D --max-steps N`` (N 24 is the demo's default), run once for test_demo.py and
    test_report_html.py: (exit code, stderr, D). Started outside the checkout (cwd: the shared dir), as a user's
    terminal would; the code on PYTHONPATH."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]

    def make(path: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        r = subprocess.run([sys.executable, "-m", "oomguard", "demo", "--run-dir", str(path / "run"),
                            "--max-steps", str(max_steps)], capture_output=True, text=True, check=False,
                           timeout=900, cwd=path, env=env)
        (path / "stderr.txt").write_text(r.stderr)
        (path / "rc").write_text(str(r.returncode))

    path = shared_dir(tmp_path_factory, f"demo-{max_steps}", make)
    return int((path / "rc").read_text()), (path / "stderr.txt").read_text(), path / "run"
