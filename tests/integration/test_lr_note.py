"""The requested learning rate against its recipe class, said once at the start (issue 19, item 3).

A wrapped ``trl sft --use_peft`` asked for a learning rate 200x above the usual LoRA/QLoRA range: the
supervisor says so on its console and in the journal when the child reports its recipe, trains it as
written (the child's own ``training_args.bin`` holds the rate asked for), and the report carries the note.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from _wrap_run import BIN, ROOT, oomguard_run

HERE = ROOT / "tests" / "integration"


def test_a_typo_sized_lora_learning_rate_is_said_and_trained_as_written(tmp_path, model_dir, data_dir):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    proc = oomguard_run(run_dir, HERE / "policies" / "wrap.yaml", str(BIN / "trl"), "sft",
                        "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir), "--use_peft",
                        "--lora_r", "8", "--lora_alpha", "16", "--output_dir", str(out), "--max_steps", "2",
                        "--save_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "64",
                        "--use_cpu", "--report_to", "none", "--learning_rate", "0.1",
                        "--dataloader_num_workers", "0", inject=None)
    assert proc.stderr.count("[oomguard] note: learning_rate 0.1 is 200x above the usual LoRA/QLoRA range") == 1
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    [note] = [e for e in events if e["event"] == "lr_note"]
    assert (note["learning_rate"], note["lora"], note["attempt"]) == (0.1, True, 1)
    args = torch.load(out / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.learning_rate == 0.1  # attempt 1 trains what the command asks
    report = subprocess.run([sys.executable, "-m", "oomguard", "report", str(run_dir)], capture_output=True,
                            text=True, cwd=ROOT)
    assert "note: learning_rate 0.1 is 200x above" in report.stdout
