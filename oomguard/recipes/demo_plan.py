"""What ``oomguard demo`` runs — the built-in recipe's command line, the faults and the card — as data.

Running it under the supervisor and printing the summary is :mod:`oomguard.demo` (the CLI's
``oomguard demo``); this module only says what runs, so it imports nothing heavy.

On CPU (the embedded tiny model and data) two faults are injected so that every recovery path shows in
a minute on a laptop; they fire once per run (the guard keeps a fired-set in the run dir), so the
relaunched child passes step 7 and 15 on its second try:
- ``cuda_oom@step=7``: a genuine ``torch.OutOfMemoryError`` raised in the step; the
  supervisor takes the first ``cuda_oom`` rung and resumes from ``checkpoint-4``;
- ``nan@step=15``: a NaN loss; the supervisor rolls back to the last checkpoint with
  finite loss (``checkpoint-12``) and takes the first ``nan_loss`` rung.
``save_steps=4`` makes both rollbacks short and visible.

On CUDA the OOM is genuine (:data:`CUDA_EXTRA` under :data:`CUDA_CAP`); only the NaN is injected.
"""

from __future__ import annotations

import dataclasses
import sys

__all__ = ["CUDA_CAP", "CUDA_EXTRA", "CUDA_INJECT", "DEMO_INJECT", "DEMO_KNOBS", "DemoPlan", "demo_command",
           "demo_plan", "demo_vram_limit_on_cuda"]

DEMO_INJECT = "cuda_oom@step=7;nan@step=15"

# Knobs the demo starts from: small enough for ~0.1-0.3 s a step on 2 CPU cores,
# big enough that the OOM ladder's first rungs (max_seq_length 256 -> 128, batch
# 4 -> 2 with accumulation 2 -> 4) change something a reader can see.
DEMO_KNOBS = {
    "max_seq_length": 256,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "lora_r": 8,
    "lora_alpha": 16,
}

# On CUDA (measured on an H100, docs/BENCHMARKS.md): packed 2048-token rows at batch 16 peak at
# 3.46 GiB allocated on the tiny model (fp32 logits over its vocabulary dominate; memory grows
# with the tokens in a batch), packed 256-token rows at 0.34 GiB. A 2.6 GiB card (about 0.5 GiB
# of CUDA context outside the allocator cap, 2.1 GiB for tensors) fails at 2048 and fits once
# the max_seq_length rung has cut the rows to about half.
CUDA_CAP = "2.6GiB"
CUDA_EXTRA = ["--packing", "--max_seq_length", "2048", "--per_device_train_batch_size", "16"]
CUDA_INJECT = "nan@step=15"


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    command: list[str]
    vram_limit: str | None  # the emulated card (``--vram-limit``), None on CPU
    inject: str  # ``--inject``
    where: str  # one line for the console


def demo_command(python: str = sys.executable, *, max_steps: int = 24, save_steps: int = 4,
                 output_dir: str) -> list[str]:
    """The recipe command line for ``oomguard demo`` (model and data: the embedded default).

    Under the supervisor ``OOMGUARD_CHECKPOINT_DIR`` / ``OOMGUARD_KNOBS`` override
    ``--output_dir`` and the knob flags.
    """
    command = [
        python, "-m", "oomguard.recipes.sft",
        "--output_dir", output_dir,
        "--max_steps", str(max_steps),
        "--save_steps", str(save_steps),
        "--logging_steps", "1",
        "--warmup_ratio", "0.1",
        "--seed", "42",
    ]
    for knob, value in DEMO_KNOBS.items():
        command += [f"--{knob}", str(value)]
    return command


def demo_plan(*, gpu_name: str | None, output_dir: str, max_steps: int = 24,
              python: str = sys.executable) -> DemoPlan:
    """The demo on this machine: ``gpu_name`` None is CPU (OOM injected), else CUDA (OOM genuine). Pure."""
    command = demo_command(python, max_steps=max_steps, output_dir=output_dir)
    if gpu_name is None:
        return DemoPlan(command, None, DEMO_INJECT, "CPU, OOM injected")
    return DemoPlan(command + CUDA_EXTRA, CUDA_CAP, CUDA_INJECT, f"{gpu_name}, genuine OOM under a {CUDA_CAP} cap")


def demo_vram_limit_on_cuda() -> str | None:
    """The emulated card for :func:`demo_command` as it stands (short unpacked rows): None.

    Why: those rows peak at a few tens of MiB, far below what
    ``torch.cuda.set_per_process_memory_fraction`` can meaningfully cap (it caps only PyTorch's
    caching allocator, not the ~0.5 GiB CUDA context nor bitsandbytes' paged buffers, DESIGN §6),
    and the first CUDA kernels' workspace allocations would make a cap that tight fail at start-up,
    not at a step. The CUDA demo therefore adds :data:`CUDA_EXTRA` (long packed rows) and only
    then caps the card at :data:`CUDA_CAP` (:func:`demo_plan`).
    """
    return None
