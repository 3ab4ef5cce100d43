"""A user's plain argparse training script, unaware of oomguard, with flag names of its own
(``--block_size``, ``--micro_batch_size``, ``--grad_accum``, ``--lora_rank``, ``--lr``, ``--out``).
It builds ``TrainingArguments`` and a ``transformers.Trainer`` itself; ``--block_size`` is used
only by its own tokenization (truncation), never seen by any HF argument class.

Usage: python argparse_script.py --model M --data D.jsonl --out O [--block_size 64 --micro_batch_size 4
       --grad_accum 1 --lora_rank 8 --lr 1e-3 --max_steps 4 --save_every 2 --seed 0]
"""

import argparse

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_steps", type=int, default=4)
    p.add_argument("--save_every", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    a = parse()
    set_seed(a.seed)  # before the model: LoRA's init is random
    tokenizer = AutoTokenizer.from_pretrained(a.model)

    def encode(row):
        text = row["text"] if row.get("text") else tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return tokenizer(text, truncation=True, max_length=a.block_size)

    data = load_dataset("json", data_files=a.data, split="train")
    data = data.map(encode, remove_columns=data.column_names)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(a.model),
                           LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, target_modules=["q_proj", "v_proj"],
                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=a.out, per_device_train_batch_size=a.micro_batch_size,
                             gradient_accumulation_steps=a.grad_accum, learning_rate=a.lr, max_steps=a.max_steps,
                             save_steps=a.save_every, logging_steps=1, use_cpu=True, report_to="none",
                             dataloader_num_workers=0, seed=a.seed)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(a.out)


if __name__ == "__main__":
    main()
