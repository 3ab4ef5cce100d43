"""The benchmark's "user script": classic QLoRA SFT code that knows nothing about oomguard.

scripts/bench_recovery.py runs it three ways: as is (plain HF), with ``--auto_find_batch_size``
(HF's own OOM answer), and unchanged under ``python -m oomguard run -- python scripts/bench_train.py …``
(the wrap path: the bootstrap guards the Trainer, flags carry the knobs).

    python scripts/bench_train.py --model DIR --dataset rows.jsonl --output_dir out \\
        --max_seq_length 2048 --per_device_train_batch_size 8 --bf16 --max_steps 4 [--trainer sft|hf] \\
        [--auto_find_batch_size] [--leak] [--vram_limit 24GiB] [--events events.jsonl]

The model is loaded the classic way: NF4 + double quant, ``prepare_model_for_kbit_training`` (which
upcasts embeddings and lm_head to fp32), LoRA on q/k/v/o, gradient checkpointing, paged AdamW.
``--trainer sft`` trains with TRL's ``SFTTrainer``; ``--trainer hf`` with ``transformers.Trainer`` and
the model's own loss (full logits). ``--leak`` adds the bug of a user whose forward hooks keep every
2nd decoder layer's output "for activation statistics" instead of a number: the list grows by
16·b·s·hidden·2 bytes per forward (0.5 GiB per 2 x 2048 micro-batch on the 8B shape).

Bench-only extras (a user's script would not have them): ``--vram_limit`` emulates a smaller card
for the baselines with the same function oomguard uses (under ``oomguard run`` pass the supervisor's
``--vram-limit`` instead); ``--events`` appends one JSON line per train start, optimizer step and end
(time, batch size, non-padding tokens, loss) for the benchmark's numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

KEPT: list = []  # the --leak bug: never cleared
TOKENS = [0]  # non-padding tokens in the current optimizer step
NONFINITE = [0]  # micro-batches of the current optimizer step whose loss was NaN/inf (the logged loss hides them)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--max_seq_length", type=int, default=2048)
    ap.add_argument("--per_device_train_batch_size", type=int, default=2)
    ap.add_argument("--gradient_accumulation_steps", type=int, default=1)
    ap.add_argument("--lora_r", type=int, default=16)
    ap.add_argument("--lora_alpha", type=int, default=32)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--learning_rate", type=float, default=2e-4)
    ap.add_argument("--max_grad_norm", type=float, default=0.3)
    ap.add_argument("--per_device_eval_batch_size", type=int, default=2)
    ap.add_argument("--dataloader_num_workers", type=int, default=0)
    ap.add_argument("--max_steps", type=int, default=4)
    ap.add_argument("--save_steps", type=int, default=2)
    ap.add_argument("--logging_steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--trainer", choices=("sft", "hf"), default="sft")
    ap.add_argument("--auto_find_batch_size", action="store_true")
    ap.add_argument("--leak", action="store_true")
    ap.add_argument("--vram_limit", default=None)
    ap.add_argument("--events", default=None)
    return ap.parse_args(argv)


def precision(args) -> str:
    return "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"


def emit(path: str | None, event: str, **fields) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), "pid": os.getpid(), **fields}) + "\n")


def load_model(args):
    """The classic QLoRA load: 4-bit NF4 base, k-bit preparation (fp32 upcast), LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision(args)]
    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0 if cuda else "cpu"})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.leak:
        add_leaky_hooks(model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "right"
    return model, tokenizer


def add_leaky_hooks(model, every: int = 2) -> None:
    """The bug: hooks meant to log activation statistics keep the tensors themselves."""
    layers = next(m for name, m in model.named_modules() if name.endswith("layers") and hasattr(m, "__len__"))
    for i, layer in enumerate(layers):
        if i % every == 0:
            layer.register_forward_hook(lambda mod, inp, out: KEPT.append(out[0] if isinstance(out, tuple) else out))


def fp32_adapter(model) -> None:
    """Trainable weights in fp32 (QLoRA's master weights; fp16's GradScaler needs fp32 gradients)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def training_kwargs(args) -> dict:
    """TrainingArguments fields shared by both trainers (the gradient checkpointing name moved in 5.23)."""
    from transformers import TrainingArguments

    names = set(TrainingArguments.__dataclass_fields__)
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    ckpt_kwargs = {f"{ckpt}_kwargs": {"use_reentrant": False}}
    cuda = torch.cuda.is_available()
    return dict(output_dir=args.output_dir, per_device_train_batch_size=args.per_device_train_batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
                max_grad_norm=args.max_grad_norm, max_steps=args.max_steps, save_steps=args.save_steps,
                logging_steps=args.logging_steps, seed=args.seed, lr_scheduler_type="constant",
                optim="paged_adamw_32bit" if cuda else "adamw_torch", bf16=args.bf16, fp16=args.fp16,
                auto_find_batch_size=args.auto_find_batch_size, report_to="none",
                dataloader_num_workers=args.dataloader_num_workers,
                per_device_eval_batch_size=args.per_device_eval_batch_size, use_cpu=not cuda,
                **{ckpt: True}, **ckpt_kwargs)


class Counting:
    """Mixin: counts the non-padding tokens of each optimizer step (bench bookkeeping)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        mask = inputs.get("attention_mask")
        TOKENS[0] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss = out[0] if isinstance(out, tuple) else out
        NONFINITE[0] += int(not torch.isfinite(loss.detach()).all())
        return out


class Recorder(TrainerCallback):
    def __init__(self, path: str | None):
        self.path = path

    def on_train_begin(self, args, state, control, **kw):
        TOKENS[0] = 0
        emit(self.path, "train_begin", step=state.global_step, batch=state.train_batch_size or
             args.per_device_train_batch_size, accum=args.gradient_accumulation_steps)

    def on_step_begin(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kw):
        cuda = torch.cuda.is_available()
        emit(self.path, "step", step=state.global_step, tokens=TOKENS[0], nonfinite=NONFINITE[0],
             peak=torch.cuda.max_memory_allocated() if cuda else None, kept=len(KEPT))
        TOKENS[0] = NONFINITE[0] = 0

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            emit(self.path, "loss", step=state.global_step, loss=logs["loss"])


def build_trainer(args, model, tokenizer):
    from datasets import load_dataset

    data = load_dataset("json", data_files=args.dataset, split="train")
    callbacks = [Recorder(args.events)]
    if args.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        cls = type("BenchSFTTrainer", (Counting, SFTTrainer), {})
        config = SFTConfig(max_length=args.max_seq_length, dataset_text_field="text", **training_kwargs(args))
        return cls(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks)
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    def tokenize(row):
        return tokenizer(row["text"] + tokenizer.eos_token, truncation=True, max_length=args.max_seq_length)

    data = data.map(tokenize, remove_columns=["text"])
    cls = type("BenchTrainer", (Counting, Trainer), {})
    return cls(model=model, args=TrainingArguments(**training_kwargs(args)), train_dataset=data,
               data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=callbacks)


def weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.vram_limit:
        from oomguard.guard import apply_vram_limit
        from oomguard.protocol import parse_size

        apply_vram_limit(parse_size(args.vram_limit), run_dir=None)  # before the model loads
    emit(args.events, "start", argv=sys.argv[1:], leak=args.leak)
    model, tokenizer = load_model(args)
    trainer = build_trainer(args, model, tokenizer)
    fp32_adapter(trainer.model)
    try:
        trainer.train()
    except Exception as exc:
        emit(args.events, "end", ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
             step=trainer.state.global_step)
        raise
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    finite = weights_finite(trainer.model)
    emit(args.events, "end", ok=True, step=trainer.state.global_step, batch=trainer.state.train_batch_size,
         weights_finite=finite, last_loss=losses[-1] if losses else None,
         loss_finite=bool(losses) and all(math.isfinite(x) for x in losses[-2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
