"""DESIGN §2: the supervisor side never imports torch (starts fast, cannot hold GPU memory)."""

import subprocess
import sys

import pytest

CHECK = """
import sys, time
t0 = time.perf_counter()
import oomguard.policy, oomguard.supervisor, oomguard.report, oomguard.cli, oomguard.protocol
elapsed = time.perf_counter() - t0
heavy = sorted(m for m in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets") if m in sys.modules)
print(",".join(heavy)); print(elapsed)
"""


def test_supervisor_side_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout.split()
    heavy, elapsed = (out[0], float(out[1])) if len(out) == 2 else ("", float(out[0]))
    assert heavy == "", f"supervisor side imported {heavy}"
    assert elapsed < 3.0, f"importing the supervisor side took {elapsed:.2f} s"


@pytest.mark.parametrize("module", ["oomguard.protocol", "oomguard.errors"])
def test_contract_modules_are_stdlib_only(module):
    code = (f"import sys; before=set(sys.modules); import {module}; "
            "import sys as s; new={m.split('.')[0] for m in set(s.modules)-before}; "
            "print(sorted(n for n in new if n not in s.stdlib_module_names and n != 'oomguard'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
