"""Compatibility matrix: a user's plain ``transformers.Trainer`` script (``tests/integration/
_wrap_trainer_script.py``: its own ``auto_find_batch_size=True``, no flag for any knob, so every change
goes in-process) under ``oomguard run`` through an injected OOM and then an injected NaN, on the stack of
the venv running this test (``_compat_checks`` says what is run and checked)."""

from __future__ import annotations

import sys

import pytest
from _compat_checks import INTEGRATION, STEPS, check_recovered, wrapped

pytestmark = pytest.mark.slow


def test_trainer_script_recovers_from_an_oom_then_a_nan_with_exact_resume(tmp_path):
    out = tmp_path / "out"
    child = wrapped(tmp_path, [sys.executable, str(INTEGRATION / "_wrap_trainer_script.py"), str(out), str(STEPS)],
                    out)
    check_recovered(child)
    assert [a["delivered"].get("per_device_train_batch_size") for a in child.run["attempts"][1:]] == \
        ["in_process", "in_process"]
