"""What ``oomguard demo`` runs: the built-in recipe on the embedded tiny model and
data, with two faults injected so that every recovery path shows in a minute on a
laptop CPU. The lead's CLI wraps this in the supervisor.

The faults fire once per run (the guard keeps a fired-set in the run dir), so the
relaunched child passes step 7 and 15 on its second try:
- ``cuda_oom@step=7``: a genuine ``torch.OutOfMemoryError`` raised in the step; the
  supervisor takes the first ``cuda_oom`` rung and resumes from ``checkpoint-4``;
- ``nan@step=15``: a NaN loss; the supervisor rolls back to the last checkpoint with
  finite loss (``checkpoint-12``) and takes the first ``nan_loss`` rung.
``save_steps=4`` makes both rollbacks short and visible.
"""

from __future__ import annotations

import sys

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


def demo_vram_limit_on_cuda() -> str | None:
    """The ``OOMGUARD_VRAM_LIMIT`` for the demo on a CUDA machine: None (no emulated card).

    Why: the tiny model peaks at a few tens of MiB, far below what
    ``torch.cuda.set_per_process_memory_fraction`` can meaningfully cap (it caps
    only PyTorch's caching allocator, not the ~0.5 GiB CUDA context nor
    bitsandbytes' paged buffers, DESIGN §6), and the first CUDA kernels' workspace
    allocations would make a cap that tight fail at start-up, not at step 7. The
    demo therefore relies on ``DEMO_INJECT`` for its OOM on every machine; a real
    emulated-card run needs a real model (``--model``, e.g. an 8B on a 24GiB limit).
    """
    return None
