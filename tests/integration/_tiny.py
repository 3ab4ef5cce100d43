"""A tiny guarded training run on CPU, used by the guard's integration tests as a real child.

Usage: python tests/integration/_tiny.py OUTPUT_DIR --max-steps N --save-steps S [--eval]
The OOMGUARD_* environment decides what the guard does. Trainable parameters are dumped to
``OUTPUT_DIR/params-<global_step>.pt`` after every step and ``params-exit.pt`` on the way out.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from oomguard.guard import GuardEnv, apply_allocator_defaults, guard_callbacks, guarded_train

VOCAB = 128


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def tiny_rows(n: int = 64, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(1, VOCAB) for _ in range(rng.randint(4, 24))]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def dump_params(model: torch.nn.Module, path: str) -> None:
    torch.save({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, path)


class ParamDump(TrainerCallback):
    def __init__(self, out: str):
        self.out = out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        dump_params(model, os.path.join(self.out, f"params-{state.global_step}.pt"))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--eval", action="store_true")
    a = p.parse_args(argv)
    apply_allocator_defaults()
    env = GuardEnv.from_env()
    model = tiny_model()
    args = TrainingArguments(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=a.save_steps, logging_steps=1, learning_rate=1e-2,
        report_to=[], use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
        eval_strategy="steps" if a.eval else "no", eval_steps=2 if a.eval else None, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tiny_rows(), eval_dataset=tiny_rows(8, 1),
                      data_collator=collate, callbacks=[ParamDump(a.output_dir), *guard_callbacks(env)])
    try:
        guarded_train(trainer, env=env)
    finally:
        dump_params(trainer.model, os.path.join(a.output_dir, "params-exit.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
