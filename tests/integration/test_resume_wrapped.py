"""Issue 5: sample-exact resume for a wrapped, unchanged ``trl sft`` command under ``oomguard run``.

One uninterrupted run, and one with a ``cuda_oom`` injected in step 4 whose policy halves the
per-device batch and doubles accumulation (effective batch 4 kept; ``policies/wrap.yaml``). The child
dies after checkpoint-2, so attempt 2 trains step 3 again: the ledger keeps the newest attempt's record
per step, and every step must have consumed the same rows, in the same order, as the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oomguard.guard.ledger import ledger_file, read_ledger, samples_seen
from oomguard.recipes import default

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
POLICY = HERE / "policies" / "wrap.yaml"  # cuda_oom: batch 4 -> 2, accumulation 1 -> 2
STEPS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return default.ensure_default_model(tmp_path_factory.mktemp("oomguard-cache"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    shutil.copyfile(default.default_dataset_path(), path / "train.jsonl")
    return path


def trl_sft(run_dir: Path, out: Path, model_dir: Path, data_dir: Path, *inject: str) -> dict:
    """``oomguard run [--inject …] -- trl sft …`` to success; returns run.json."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOMGUARD_")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
                "TOKENIZERS_PARALLELISM": "false"})
    # the shuffled sampler (seed 42) makes the order non-trivial; the resume must reproduce it
    command = [str(BIN / "trl"), "sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data_dir),
               "--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--output_dir", str(out),
               "--max_steps", str(STEPS), "--save_steps", "2", "--per_device_train_batch_size", "4",
               "--max_length", "64", "--use_cpu", "--report_to", "none", "--logging_steps", "1",
               "--dataloader_num_workers", "0"]
    cmd = [sys.executable, "-m", "oomguard", "run", "--policy", str(POLICY), "--run-dir", str(run_dir), "--quiet",
           *inject, "--", *command]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"oomguard run failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n" + \
        "".join(p.read_text()[-3000:] for p in sorted(run_dir.glob("attempts/*/stderr.log")))
    return json.loads((run_dir / "run.json").read_text())


def test_trl_sft_resumes_on_the_exact_next_sample_after_a_batch_rung(tmp_path, model_dir, data_dir):
    trl_sft(tmp_path / "straight-run", tmp_path / "straight", model_dir, data_dir)
    run = trl_sft(tmp_path / "run", tmp_path / "out", model_dir, data_dir, "--inject", "cuda_oom@step=4")

    first, second = run["attempts"]
    assert first["failure"]["kind"] == "cuda_oom" and first["failure"]["step"] == 3
    assert second["failure"] is None
    assert (second["knobs"]["per_device_train_batch_size"], second["knobs"]["gradient_accumulation_steps"]) == (2, 2)

    want = read_ledger(ledger_file(tmp_path / "straight-run"))
    got = read_ledger(ledger_file(tmp_path / "run"))
    assert [e.step for e in want] == [e.step for e in got] == list(range(1, STEPS + 1))
    assert all(len(e.samples) == 4 for e in want + got)
    resumed_at = int(Path(second["resumed_from"]).name.split("-")[-1])  # checkpoint-2 or an emergency save
    assert [e.attempt for e in got] == [1] * resumed_at + [2] * (STEPS - resumed_at)
    # step by step, the same rows in the same order: none twice, none skipped
    assert [e.samples for e in got] == [e.samples for e in want]
    assert samples_seen(got) == samples_seen(want) and max(samples_seen(got).values()) == 1
    rows = [i for e in want for i in e.samples]
    assert rows != sorted(rows)  # HF's shuffled order (seed 42), so the check is not trivially met by 0, 1, 2 …
