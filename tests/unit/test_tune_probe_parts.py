"""The in-child probe's pure parts (issue 18): the grid, cutting a row, the spec and the record."""

import json

import pytest
import torch

from oomguard.guard.probe import cut_row, probe_grid
from oomguard.tune.record import ProbePoint, ProbeRecord, ProbeSpec


def test_grid_keeps_the_effective_batch_and_adds_the_command_batch():
    grid = probe_grid(ProbeSpec(), batch=3, accumulation=4, worst=2048)
    assert sorted({b for b, _ in grid}) == [1, 2, 3, 4]  # powers of two dividing 12, and the command's 3
    assert [n for _, n in grid][:4] == [2048] * 4 and {n for _, n in grid} == {2048, 1024, 512}


def test_grid_respects_the_spec():
    grid = probe_grid(ProbeSpec(batches=(8, 2), lengths=(1.0,)), batch=2, accumulation=8, worst=100)
    assert grid == [(2, 100), (8, 100)]
    assert max(b for b, _ in probe_grid(ProbeSpec(max_batch=4), batch=2, accumulation=32, worst=10)) == 4


def test_cut_row_cuts_every_per_token_field():
    row = {"input_ids": torch.arange(10), "labels": list(range(10)), "attention_mask": [1] * 10, "id": 7,
           "text": "abcdefghij"}
    out = cut_row(row, 4)
    assert out["input_ids"].tolist() == [0, 1, 2, 3] and out["labels"] == [0, 1, 2, 3]
    assert out["attention_mask"] == [1] * 4 and out["id"] == 7 and out["text"] == "abcdefghij"


def test_cut_row_cuts_packed_sequence_lengths():
    out = cut_row({"input_ids": list(range(12)), "seq_lengths": [5, 4, 3]}, 7)
    assert out["input_ids"] == list(range(7)) and out["seq_lengths"] == [5, 2]


def test_spec_from_env_text():
    assert ProbeSpec.from_json("") == ProbeSpec()
    spec = ProbeSpec.from_json('{"batches": [1, 4], "steps": 3}')
    assert spec.batches == (1, 4) and spec.steps == 3
    assert ProbeSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown keys"):
        ProbeSpec.from_json('{"batch": [1]}')
    with pytest.raises(ValueError, match="shares"):
        ProbeSpec(lengths=(2.0,))


def test_record_round_trips_and_refuses_another_schema():
    rec = ProbeRecord(device="cpu", cuda=False, total_bytes=None, vram_limit=None, requested={"x": 1}, worst_row=9,
                      rows=3, packed=False, points=(ProbePoint(batch=1, length=9, fits=True, tokens=9),))
    back = ProbeRecord.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back == rec
    with pytest.raises(ValueError, match="not a probe record"):
        ProbeRecord.from_dict({"schema": "other"})
