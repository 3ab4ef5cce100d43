"""``oomguard demo``: run the demo under the supervisor and print its summary.

What runs (the built-in recipe's command, the faults, the emulated card on CUDA) is data in
:mod:`oomguard.recipes.demo_plan`; this module only runs it. On CPU the OOM is injected (a real
``torch.OutOfMemoryError`` raised inside the step); on a CUDA machine it is genuine: packed long
sequences under a VRAM cap that they exceed, so the ``max_seq_length`` rung is what makes the run fit.
The NaN is injected everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ExitCode
from .recipes.demo_plan import demo_plan
from .report import render_text, summarize
from .supervisor import build_spec, supervise
from .supervisor.gpu import detect_gpu

__all__ = ["run_demo"]


def run_demo(run_dir: Path, *, max_steps: int = 24, python: str = sys.executable) -> ExitCode:
    gpu = detect_gpu()
    plan = demo_plan(gpu_name=gpu.name if gpu is not None else None, output_dir=str(run_dir / "checkpoints"),
                     max_steps=max_steps, python=python)
    spec = build_spec(plan.command, policy_arg="demo", run_dir=run_dir, vram_limit=plan.vram_limit,
                      inject=plan.inject)
    print(f"[oomguard] demo on {plan.where}; run dir {run_dir}", file=sys.stderr, flush=True)
    code = supervise(spec)
    print("\n" + render_text(summarize(run_dir)), file=sys.stderr, flush=True)
    return code
