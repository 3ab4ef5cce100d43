"""Compatibility matrix: ``pip install oomguard`` into a venv that already holds a training stack changes
none of its packages, and ``pip check`` stays clean (the core has no torch/transformers/... dependency).

On every stack: ``pip check`` of this venv is clean, and ``pip install --dry-run --report`` of a copy of
the project would install oomguard and nothing that this venv already has at another version.
On the old stack (``scripts/compat.sh``) the install was also done for real before the tests ran, into
the venv holding exactly the pins: ``pip freeze`` before and after it (``OOMGUARD_COMPAT_RECORD``) must
show no package removed or at another version, and ``pip check`` after it was clean.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _compat_checks import STACK, pins

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze(path: Path) -> dict[str, str]:
    """``pip freeze --all`` lines as ``name -> version`` (``name @ url`` lines: ``name -> url``)."""
    out = {}
    for line in path.read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
        elif " @ " in line:
            name, version = line.split(" @ ", 1)
        else:
            continue
        out[canon(name)] = version.strip()
    return out


def pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOMGUARD_", "PYTHONPATH"))}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd, env=env)


def test_installing_oomguard_changes_no_package_and_pip_check_stays_clean(tmp_path):
    check = pip("check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr

    src = tmp_path / "src"
    shutil.copytree(ROOT / "oomguard", src / "oomguard", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dry = pip("install", "--dry-run", "--quiet", "--report", str(tmp_path / "report.json"), str(src), cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    would = {canon(i["metadata"]["name"]): i["metadata"]["version"]
             for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    have = {canon(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert "oomguard" in would, would
    changed = {n: (have[n], v) for n, v in would.items() if n != "oomguard" and n in have and have[n] != v}
    assert not changed, f"pip install <project> would change packages of this venv (have, would): {changed}"

    if STACK != "old":
        return
    record = Path(os.environ.get("OOMGUARD_COMPAT_RECORD", "")) if os.environ.get("OOMGUARD_COMPAT_RECORD") else None
    assert record is not None and (record / "freeze-after.txt").is_file(), \
        "OOMGUARD_COMPAT_RECORD names no install record: run the old stack through scripts/compat.sh"
    before, after = freeze(record / "freeze-before.txt"), freeze(record / "freeze-after.txt")
    assert "oomguard" not in before and "oomguard" in after, (before.get("oomguard"), after.get("oomguard"))
    # the venv the install went into held exactly the pinned old stack
    assert {canon(n): before.get(canon(n)) for n in pins()} == {canon(n): v for n, v in pins().items()}
    assert before["torch"].startswith(os.environ.get("OOMGUARD_TORCH", "2.13.0"))
    moved = {n: (v, after.get(n, "<removed>")) for n, v in before.items() if after.get(n) != v}
    assert not moved, f"pip install <project> changed packages of the old stack (before, after): {moved}"
    added = sorted(set(after) - set(before))
    assert not set(added) & {canon(n) for n in ("torch", "transformers", "trl", "peft", "datasets",
                                                "accelerate", "bitsandbytes")}, added
    assert (record / "pip-check.rc").read_text().strip() == "0", (record / "pip-check.txt").read_text()
