"""A user's plain ``transformers.Trainer`` script for the multi-node tests: tiny random Llama, 64 random
token rows, batch 4, accumulation 1, a checkpoint every NODE_SAVE_STEPS (2) steps, and NODE_STEP_S seconds
of sleep after each optimizer step (so a test can act mid-run; none in a requeued SLURM job,
SLURM_RESTART_COUNT ≥ 1, so that it finishes within its time limit). Unaware of oomguard.

Its own record of what each rank trained (the test's evidence, independent of oomguard): its Trainer
notes the rows of every micro-batch it trains, and each optimizer step appends ``{"step", "rows", "pid"}`` to
``OUTPUT_DIR/rows.rank<RANK>.jsonl``.

Usage: python _node_trainer_script.py OUTPUT_DIR MAX_STEPS
"""

import json
import os
import sys
import time

import torch
from _wrap_trainer_script import VOCAB, rows  # the same 64 rows of 16 tokens (this dir is on sys.path)
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments


class RecordingTrainer(Trainer):
    """Notes the rows of every micro-batch it trains (by their tokens); each optimizer step's go to the file."""

    def __init__(self, *args, data: list[dict], **kwargs):
        super().__init__(*args, **kwargs)
        self.index = {tuple(r["input_ids"].tolist()): i for i, r in enumerate(data)}
        self.pending: list[int] = []

    def training_step(self, model, inputs, *args, **kwargs):
        self.pending += [self.index[tuple(ids.tolist())] for ids in inputs["input_ids"].cpu()]
        return super().training_step(model, inputs, *args, **kwargs)


class Record(TrainerCallback):
    def __init__(self, output_dir: str):
        self.trainer: RecordingTrainer | None = None
        self.path = os.path.join(output_dir, f"rows.rank{os.environ.get('RANK', '0')}.jsonl")

    def on_step_end(self, args, state, control, **kwargs):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, "rows": self.trainer.pending, "pid": os.getpid()}) + "\n")
        self.trainer.pending = []
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
            time.sleep(float(os.environ.get("NODE_STEP_S", "0")))


def main(output_dir: str, max_steps: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=1, save_steps=int(os.environ.get("NODE_SAVE_STEPS", "2")), logging_steps=1, learning_rate=1e-3,
                             use_cpu=True, report_to="none", seed=0, dataloader_num_workers=0)
    data, record = rows(), Record(output_dir)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=data, callbacks=[record], data=data)
    record.trainer = trainer
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
