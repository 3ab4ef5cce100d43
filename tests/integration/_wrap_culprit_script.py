"""A user's plain ``transformers.Trainer`` script with dynamic padding and one batch of long rows (issue 19's
culprit batch): rows 12-15 hold 12 tokens, every other row 6. Sequential order, batch 4, accumulation 2, so
the long rows are micro-batch 2 of optimizer step 2. Tiny random Llama; CPU.

Usage: python _wrap_culprit_script.py OUTPUT_DIR [MAX_STEPS]
"""

import random
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

VOCAB = 128
LONG = range(12, 16)


def rows(n: int = 48) -> list[dict]:
    rng = random.Random(0)
    return [{"input_ids": (ids := [rng.randrange(1, VOCAB) for _ in range(12 if i in LONG else 6)]),
             "labels": list(ids)} for i in range(n)]


def collate(batch: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main(output_dir: str, max_steps: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, save_steps=2, logging_steps=1, learning_rate=1e-3,
                             use_cpu=True, report_to="none", seed=0, dataloader_num_workers=0,
                             remove_unused_columns=False, train_sampling_strategy="sequential")
    Trainer(model=model, args=args, train_dataset=rows(), data_collator=collate).train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
