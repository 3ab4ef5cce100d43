"""Issue 5: sample-exact resume for a wrapped, unchanged ``trl sft`` command under ``oomguard run``.

One uninterrupted run, and one with a ``cuda_oom`` injected in step 3 whose policy halves the per-device
batch and doubles accumulation (effective batch 4 kept). Attempt 2 resumes from the checkpoint the child
saved (the ledger keeps the newest attempt's record for a step trained twice), and every step must have
consumed the same rows, in the same order, as the uninterrupted run.

The two runs are test_wrap_matrix.py's trl_flags style (``trl sft --model_name_or_path .. --dataset_name ..
--use_peft --lora_r 8 --lora_alpha 16 --per_device_train_batch_size 4 --max_length 64 --max_steps 4
--save_steps 2 ...``): its run without a fault (policies/matrix.yaml) and its run through the injected OOM
(policies/matrix_oom.yaml: two rungs no child has are passed over, then halve_batch), made once per test
session and shared (tests/integration/_shared.py); here they are read through oomguard's sample ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_wrap_matrix import MAX_STEPS, shared_oom, shared_wrapped

from oomguard.guard.resume.ledger import ledger_file, read_ledger, samples_seen

pytestmark = pytest.mark.slow
STEPS = MAX_STEPS  # 4


def test_trl_sft_resumes_on_the_exact_next_sample_after_a_batch_rung(tmp_path_factory):
    _, straight_run = shared_wrapped(tmp_path_factory, "trl_flags")
    _, run_dir = shared_oom(tmp_path_factory, "trl_flags")
    run = json.loads((run_dir / "run.json").read_text())

    first, second = run["attempts"]
    assert first["failure"]["kind"] == "cuda_oom" and first["failure"]["step"] == 2
    assert second["failure"] is None
    assert (second["knobs"]["per_device_train_batch_size"], second["knobs"]["gradient_accumulation_steps"]) == (2, 2)

    want = read_ledger(ledger_file(straight_run))
    got = read_ledger(ledger_file(run_dir))
    assert [e.step for e in want] == [e.step for e in got] == list(range(1, STEPS + 1))
    assert all(len(e.samples) == 4 for e in want + got)
    resumed_at = int(Path(second["resumed_from"]).name.split("-")[-1])  # checkpoint-2 or an emergency save
    assert [e.attempt for e in got] == [1] * resumed_at + [2] * (STEPS - resumed_at)
    # step by step, the same rows in the same order: none twice, none skipped
    assert [e.samples for e in got] == [e.samples for e in want]
    assert samples_seen(got) == samples_seen(want) and max(samples_seen(got).values()) == 1
    rows = [i for e in want for i in e.samples]
    assert rows != sorted(rows)  # HF's shuffled order (seed 42), so the check is not trivially met by 0, 1, 2 …
