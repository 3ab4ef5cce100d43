"""Two GPUs, DDP over NCCL, a genuine CUDA OOM on rank 1 only (issue 8, GPU part).

Run on 2 GPUs (docs/DISTRIBUTED.md has the device command; docs/BENCHMARKS.md the result):

    OOMGUARD_GPU_OUT=benchmarks/gpu python -m pytest -m gpu tests/gpu/test_gpu_ddp.py -s

1. Calibrate: the child script (written below) runs under torchrun with no cap at the big
   batch and at half of it, and reports each rank's peak allocated bytes.
2. Cap rank 1 only (``torch.cuda.set_per_process_memory_fraction`` in that rank, between the
   two peaks); rank 0 keeps the whole card.
3. ``oomguard run -- torchrun --nproc_per_node 2 …``: rank 1 hits a real OOM, both ranks stop,
   the batch rung halves the per-device batch (accumulation x2, global batch kept), both ranks
   resume and the run finishes; the journal names rank 1.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, run_py

BIG, SMALL = 16, 8  # per-device batch; 512 tokens a row

CHILD = textwrap.dedent('''
    """DDP child: a random-weight Llama (~0.3 B) trained with a plain Trainer; rank CAP_RANK is capped."""
    import json, os, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    out, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cap_rank, cap = int(os.environ.get("DDP_CAP_RANK", -1)), int(os.environ.get("DDP_CAP_BYTES", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        if rank == cap_rank and cap:
            total = torch.cuda.get_device_properties(local).total_memory
            torch.cuda.set_per_process_memory_fraction(cap / total, local)

    class Peak(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available() and os.environ.get("DDP_PEAK_OUT"):
                with open(f"{os.environ['DDP_PEAK_OUT']}.rank{rank}", "w") as f:
                    json.dump({"rank": rank, "peak_allocated": torch.cuda.max_memory_allocated(local)}, f)

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    config = LlamaConfig(vocab_size=32000, hidden_size=1024 if cuda else 64, intermediate_size=4096 if cuda else 128,
                         num_hidden_layers=16 if cuda else 2, num_attention_heads=16 if cuda else 4,
                         num_key_value_heads=16 if cuda else 4, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(1, 32000, (512, 512 if cuda else 32), generator=g)]
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=1, save_steps=2, logging_steps=1, learning_rate=1e-4,
                             bf16=cuda, use_cpu=not cuda, report_to="none", seed=0, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Peak()]).train()
''')


@pytest.fixture(autouse=True)
def _needs_two_gpus():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs (DDP over NCCL)")


def torchrun(script: Path, out: Path, steps: int, batch: int) -> list[str]:
    """torchrun as ``python -m torch.distributed.run`` (the GPU image has no console scripts)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(out),
            str(steps), str(batch)]


def peak(tmp_path: Path, script: Path, batch: int) -> int:
    """Rank 1's peak allocated bytes at ``batch`` (no cap, no oomguard)."""
    base = tmp_path / f"peak-{batch}"
    r = run_py(["-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / f"calib-{batch}"),
                "2", str(batch)], env={"DDP_PEAK_OUT": str(base)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(Path(f"{base}.rank1").read_text())["peak_allocated"]


def test_genuine_oom_on_one_rank_recovers_both_ranks(tmp_path, record):
    script = tmp_path / "ddp_child.py"
    script.write_text(CHILD)
    big, small = peak(tmp_path, script, BIG), peak(tmp_path, script, SMALL)
    cap = int((big * small) ** 0.5)  # between the two shapes' peaks, as test_gpu_supervised calibrates
    assert small * 1.1 < cap < big / 1.1, (big, small)
    # knobs = the script's own (batch 16, bf16); a first GPU run with wrap.yaml (batch 4, fp32) trained
    # at batch 4 before the bootstrap learned to keep values a script sets itself
    policy = ROOT / "tests" / "gpu" / "policies" / "ddp.yaml"  # cuda_oom: halve batch, accumulation x2
    run_dir = tmp_path / "run"
    r = run_py(["-m", "oomguard", "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet", "--",
                *torchrun(script, tmp_path / "out", 6, BIG)],
               timeout=900, env={"DDP_CAP_RANK": "1", "DDP_CAP_BYTES": str(cap)})  # the allocator's cap, bytes
    run = json.loads((run_dir / "run.json").read_text())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    ended = [e for e in events if e["event"] == "attempt_ended"]
    record(peaks={"big": big, "small": small}, cap=cap, attempts=run["attempts"], final=run["config"],
           status=run["status"], root_causes=[e.get("root_cause") for e in ended], summary=r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-4000:]
    first = run["attempts"][0]["failure"]
    assert first["kind"] == "cuda_oom" and first["rank"] == 1 and "injected" not in first["detail"]
    assert ended[0]["root_cause"].startswith("rank 1: cuda_oom")
    final = run["config"]
    assert final["per_device_train_batch_size"] < BIG
    assert final["per_device_train_batch_size"] * final["gradient_accumulation_steps"] == BIG
    banners = [e for e in events if e["event"] == "bootstrap_trainer" and e["attempt"] == len(run["attempts"])]
    assert sorted(e["rank"] for e in banners) == [0, 1]
    assert all(e["in_effect"]["per_device_train_batch_size"] == final["per_device_train_batch_size"] for e in banners)
