"""A user's QLoRA script for the warm-spare GPU test: what it saw of CUDA at its start, then one
4-bit LoRA training step on a tiny Llama. ``python _spare_qlora_child.py OUT.json MODEL_DIR``."""

import json
import os
import sys
import time

t0 = time.perf_counter()
import bitsandbytes  # noqa: E402,F401
import peft  # noqa: E402
import torch  # noqa: E402
import trl  # noqa: E402,F401
from bitsandbytes import cextension  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from oomguard.spare.cuda_view import driver_initialised  # noqa: E402

seen = {"imports_s": time.perf_counter() - t0, "cuda_initialized_at_start": torch.cuda.is_initialized(),
        "driver_initialised_at_start": driver_initialised(), "bnb_backend": cextension.BNB_BACKEND,
        "bnb_lib": type(cextension.lib).__name__, "pid": os.getpid()}
torch.manual_seed(0)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], quantization_config=quant, device_map={"": 0})
model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
opt = bitsandbytes.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
ids = torch.randint(1, 128, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
losses = []
for _ in range(2):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
seen.update(losses=losses, device=torch.cuda.get_device_name(0), seconds=time.perf_counter() - t0)
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
