"""yamltrain: a small axolotl-like YAML-config training CLI, unaware of oomguard.

The test installs it as a console script (this file behind a ``#!<python>`` shebang, named
``yamltrain``, in a bin dir on PATH) and runs ``yamltrain config.yaml``. Every setting lives in
the YAML under yamltrain's own key names::

    base_model: /path/to/model
    datasets: [{path: /path/to/train.jsonl}]
    output_dir: out
    micro_batch_size: 4
    gradient_accumulation_steps: 1
    sequence_len: 64
    lora_r: 8
    lora_alpha: 16
    learning_rate: 1.0e-3
    max_steps: 4
    save_steps: 2
"""

import sys

import yaml
from datasets import concatenate_datasets, load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: yamltrain CONFIG.yaml", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        cfg = yaml.safe_load(f)
    set_seed(int(cfg.get("seed", 42)))  # before the model: LoRA's init is random
    tokenizer = AutoTokenizer.from_pretrained(cfg["base_model"])

    def encode(row):
        text = row["text"] if row.get("text") else tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return tokenizer(text, truncation=True, max_length=int(cfg.get("sequence_len", 512)))

    parts = [load_dataset("json", data_files=d["path"], split="train") for d in cfg["datasets"]]
    data = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    data = data.map(encode, remove_columns=data.column_names)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg["base_model"]),
                           LoraConfig(r=int(cfg.get("lora_r", 8)), lora_alpha=cfg.get("lora_alpha", 16),
                                      target_modules=cfg.get("lora_target_modules", ["q_proj", "v_proj"]),
                                      lora_dropout=float(cfg.get("lora_dropout", 0.0)), task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=cfg["output_dir"], per_device_train_batch_size=int(cfg["micro_batch_size"]),
                             gradient_accumulation_steps=int(cfg.get("gradient_accumulation_steps", 1)),
                             learning_rate=float(cfg["learning_rate"]), max_steps=int(cfg["max_steps"]),
                             save_steps=int(cfg.get("save_steps", 2)), logging_steps=int(cfg.get("logging_steps", 1)),
                             use_cpu=True, report_to="none", dataloader_num_workers=0, seed=int(cfg.get("seed", 42)))
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(cfg["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
