"""Issue 5 case (b): an OOM forces the ``max_seq_length`` rung (128 → 64 tokens) with packing on.

At 64 tokens TRL re-packs the dataset into other rows, so HF's skip of ``global_step`` batches would
land on other examples. With the ledger the examples seen (the rows consumed at 128, mapped to their
example ids) are known; the epoch's unseen examples are packed at 64 and trained first, once.
Checked: over one epoch the multiset of example ids consumed equals the uninterrupted run's (every
example exactly once), the example ids being read from the ledger's rows through TRL's own packing.
"""

import json

import pytest
from _recipe_run import events, recipe

from oomguard.guard.resume.ledger import ledger_file, read_ledger
from oomguard.guard.resume.packed import packed_rows, rows_mismatch, tokenized_examples
from oomguard.recipes import default
from oomguard.recipes.dataset import load_sft_dataset

pytestmark = pytest.mark.slow
EXAMPLES = 40  # the first 40 of the shipped dataset: about 11 steps of 2 rows per epoch at 128 tokens
TRAIN = ["--packing", "--logging_steps", "1", "--lora_r", "4", "--lora_alpha", "8", "--precision", "fp32",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_train_epochs", "1",
         "--save_steps", "100"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = default.default_dataset_path().read_text().splitlines()[:EXAMPLES]
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_at(cache, dataset, length, monkeypatch, out) -> list[tuple[int, ...]]:
    """Example ids per packed row at ``length``, checked token by token against TRL's real rows."""
    from oomguard.recipes.options import resolve_options
    from oomguard.recipes.sft import build_trainer

    monkeypatch.setenv(default.ENV_CACHE, str(cache))
    options = resolve_options(["--dataset", str(dataset), "--max_seq_length", str(length), "--output_dir",
                               str(out), "--no_guard", *TRAIN])
    trainer, _ = build_trainer(options)
    tokens = tokenized_examples(trainer, load_sft_dataset(dataset))  # the raw dataset the recipe gave SFTTrainer
    rows = packed_rows(tokens, length, trainer.args)
    assert rows_mismatch(rows, tokens, trainer.train_dataset, length) is None
    return rows


def test_max_length_rung_with_packing_trains_every_example_once(cache, dataset, tmp_path, monkeypatch):
    common = ["--dataset", str(dataset), "--max_seq_length", "128", *TRAIN]
    straight_run = tmp_path / "straight-run"
    recipe(cache, "--output_dir", str(tmp_path / "straight"), *common, run_dir=straight_run)
    run_dir, out = tmp_path / "run", tmp_path / "out"
    first = recipe(cache, "--output_dir", str(out), *common, run_dir=run_dir, inject="cuda_oom@step=5", check=False)
    assert first.returncode == 1, first.stderr[-3000:]
    [save] = events(run_dir, "emergency_save")
    recipe(cache, "--output_dir", str(out), *common, run_dir=run_dir, attempt=2, resume=out / f"checkpoint-{save['step']}",
           knobs={"max_seq_length": 64})

    at128, at64 = (rows_at(cache, dataset, n, monkeypatch, tmp_path / f"map{n}") for n in (128, 64))
    [moved] = events(run_dir, "packed_position_reindexed")
    assert moved["max_length"] == [128, 64] and moved["step"] == save["step"] and moved["rows"] == len(at64)
    resumed_rows = {moved["first_rows_at"] + k: tuple(r) for k, r in enumerate(moved["first_rows"])}
    want = [i for e in read_ledger(ledger_file(straight_run)) for r in e.samples for i in at128[r]]
    got = []
    for e in read_ledger(ledger_file(run_dir)):
        mapping = at128 if e.attempt == 1 else {**dict(enumerate(at64)), **resumed_rows}
        got.extend(i for r in e.samples for i in mapping[r])
    assert sorted(want) == list(range(EXAMPLES))  # the reference: one epoch, every example once
    assert sorted(got) == sorted(want), f"twice: {sorted(set(i for i in got if got.count(i) > 1))}"
    assert moved["examples_seen_in_epoch"] + moved["remaining_in_epoch"] == EXAMPLES
    assert not events(run_dir, "resume_position_inexact"), json.dumps(events(run_dir, "resume_position_inexact"))
