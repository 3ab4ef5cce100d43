"""The user's own tracker through an OOM: ONE TensorBoard run covering every step, with oomguard's scalars.

A transformers-examples script (``commands/hf_script.py``: HfArgumentParser, plain Trainer, LoRA)
with ``--report_to tensorboard`` and no ``logging_dir``: alone, each launch opens a new run under
``<output_dir>/runs/<time>_<host>``. Under ``oomguard run`` with an injected CUDA OOM at step 3 the
restarted attempt must write into attempt 1's run, and the run must hold ``oomguard/*`` scalars
beside ``train/*``. Read from TensorBoard's own event files (its EventAccumulator), not the journal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _wrap_run import oomguard_run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the [test] extra

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
OOM_POLICY = HERE / "policies" / "matrix_oom.yaml"  # cuda_oom: two rungs no child has, then halve_batch


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_one_tensorboard_run_spans_the_attempts_with_oomguard_scalars(tmp_path, model_dir, data_dir):
    """On a CUDA machine the same test trains on the GPU and also finds the allocator figures."""
    import torch

    cuda = torch.cuda.is_available()
    out, run_dir = tmp_path / "out", tmp_path / "run"
    oomguard_run(run_dir, OOM_POLICY, sys.executable, str(HERE / "commands" / "hf_script.py"),
                 "--model_path", str(model_dir), "--data_path", str(data_dir / "train.jsonl"),
                 "--output_dir", str(out), "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", *([] if cuda else ["--use_cpu"]),
                 "--report_to", "tensorboard", "--dataloader_num_workers", "0")
    assert len(list((run_dir / "attempts").iterdir())) == 2, "the injected OOM must cost exactly one restart"
    runs = sorted({p.parent for p in (out / "runs").rglob("events.out.tfevents.*")})
    assert len(runs) == 1, f"one TensorBoard run across the attempts, found {[str(r) for r in runs]}"
    assert len(list(runs[0].glob("events.out.tfevents.*"))) == 2, "each attempt writes its own event file"
    scalars = _scalars(runs[0])
    loss_steps = {step for step, _ in scalars["train/loss"]}
    assert loss_steps == set(range(1, 7)), f"train/loss must cover steps 1..6 in the one run: {sorted(loss_steps)}"
    attempts = {value for _, value in scalars["train/oomguard/attempt"]}
    assert attempts == {1.0, 2.0}, f"oomguard/attempt must mark both attempts: {attempts}"
    restarts = dict(scalars["train/oomguard/restarts"])
    assert restarts[6] == 1.0 and restarts[1] == 0.0
    if cuda:  # the memory monitor's figures reach the tracker too (CPU has only host RSS)
        allocated = dict(scalars["train/oomguard/allocated_gib"])
        assert set(allocated) == set(range(1, 7)) and all(v > 0 for v in allocated.values()), allocated
        assert "train/oomguard/fragmentation_gib" in scalars and "train/oomguard/alloc_retries" in scalars
    else:
        assert "train/oomguard/host_rss_gib" in scalars
