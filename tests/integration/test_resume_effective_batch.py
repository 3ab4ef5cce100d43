"""Issue 5 case (c): a forced effective-batch change (per-device batch already 1, accumulation 4 → 2).

HF alone would skip ``global_step × 2`` batches of one sample on resume (6 of the 12 samples seen) and
re-train 6 of them. With the ledger the sampler yields exactly the unseen samples in the original order,
and the sample budget of ``max_steps`` is kept (3 steps of 4 left = 6 steps of 2).
"""

import pytest
from _recipe_run import events, recipe

from oomguard.guard.resume.ledger import ledger_file, read_ledger, samples_seen

pytestmark = pytest.mark.slow
TRAIN = ["--max_seq_length", "64", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
         "--precision", "fp32", "--lora_dropout", "0", "--max_steps", "6", "--save_steps", "100"]
BEFORE = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}
AFTER = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The uninterrupted run (effective batch 4, 6 steps; checkpoint-3 kept for the HF-alone probe)."""
    base = tmp_path_factory.mktemp("straight")
    recipe(cache, "--output_dir", str(base / "out"), *TRAIN, "--save_steps", "3", run_dir=base / "run", knobs=BEFORE)
    return read_ledger(ledger_file(base / "run")), base / "out" / "checkpoint-3"


@pytest.fixture
def straight(reference):
    return reference[0]


def test_effective_batch_change_consumes_exactly_the_unseen_samples(cache, straight, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    first = recipe(cache, "--output_dir", str(out), *TRAIN, run_dir=run_dir, inject="cuda_oom@step=4", check=False,
                   knobs=BEFORE)
    assert first.returncode == 1, first.stderr[-3000:]
    recipe(cache, "--output_dir", str(out), *TRAIN, run_dir=run_dir, attempt=2, inject="cuda_oom@step=4",
           resume=out / "checkpoint-3", knobs=AFTER)

    got = read_ledger(ledger_file(run_dir))
    assert [e.step for e in straight] == [1, 2, 3, 4, 5, 6] and all(len(e.samples) == 4 for e in straight)
    assert [e.step for e in got] == list(range(1, 10))  # 3 steps of 4, then 6 of 2
    assert [len(e.samples) for e in got] == [4, 4, 4] + [2] * 6
    # none twice, none skipped: the same multiset as the uninterrupted run, and even in the same order
    assert samples_seen(got) == samples_seen(straight) and max(samples_seen(got).values()) == 1
    assert [i for e in got for i in e.samples] == [i for e in straight for i in e.samples]
    [change] = events(run_dir, "effective_batch_changed")
    assert change["effective_batch"] == [4, 2] and change["samples_seen"] == 12
    assert change["max_steps"] == [6, 9] and change["warnings"] == []


def test_hf_alone_would_re_train_seen_samples(cache, reference, tmp_path):
    """The installed transformers' own resume after the same change is not exact (DESIGN §7): without a
    ledger on file oomguard says so and leaves HF's skip. If this fails, HF learned to resume exactly."""
    straight, checkpoint = reference
    probe = tmp_path / "probe"  # a fresh run dir: no ledger for steps 1-3, so no plan
    probe.mkdir()  # the supervisor makes it; the child writes no events into a missing run dir
    recipe(cache, "--output_dir", str(tmp_path / "out"), *TRAIN, run_dir=probe, attempt=2, resume=checkpoint,
           knobs=AFTER)
    [unknown] = events(probe, "resume_position_unknown")
    assert unknown["effective_batch"] == [4, 2] and not events(probe, "effective_batch_changed")
    resumed = [i for e in read_ledger(ledger_file(probe)) for i in e.samples]
    seen_before = {i for e in straight[:3] for i in e.samples}
    assert len(resumed) == 6  # HF keeps max_steps 6: 3 steps of 2
    assert seen_before & set(resumed), f"HF resumed without re-training seen samples: {resumed}"
