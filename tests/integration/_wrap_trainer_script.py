"""A user's plain ``transformers.Trainer`` script, unaware of oomguard, with its own
``auto_find_batch_size=True``. Tiny random Llama, random token rows; CPU.

Usage: python _wrap_trainer_script.py OUTPUT_DIR [MAX_STEPS]
"""

import random
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

VOCAB = 128


def rows(n: int = 64) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, VOCAB) for _ in range(16)]
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return out


def main(output_dir: str, max_steps: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, auto_find_batch_size=True, save_steps=2,
                             logging_steps=1, learning_rate=1e-3, use_cpu=True, report_to="none", seed=0,
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=rows()).train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4)
