"""Two gloo ranks train a small model sharded with FSDP2 (``fully_shard``) on CPU and save checkpoints
in the layout HF Trainer + accelerate write under FSDP ``SHARDED_STATE_DICT``: ``checkpoint-N/`` with
``pytorch_model_fsdp_0/`` and ``optimizer_0/`` (torch.distributed.checkpoint folders, written by
torch's own DCP writer), ``rng_state_<rank>.pth`` per rank, ``scheduler.pt``, ``trainer_state.json``
(rank 0, last, as HF does).

HF Trainer itself cannot run FSDP on CPU (accelerate falls back to DDP there, measured with
transformers 5.24 / accelerate 1.15), so this script writes the same files itself.

Usage: torchrun --standalone --nproc-per-node 2 _fsdp_dcp_script.py OUTPUT_DIR STEPS SAVE_EVERY
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard


def main(out: str, steps: int, every: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step % every == 0:
            ckpt = os.path.join(out, f"checkpoint-{step}")
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd}, checkpoint_id=os.path.join(ckpt, "pytorch_model_fsdp_0"))
            dcp.save({"optimizer": osd}, checkpoint_id=os.path.join(ckpt, "optimizer_0"))
            torch.save({"python": 0, "rank": rank}, os.path.join(ckpt, f"rng_state_{rank}.pth"))
            dist.barrier()
            if rank == 0:
                torch.save({"last_epoch": step}, os.path.join(ckpt, "scheduler.pt"))
                with open(os.path.join(ckpt, "trainer_state.json"), "w") as f:
                    json.dump({"global_step": step, "log_history": []}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
