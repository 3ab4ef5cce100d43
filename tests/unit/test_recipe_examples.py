"""The shipped examples are what the generator writes, and long enough to truncate."""

import json

from oomguard.recipes.default import default_dataset_path
from oomguard.recipes.examples import generate_examples, render_jsonl


def test_shipped_file_equals_the_generator_output():
    assert default_dataset_path().read_text(encoding="utf-8") == render_jsonl(generate_examples())


def test_lengths_vary_so_a_sequence_cut_truncates_some():
    lengths = [len(json.loads(line)["messages"][1]["content"]) for line in default_dataset_path().open()]
    long = sum(n > 1200 for n in lengths)  # characters; ~4 per token, so > 256 tokens after templating
    assert 0.1 * len(lengths) < long < 0.4 * len(lengths)
    assert min(lengths) < 200
