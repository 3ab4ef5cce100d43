"""Issue 17: the warm spare is on by default; --no-warm-spare and OOMGUARD_WARM_SPARE=0 turn it off.
Attempt 1 never runs in a spare either way (``Spares.take`` serves attempts >= 2 only)."""

from __future__ import annotations

import sys

import pytest

from oomguard.supervisor import build_spec
from oomguard.supervisor.spare import ENV_WARM_SPARE, default_on


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("", True), ("0", False), ("off", False),
                                      ("False", False), ("no", False)])
def test_the_default_follows_the_environment(value, on):
    assert default_on({} if value is None else {ENV_WARM_SPARE: value}) is on


def test_build_spec_keeps_a_spare_unless_told_not_to(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text("import torch\n")
    cmd = [sys.executable, str(script)]
    monkeypatch.delenv(ENV_WARM_SPARE, raising=False)
    assert build_spec(cmd, policy_arg="default", run_dir=tmp_path / "a").warm_spare is True
    assert build_spec(cmd, policy_arg="default", run_dir=tmp_path / "b", warm_spare=False).warm_spare is False
    monkeypatch.setenv(ENV_WARM_SPARE, "0")
    assert build_spec(cmd, policy_arg="default", run_dir=tmp_path / "c").warm_spare is False
    assert build_spec(cmd, policy_arg="default", run_dir=tmp_path / "d", warm_spare=True).warm_spare is True
