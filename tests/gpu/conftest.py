"""GPU tests: run on a CUDA machine with `scripts/gpu_check.sh` (`pytest -m gpu tests/gpu`).

Each test writes what it measured to $OOMGUARD_GPU_OUT/<test>.json (docs/BENCHMARKS.md
quotes them); without that variable the numbers go to the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items):
    for item in items:  # this hook sees the whole session: mark only the tests in tests/gpu
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _needs_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture
def record(request, tmp_path):
    out = Path(os.environ.get("OOMGUARD_GPU_OUT") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)

    def write(**numbers):
        path = out / f"{request.node.name.replace('[', '_').replace(']', '')}.json"
        path.write_text(json.dumps(numbers, indent=1, default=str))
        print(json.dumps(numbers, default=str))

    return write


def run_py(code_or_args: list[str], timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **(env or {})})
