"""Run an unchanged command under ``oomguard run`` as a user would (the wrap and wrapped-resume tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _env import user_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def oomguard_run(run_dir: Path, policy: Path, *command: str, inject: str | None = "cuda_oom@step=3",
                 warm_spare: bool | None = None) -> subprocess.CompletedProcess:
    """``oomguard run --policy P [--inject I] -- COMMAND`` to success (the child's stderr on failure)."""
    env = user_env()
    # the project first; a PYTHONPATH the machine needs for its packages (the GPU machine's wheels) kept after it
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": path,
                "TOKENIZERS_PARALLELISM": "false"})
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet",
           *(["--inject", inject] if inject else []),
           *([] if warm_spare is None else ["--warm-spare" if warm_spare else "--no-warm-spare"]), "--", *command]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"oomguard run failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n" + \
        "".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("attempts/*/stderr.log")))
    return proc
