"""A user's plain TRL script with packing, unaware of oomguard: SFTTrainer(packing=True) + LoraConfig.

Usage: python _wrap_packed_script.py MODEL_DIR DATASET_JSONL OUTPUT_DIR
Its max_length (128) is in the code, not on the command line: under oomguard a length rung reaches it
in-process, through the bootstrap. ``build`` is imported by the test to map packed rows to examples.
"""

import sys

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

MAX_LENGTH = 128


def load(data: str):
    return load_dataset("json", data_files=data, split="train")


def build(model_dir: str, data: str, output_dir: str, max_length: int = MAX_LENGTH) -> SFTTrainer:
    config = SFTConfig(output_dir=output_dir, max_length=max_length, packing=True, per_device_train_batch_size=2,
                       gradient_accumulation_steps=1, num_train_epochs=1, save_steps=100, logging_steps=1,
                       learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none", seed=0,
                       dataloader_num_workers=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    return SFTTrainer(model=model_dir, args=config, train_dataset=load(data), peft_config=lora)


def main(model_dir: str, data: str, output_dir: str) -> None:
    trainer = build(model_dir, data, output_dir)
    trainer.train()
    trainer.save_model(output_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
