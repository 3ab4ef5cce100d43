"""Bytes saved and tokens/s cost of the rungs that do not retrain differently (issue 18 item 6), one process.

Llama-3-8B shape (random weights, bench_common), NF4 + double quant, LoRA r=16 on q/k/v/o, bf16 autocast,
plain HF loss (``model(input_ids, labels=...)``), batch x length tokens per step. The model loads once; each
configuration gets a fresh optimizer, one warm-up step and ``--steps`` timed steps:
- gradient checkpointing off / on (use_reentrant False) / on with the saved inputs in pinned host memory
  (``save_on_cpu`` around ``checkpoint``, as transformers 5.24's ``offload=True`` does), reentrant and not;
- paged_adamw_32bit vs paged_adamw_8bit (bitsandbytes; the state lives in managed memory, outside torch's
  counters: its bytes are summed from the state tensors and the device's used memory is read too);
- expandable_segments off vs on (``torch.cuda.memory._set_allocator_settings``) on a fragmenting
  allocation pattern.
It also runs the in-child checks of ``oomguard.guard.free_rungs`` on the live objects. JSON to ``--out``.

    python scripts/bench_free_rungs.py --model /tmp/llama3-8b-random --out /tmp/free.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import random
import time

GiB = 1024 ** 3


def load(path: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.enable_input_require_grads()
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model  # in training mode: checkpointing runs only there (the Trainer calls train())


def set_checkpointing(model, on: bool, offload: bool, reentrant: bool) -> None:
    import torch
    from torch.utils.checkpoint import checkpoint

    if not on:
        model.gradient_checkpointing_disable()
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if not offload:
        return

    def checkpoint_func(function, *args, **kwargs):  # transformers 5.24's offload, for the 5.17 stack
        with torch.autograd.graph.save_on_cpu(pin_memory=True, device_type="cuda"):
            return checkpoint(function, *args, **kwargs)

    func = functools.partial(checkpoint_func, use_reentrant=reentrant)
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = func


def optimizer(model, name: str):
    import bitsandbytes as bnb

    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_torch": None}[name]
    if cls is None:
        import torch
        return torch.optim.AdamW(params, lr=1e-4)
    return cls(params, lr=1e-4)


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if hasattr(t, "numel") and hasattr(t, "element_size"))


def run_config(model, cfg: dict, batch: int, length: int, steps: int) -> dict:
    import torch

    from oomguard.guard import free_rungs

    set_checkpointing(model, cfg["gc"], cfg.get("offload", False), cfg.get("reentrant", False))
    opt = optimizer(model, cfg["optim"])
    ids = torch.randint(0, 128000, (batch, length), device="cuda")
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free0, total = torch.cuda.mem_get_info()
    used_peak, times = 0, []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        used_peak = max(used_peak, total - torch.cuda.mem_get_info()[0])
        del loss
    on, offload = free_rungs.layers_checkpointing(model)
    desc = free_rungs.describe(opt)
    out = {**cfg, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB, "device_used_peak_gib": used_peak / GiB,
           "optimizer_state_mib": state_bytes(opt) / 2 ** 20, "step_s": sorted(times),
           "tokens_per_s": batch * length / (sum(times) / len(times)),
           "seen": {"checkpointing": on, "offload": offload, "optimizer": desc,
                    "optim_matches": free_rungs.optimizer_matches(cfg["optim"], desc)}}
    del opt, ids
    gc.collect()
    torch.cuda.empty_cache()
    print("bench:", json.dumps({k: v for k, v in out.items() if k != "step_s"}), flush=True)
    return out


def fragmentation(expandable: bool, rounds: int = 400) -> dict:
    """Random 8-256 MiB tensors, every other one freed: the gap between reserved and allocated."""
    import torch

    from oomguard.guard import free_rungs

    torch.cuda.empty_cache()
    torch.cuda.memory._set_allocator_settings(f"expandable_segments:{expandable}")
    torch.cuda.reset_peak_memory_stats()
    rng, held, t0 = random.Random(0), [], time.perf_counter()
    for i in range(rounds):
        held.append(torch.empty(rng.randint(8, 256) * 2 ** 20, dtype=torch.uint8, device="cuda"))
        if len(held) > 40:
            held.pop(rng.randrange(len(held)))
    stats = torch.cuda.memory_stats()
    out = {"expandable": expandable, "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
           "inactive_split_gib": stats.get("inactive_split_bytes.all.current", 0) / GiB,
           "seconds": time.perf_counter() - t0, "seen_expandable": free_rungs.allocator_expandable()}
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    out["allocator_settings"] = str(getter()) if callable(getter) else None
    del held
    torch.cuda.empty_cache()
    print("bench:", json.dumps(out), flush=True)
    return out


CONFIGS = [
    {"name": "base", "gc": False, "optim": "paged_adamw_32bit"},
    {"name": "gc", "gc": True, "optim": "paged_adamw_32bit"},
    {"name": "gc+offload", "gc": True, "offload": True, "optim": "paged_adamw_32bit"},
    {"name": "gc+offload(reentrant)", "gc": True, "offload": True, "reentrant": True, "optim": "paged_adamw_32bit"},
    {"name": "gc+8bit", "gc": True, "optim": "paged_adamw_8bit"},
]


def main() -> None:
    import torch
    import transformers
    from bench_common import build_model, versions

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/llama3-8b-random")
    ap.add_argument("--arch", default="8b")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/free_rungs.json")
    ap.add_argument("--skip-fragmentation", action="store_true")
    a = ap.parse_args()
    started = time.time()
    build_model(a.model, a.arch)
    model = load(a.model)
    enable = transformers.PreTrainedModel.gradient_checkpointing_enable
    result = {"versions": versions(), "device": torch.cuda.get_device_name(0), "batch": a.batch, "length": a.length,
              "gc_enable_params": list(inspect.signature(enable).parameters),
              "configs": [run_config(model, c, a.batch, a.length, a.steps) for c in CONFIGS]}
    del model
    gc.collect()
    if not a.skip_fragmentation:
        result["fragmentation"] = [fragmentation(False), fragmentation(True)]
    result["wall_s"] = time.time() - started
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for c in result["configs"]:
        print(f"{c['name']:24s} alloc {c['peak_allocated_gib']:6.2f} reserved {c['peak_reserved_gib']:6.2f} "
              f"device {c['device_used_peak_gib']:6.2f} GiB  opt state {c['optimizer_state_mib']:7.1f} MiB  "
              f"{c['tokens_per_s']:7.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
