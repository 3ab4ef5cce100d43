"""Issue 5: sample-exact resume for a wrapped, unchanged ``trl sft`` command under ``oomguard run``.

One uninterrupted run, and one with a ``cuda_oom`` injected in step 4 whose policy halves the
per-device batch and doubles accumulation (effective batch 4 kept; ``policies/wrap.yaml``). Attempt 2
resumes from the checkpoint the child saved on the way down (the ledger keeps the newest attempt's
record for a step trained twice), and every step must have consumed the same rows, in the same order,
as the uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _wrap_run import BIN, oomguard_run

from oomguard.guard.resume.ledger import ledger_file, read_ledger, samples_seen

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
POLICY = HERE / "policies" / "wrap.yaml"  # cuda_oom: batch 4 -> 2, accumulation 1 -> 2
STEPS = 5


def trl_sft(run_dir: Path, out: Path, model_dir: Path, data_dir: Path, inject: str | None = None) -> dict:
    """``oomguard run [--inject …] -- trl sft …`` to success; returns run.json."""
    # the shuffled sampler (seed 42) makes the order non-trivial; the resume must reproduce it
    oomguard_run(run_dir, POLICY, str(BIN / "trl"), "sft", "--model_name_or_path", str(model_dir),
                 "--dataset_name", str(data_dir), "--use_peft", "--lora_r", "8", "--lora_alpha", "16",
                 "--output_dir", str(out), "--max_steps", str(STEPS), "--save_steps", "2",
                 "--per_device_train_batch_size", "4", "--max_length", "64", "--use_cpu", "--report_to", "none",
                 "--logging_steps", "1", "--dataloader_num_workers", "0", inject=inject)
    return json.loads((run_dir / "run.json").read_text())


def test_trl_sft_resumes_on_the_exact_next_sample_after_a_batch_rung(tmp_path, model_dir, data_dir):
    trl_sft(tmp_path / "straight-run", tmp_path / "straight", model_dir, data_dir)
    run = trl_sft(tmp_path / "run", tmp_path / "out", model_dir, data_dir, "cuda_oom@step=4")

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
