"""`pip install oomguard` is the light core: no training stack, and the supervisor still does its whole job.

A fresh venv gets the project installed as a user would (a non-editable install of a copy of the
source, from the package index for its few dependencies). It must hold none of torch, transformers,
trl, peft, bitsandbytes, datasets, accelerate; `pip check` is clean; `--help`, `policy validate`,
`report` work; `demo` says which command installs the recipe's stack; and `oomguard run` from that
venv supervises a child whose own interpreter has the stack (this test's), through an injected OOM,
with the batch rung verified from the child's own `training_args.bin`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from oomguard.recipes import TRAINING_STACK

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> Path:
    """``<tmp>/venv/bin``: a fresh venv with ``pip install <copy of the project>``."""
    base = tmp_path_factory.mktemp("light")
    src = base / "src"
    shutil.copytree(ROOT / "oomguard", src / "oomguard", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv.EnvBuilder(with_pip=True).create(base / "venv")
    bin_dir = base / "venv" / "bin"
    proc = subprocess.run([str(bin_dir / "pip"), "install", "-q", str(src)], capture_output=True, text=True,
                          timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return bin_dir


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOMGUARD_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env


def _run(*argv: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env())


def test_the_core_installs_no_training_stack_and_pip_check_is_clean(light, tmp_path):
    probe = "import importlib.util, json; print(json.dumps([m for m in %r if importlib.util.find_spec(m)]))"
    found = _run(str(light / "python"), "-c", probe % (TRAINING_STACK,), cwd=tmp_path)
    assert found.returncode == 0 and json.loads(found.stdout) == [], found.stdout + found.stderr
    check = _run(str(light / "pip"), "check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    requires = _run(str(light / "python"), "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('oomguard')))",
                    cwd=tmp_path).stdout.splitlines()
    core = [r for r in requires if "extra ==" not in r]
    assert core and not [r for r in core if r.split(">")[0].split("=")[0].strip() in TRAINING_STACK], core
    train = {r.split(">")[0].split("=")[0].strip() for r in requires if 'extra == "train"' in r}
    assert train == set(TRAINING_STACK), train


def test_help_validate_and_demo_without_the_stack(light, tmp_path):
    assert _run(str(light / "oomguard"), "--help", cwd=tmp_path).returncode == 0
    valid = _run(str(light / "oomguard"), "policy", "validate", str(ROOT / "oomguard" / "policies" / "rtx-24gb.yaml"),
                 cwd=tmp_path)
    assert valid.returncode == 0, valid.stderr
    demo = _run(str(light / "oomguard"), "demo", cwd=tmp_path)
    assert demo.returncode == 2 and 'pip install "oomguard[train]"' in demo.stderr, demo.stderr
    assert "torch" in demo.stderr and "Traceback" not in demo.stderr


def test_the_light_supervisor_recovers_a_child_with_its_own_stack(light, tmp_path):
    """The child is this test's interpreter (torch, transformers and oomguard installed there)."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    proc = _run(str(light / "oomguard"), "run", "--policy", str(HERE / "policies" / "wrap_adopt.yaml"),
                "--run-dir", str(run_dir), "--quiet", "--inject", "cuda_oom@step=3", "--",
                sys.executable, str(HERE / "_wrap_trainer_script.py"), str(out), "4", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(
        p.read_text()[-2000:] for p in sorted(run_dir.glob("attempts/*/stderr.log")))
    import torch

    args = torch.load(out / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2)
    report = _run(str(light / "oomguard"), "report", str(run_dir), "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    document = json.loads(report.stdout)
    assert document["status"] == "succeeded" and len(document["attempts"]) == 2
