"""``oomguard demo``: the built-in recipe on the embedded tiny model, under the supervisor.

On CPU the OOM is injected (a real ``torch.OutOfMemoryError`` raised inside the step);
on a CUDA machine it is genuine: packed long sequences under a VRAM cap that they exceed,
so the ``max_seq_length`` rung is what makes the run fit. The NaN is injected everywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ExitCode
from .recipes.demo import DEMO_INJECT, demo_command
from .report import render_text, summarize
from .supervisor import build_spec, supervise
from .supervisor.gpu import detect_gpu

# On CUDA (measured on an H100, docs/BENCHMARKS.md): packed 2048-token rows at batch 16 peak at
# 3.46 GiB allocated on the tiny model (fp32 logits over its vocabulary dominate; memory grows
# with the tokens in a batch), packed 256-token rows at 0.34 GiB. A 2.6 GiB card (about 0.5 GiB
# of CUDA context outside the allocator cap, 2.1 GiB for tensors) fails at 2048 and fits once
# the max_seq_length rung has cut the rows to about half.
CUDA_CAP = "2.6GiB"
CUDA_EXTRA = ["--packing", "--max_seq_length", "2048", "--per_device_train_batch_size", "16"]
CUDA_INJECT = "nan@step=15"


def run_demo(run_dir: Path, *, max_steps: int = 24, python: str = sys.executable) -> ExitCode:
    gpu = detect_gpu()
    command = demo_command(python, max_steps=max_steps, output_dir=str(run_dir / "checkpoints"))
    if gpu is not None:
        command += CUDA_EXTRA
    spec = build_spec(command, policy_arg="demo", run_dir=run_dir,
                      vram_limit=CUDA_CAP if gpu else None, inject=CUDA_INJECT if gpu else DEMO_INJECT)
    where = f"{gpu.name}, genuine OOM under a {CUDA_CAP} cap" if gpu else "CPU, OOM injected"
    print(f"[oomguard] demo on {where}; run dir {run_dir}", file=sys.stderr, flush=True)
    code = supervise(spec)
    print("\n" + render_text(summarize(run_dir)), file=sys.stderr, flush=True)
    return code
