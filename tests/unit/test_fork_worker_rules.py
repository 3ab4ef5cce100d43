"""The warm launcher's rules for forking its worker (oomguard/spare/fork_worker.py), without a launcher: which
environment changes and which Popen calls a pre-forked worker can stand in for. The integration tests
(tests/integration/test_spare_launcher.py) run them through real accelerate launches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from oomguard.spare import fork_worker


@pytest.fixture
def armed(monkeypatch):
    environ = {"PATH": "/bin", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    pre = {"pid": -1, "fd": -1, "err": -1, "environ": environ, "stdio": fork_worker._stdio(), "kmp_unread": True}
    monkeypatch.setattr(fork_worker, "_state", {"saved": object(), "pre": pre, "why": None})
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "accelerate.commands.launch"])
    return pre


def test_what_the_launcher_sets_and_nothing_reads_at_import_may_differ(armed):
    env = {**armed["environ"], "ACCELERATE_MIXED_PRECISION": "bf16", "MASTER_PORT": "29500", "OMP_NUM_THREADS": "4",
           "KMP_BLOCKTIME": "1"}
    assert fork_worker.why_not([sys.executable, "train.py", "--x"], env) is None
    assert fork_worker.why_not([sys.executable, "-m", "pkg.train"], env) is None


@pytest.mark.parametrize(("change", "words"), [
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES"),
    ({"PYTORCH_CUDA_ALLOC_CONF": ""}, "PYTORCH_CUDA_ALLOC_CONF"),
    ({"OMP_NUM_THREADS": "four"}, "OMP_NUM_THREADS='four'"),
])
def test_a_change_read_at_import_or_unusable_starts_the_worker_cold(armed, change, words):
    assert words in fork_worker.why_not([sys.executable, "train.py"], {**armed["environ"], **change})


def test_kmp_counts_where_intel_openmp_is_loaded(armed):
    armed["kmp_unread"] = False
    assert "KMP_AFFINITY" in fork_worker.why_not([sys.executable, "t.py"], {**armed["environ"], "KMP_AFFINITY": "x"})


def test_another_interpreter_or_a_taken_pre_worker_starts_cold(armed, monkeypatch):
    assert "not `" in fork_worker.why_not(["/usr/bin/python3.9", "t.py"], armed["environ"])
    assert "not `" in fork_worker.why_not([sys.executable, "-c", "pass"], armed["environ"])
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-X", "dev", "-m", "accelerate.commands.launch"])
    assert "options (-X)" in fork_worker.why_not([sys.executable, "t.py"], armed["environ"])
    fork_worker._state["pre"] = None
    assert "taken" in fork_worker.why_not([sys.executable, "t.py"], armed["environ"])


def _call(**popen) -> dict:
    """The arguments Popen would give _execute_child for ``Popen([python, t.py], env=..., **popen)``."""
    seen = {}

    class Spy(subprocess.Popen):
        def _execute_child(self, *args, **kwargs):
            seen.update(fork_worker._EXECUTE.bind(self, *args, **kwargs).arguments)
            raise OSError("not started")

    with pytest.raises(OSError):
        Spy([sys.executable, "t.py"], env=dict(os.environ), **popen)
    return seen


def test_only_a_plain_popen_or_a_piped_stderr_can_be_a_fork():
    assert fork_worker._call_problem(_call()) is None
    assert fork_worker._call_problem(_call(stderr=subprocess.PIPE)) is None  # accelerate >= 1.16 tees it
    assert "c2pwrite" in fork_worker._call_problem(_call(stdout=subprocess.PIPE))
    assert "p2cread" in fork_worker._call_problem(_call(stdin=subprocess.PIPE))
    assert "errwrite" in fork_worker._call_problem(_call(stderr=subprocess.STDOUT))
    assert "cwd" in fork_worker._call_problem(_call(cwd="/"))
    assert "start_new_session" in fork_worker._call_problem(_call(start_new_session=True))
