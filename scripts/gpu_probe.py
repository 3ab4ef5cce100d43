"""Peak GPU memory of the built-in recipe at several shapes, in one process (GPU only).

    python scripts/gpu_probe.py --out probe.json --steps 2 16x2048p 16x256p 8x1024

Each shape ``BxS[p]`` (p = packing) builds the recipe's SFTTrainer on the embedded tiny model
(no guard), trains a few steps, and reports torch's peak allocated/reserved bytes, plus this
process's CUDA context size measured the way the guard measures it for a VRAM cap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as under oomguard

import torch  # noqa: E402

from oomguard.guard.device.vram import measure_context  # noqa: E402
from oomguard.recipes.options import resolve_options  # noqa: E402
from oomguard.recipes.sft import build_trainer  # noqa: E402


def probe(shape: str, steps: int, extra: list[str]) -> dict:
    batch, _, rest = shape.partition("x")
    packing = rest.endswith("p")
    seq = rest.rstrip("p")
    with tempfile.TemporaryDirectory() as out:
        argv = ["--output_dir", out, "--max_steps", str(steps), "--save_steps", "1000", "--no_guard",
                "--per_device_train_batch_size", batch, "--max_seq_length", seq, *extra]
        if packing:
            argv.append("--packing")
        torch.cuda.reset_peak_memory_stats()
        trainer, _ = build_trainer(resolve_options(argv, environ={}))
        result = {"shape": shape, "batch": int(batch), "seq": int(seq), "packing": packing}
        try:
            trainer.train()
            result["ok"] = True
        except torch.OutOfMemoryError as exc:
            result["ok"], result["error"] = False, str(exc).splitlines()[0]
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
        result["peak_reserved"] = torch.cuda.max_memory_reserved()
        del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", nargs="+")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--extra", default="", help="more recipe flags, space separated")
    args = ap.parse_args()
    context, how = measure_context(0)
    rows = [probe(s, args.steps, args.extra.split()) for s in args.shapes]
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "context": context, "context_source": how,
                   "probes": rows}, f, indent=1)


if __name__ == "__main__":
    main()
