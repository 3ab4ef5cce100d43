"""A user's plain TRL script, unaware of oomguard: SFTTrainer + LoraConfig on a local model.

Usage: python _wrap_sft_script.py MODEL_DIR DATASET_JSONL OUTPUT_DIR [MAX_STEPS]
"""

import sys

from datasets import load_dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer


def main(model_dir: str, data: str, output_dir: str, max_steps: int) -> None:
    dataset = load_dataset("json", data_files=data, split="train")
    config = SFTConfig(output_dir=output_dir, max_length=64, per_device_train_batch_size=4,
                       gradient_accumulation_steps=1, max_steps=max_steps, save_steps=2, logging_steps=1,
                       learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none", seed=0,
                       dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model_dir, args=config, train_dataset=dataset, peft_config=lora)
    trainer.train()
    trainer.save_model(output_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 4)
