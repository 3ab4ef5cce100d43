"""An ordered learning_rate is in force after a resume (trust rule: a change is reported as made only
when the child shows it).

HF Trainer restores ``scheduler.pt`` (``base_lrs``, ``_last_lr``) and ``optimizer.pt`` (``lr``,
``initial_lr``) over the new ``args.learning_rate``: without the guard's RecipeCallback the logged LR
after the rollback stays at the old value. Real tiny CPU trainings in subprocesses, the child's own
``trainer_state.json`` as the witness.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _env import user_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import argparse, random, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from oomguard.guard import GuardEnv, guard_callbacks, guarded_train

    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--schedule", default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--resume", default=None)
    a = p.parse_args()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        ids = [rng.randrange(1, 64) for _ in range(8)]
        rows.append({"input_ids": ids, "labels": list(ids)})

    def collate(batch):
        ids = torch.tensor([r["input_ids"] for r in batch])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    args = TrainingArguments(output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=2,
                             learning_rate=a.lr, lr_scheduler_type=a.schedule, warmup_steps=a.warmup_steps,
                             save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0, save_only_model=False)
    env = GuardEnv.from_env()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                      callbacks=guard_callbacks(env))
    guarded_train(trainer, env=env, resume_from_checkpoint=a.resume)
''')


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("child") / "child.py"
    path.write_text(CHILD)
    return path


def _run(child: Path, out: Path, *, lr: float, max_steps: int, schedule: str = "constant", warmup: int = 0,
         resume: Path | None = None, run_dir: Path | None = None, knobs: dict | None = None) -> list[dict]:
    env = user_env()
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": ""})
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        env.update({"OOMGUARD_RUN_DIR": str(run_dir), "OOMGUARD_ATTEMPT": "2",
                    "OOMGUARD_KNOBS": json.dumps(knobs or {}), "OOMGUARD_RESUME_FROM": str(resume or "")})
    cmd = [sys.executable, str(child), str(out), "--lr", repr(lr), "--schedule", schedule,
           "--warmup-steps", str(warmup), "--max-steps", str(max_steps)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    last = out / f"checkpoint-{max_steps}" / "trainer_state.json"
    history = json.loads(last.read_text())["log_history"]
    return [h for h in history if "learning_rate" in h]


def _lrs(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["learning_rate"] for h in history}


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def _in_force(run_dir: Path) -> dict:
    observed = [e for e in _events(run_dir) if e["event"] == "recipe_observed" and e.get("stage") == "in_force"]
    assert len(observed) == 1, observed
    return observed[0]


def test_constant_lr_order_is_in_force_after_resume(child, tmp_path):
    first = _lrs(_run(child, tmp_path / "run1", lr=1e-3, max_steps=4))
    assert set(first.values()) == {1e-3}
    ckpt = tmp_path / "run1" / "checkpoint-2"

    # the bug (and proof that this test can fail): args at 5e-4, no order -> HF's restored 1e-3 wins
    control_dir = tmp_path / "control-run"
    control = _lrs(_run(child, tmp_path / "control", lr=5e-4, max_steps=6, resume=ckpt, run_dir=control_dir))
    assert sorted(control) == [1, 2, 3, 4, 5, 6]
    assert {s: v for s, v in control.items() if s > 2} == {3: 1e-3, 4: 1e-3, 5: 1e-3, 6: 1e-3}
    observed = _in_force(control_dir)  # ... and the observation says so (the supervisor reports not applied)
    assert observed["knobs"]["learning_rate"] == 1e-3
    assert not [e for e in _events(control_dir) if e["event"] == "lr_override"]

    # the order (args also at 5e-4, as the bootstrap sets them): in force from the first step after the resume
    run_dir = tmp_path / "oomguard-run"
    resumed = _lrs(_run(child, tmp_path / "run2", lr=5e-4, max_steps=6, resume=ckpt, run_dir=run_dir,
                        knobs={"learning_rate": 0.0005}))
    assert {s: v for s, v in resumed.items() if s <= 2} == {1: 1e-3, 2: 1e-3}  # history before the rollback
    assert {s: v for s, v in resumed.items() if s > 2} == {3: 5e-4, 4: 5e-4, 5: 5e-4, 6: 5e-4}
    observed = _in_force(run_dir)
    assert observed["attempt"] == 2 and observed["rank"] == 0
    assert observed["knobs"]["learning_rate"] == 0.0005 and observed["fields"]["learning_rate"] == "optimizer"
    assert observed["current_lr"] == 0.0005
    assert observed["knobs"]["per_device_train_batch_size"] == 2
    assert observed["fields"]["per_device_train_batch_size"] == "dataloader"
    assert observed["effective_batch"] == 2 and observed["lr_scheduler_type"] == "constant"
    assert observed["trainer"] == "Trainer" and observed["output_dir"] == str((tmp_path / "run2").resolve())
    override = [e for e in _events(run_dir) if e["event"] == "lr_override"]
    assert len(override) == 1 and override[0]["before"] == 1e-3 and override[0]["after"] == 5e-4


def test_linear_warmup_schedule_keeps_its_shape(child, tmp_path):
    first = _lrs(_run(child, tmp_path / "run1", lr=1e-3, max_steps=6, schedule="linear", warmup=3))
    assert len(set(first.values())) > 2  # a real warmup + decay shape
    run_dir = tmp_path / "oomguard-run"
    resumed = _lrs(_run(child, tmp_path / "run2", lr=5e-4, max_steps=6, schedule="linear", warmup=3,
                        resume=tmp_path / "run1" / "checkpoint-2", run_dir=run_dir, knobs={"learning_rate": 0.0005}))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(first[step] * 0.5, rel=1e-9, abs=1e-15), (step, first, resumed)
    assert _in_force(run_dir)["knobs"]["learning_rate"] == 0.0005
