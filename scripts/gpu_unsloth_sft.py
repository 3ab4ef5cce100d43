"""A user's Unsloth QLoRA SFT script, unaware of oomguard: FastLanguageModel + TRL's SFTTrainer on a local model.

Usage: python gpu_unsloth_sft.py MODEL_DIR DATASET_JSONL OUTPUT_DIR [BATCH] [MAX_STEPS] [MAX_SEQ_LENGTH] [GC]

GC is ``use_gradient_checkpointing``: ``unsloth`` (default; Unsloth's offloaded checkpointing) or ``true``.

Written the way Unsloth's notebooks write it (``import unsloth`` first, ``load_in_4bit``, ``get_peft_model``
with Unsloth's gradient checkpointing, the knobs hard-coded in ``SFTConfig``), plus the resume idiom of a
script that may be started again. Under ``oomguard run`` its batch is not a flag of the command, so a batch
rung reaches it in-process (the bootstrap edits the ``SFTConfig`` object). ``scripts/gpu_unsloth.py`` runs it.
On a machine without CUDA (a CPU smoke test only) it loads the model unquantized: bitsandbytes' 4-bit needs a GPU.
"""

from unsloth import FastLanguageModel  # noqa: I001  Unsloth asks to be imported before transformers/trl/peft

import sys
from pathlib import Path

import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer


def main(model_dir: str, data: str, output_dir: str, batch: int, max_steps: int, max_seq_length: int,
         gradient_checkpointing: str = "unsloth") -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir, max_seq_length=max_seq_length, dtype=None,
        load_in_4bit=torch.cuda.is_available(), local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing=True if gradient_checkpointing == "true" else "unsloth", random_state=3407)
    dataset = load_dataset("json", data_files=data, split="train")
    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=dataset,
        args=SFTConfig(
            dataset_text_field="text", max_length=max_seq_length, packing=False,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            max_steps=max_steps, save_steps=2, logging_steps=1, warmup_steps=1,
            learning_rate=2e-4, optim="adamw_8bit" if torch.cuda.is_available() else "adamw_torch",
            weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
            output_dir=output_dir, report_to="none", dataloader_num_workers=0, dataset_num_proc=1))
    # pick up where an interrupted run stopped (oomguard's bootstrap chooses the checkpoint itself)
    resume = any(Path(output_dir).glob("checkpoint-*"))
    stats = trainer.train(resume_from_checkpoint=True if resume else None)
    print(f"train_runtime={stats.metrics.get('train_runtime')} global_step={trainer.state.global_step} "
          f"train_batch_size={trainer._train_batch_size}", flush=True)
    model.save_pretrained(str(Path(output_dir) / "adapter"))


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]) if len(a) > 3 else 16, int(a[4]) if len(a) > 4 else 6,
         int(a[5]) if len(a) > 5 else 2048, a[6] if len(a) > 6 else "unsloth")
