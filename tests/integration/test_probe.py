"""``oomguard plan`` on an unchanged HF Trainer script (issue 18): the real probe on CPU, one child through the
supervisor, probe.json's configurations at the worst batch, nothing trained, nothing saved.

One run (module fixture, ~15 s) serves every assertion. The script's rows are short but for one long row, so
the probe must find that row; ``--inject cuda_oom@tokens=100`` makes micro-batches over 100 tokens run out of
memory (a real ``torch.OutOfMemoryError`` raised in the forward), so "did not fit" and the configurations it
implies are exercised on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _env import user_env

from oomguard.tune.record import read_probe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
LONG = 48  # the one long row; the others have 4-19 tokens

SCRIPT = '''
import random, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

def rows(n=40):
    rng = random.Random(0)
    out = []
    for i in range(n):
        ids = [rng.randrange(1, 128) for _ in range(%(long)d if i == 17 else rng.randrange(4, 20))]
        out.append({"input_ids": ids, "labels": ids})
    return out

def collate(batch):
    n = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), n, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4))
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
args = TrainingArguments(output_dir=sys.argv[1], max_steps=4, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, save_steps=1, logging_steps=1, learning_rate=1e-3,
                         use_cpu=True, report_to="none", seed=0, dataloader_num_workers=0,
                         remove_unused_columns=False)
trainer = Trainer(model=model, args=args, train_dataset=rows(), data_collator=collate)
trainer.train()
trainer.save_model(sys.argv[1])
''' % {"long": LONG}


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    base = tmp_path_factory.mktemp("probe")
    script, out, run_dir = base / "train.py", base / "out", base / "run"
    script.write_text(SCRIPT)
    env = user_env()
    env.update({"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "oomguard", "plan", "--json", "--run-dir", str(run_dir),
                           "--inject", "cuda_oom@tokens=100", "--", sys.executable, str(script), str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(
        p.read_text()[-3000:] for p in run_dir.glob("attempts/*/stderr.log"))
    return json.loads(proc.stdout), run_dir, out


def test_probe_measures_the_worst_batch_at_every_configuration(planned):
    _, run_dir, _ = planned
    record = read_probe(run_dir)
    assert record.worst_row == LONG and record.rows == 40 and not record.cuda
    assert record.requested["per_device_train_batch_size"] == 2
    assert record.requested["gradient_accumulation_steps"] == 2
    grid = {(p.batch, p.length): p for p in record.points}
    assert set(grid) == {(b, n) for b in (1, 2, 4) for n in (LONG, LONG // 2, LONG // 4)}  # batches dividing 4
    for (b, n), p in grid.items():
        if b * n <= 100:  # copies of the longest row cut to n: the micro-batch the model saw
            assert p.fits and p.tokens == b * n and p.tokens_per_s > 0 and p.step_s > 0
            assert p.peak_allocated is None  # no CUDA: memory unknown, not zero
    oom = grid[(4, LONG)]
    assert not oom.fits and not oom.implied and "out of memory" in oom.error


def test_plan_answers_from_the_probe(planned):
    doc, run_dir, _ = planned
    plan = doc["plan"]
    assert plan["verdict"] == "unknown" and plan["capacity"] is None  # CPU: no memory measured
    assert plan["command"]["batch"] == 2 and plan["command"]["length"] == LONG
    assert plan["best"]["batch"] in (1, 2) and plan["best"]["batch"] * plan["best"]["accumulation"] == 4
    assert "per_device_train_batch_size 2 → 1" in plan["ladder_first"]["reason"]
    assert doc["probe"] == str(run_dir / "probe.json")


def test_the_probe_trained_nothing_and_saved_nothing(planned):
    _, run_dir, out = planned
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "succeeded" and len(run["attempts"]) == 1
    assert not out.exists() or not any(out.iterdir())  # no checkpoint-N, no adapter_model.*
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "probe_written" for e in events)
    assert not any(e["event"] == "checkpoint_saved" for e in events)
