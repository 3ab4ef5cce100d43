"""The sample ledger under several ranks (torchrun/accelerate): every rank draws the whole sampler order
and accelerate's BatchSamplerShard deals the batches in turn, so each rank's ledger must hold the rows
that rank trained, and a resume whose effective batch changed must count every rank's rows as seen."""

from __future__ import annotations

import types

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard

from oomguard.guard.resume.ledger import (
    SampleLedgerCallback,
    StepSamples,
    _record_dealt,
    _RecordingSampler,
    append_order,
    append_step,
    ledger_file,
    order_file,
    read_ledger,
)
from oomguard.guard.resume.position import apply_position


class _Order(torch.utils.data.Sampler):
    def __init__(self, order):
        self.order = order

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def _rank_stream(order, rank, *, world=2, batch=2, split=False, even=True):
    ledger = SampleLedgerCallback("/nonexistent-run-dir", rank=rank)
    ledger.record_order = lambda *a, **k: None
    inner = torch.utils.data.BatchSampler(_RecordingSampler(_Order(order), ledger), batch * (world if split else 1),
                                          drop_last=False)
    shard = BatchSamplerShard(inner, num_processes=world, process_index=rank, split_batches=split,
                              even_batches=even)
    ledger.sharded = True
    _record_dealt(shard, ledger)
    dealt = [list(b) for b in shard]
    return ledger, dealt


@pytest.mark.parametrize("split", [False, True])
def test_each_rank_records_what_the_shard_dealt_it(split):
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5, 11, 10]
    seen = []
    for rank in (0, 1):
        ledger, dealt = _rank_stream(order, rank, split=split)
        assert ledger.stream == [i for b in dealt for i in b]
        for batch in dealt:  # each micro-batch the trainer consumes takes the next batch dealt to this rank
            before = len(ledger.pending)
            ledger.consumed(ledger.rows_in_batch(2))
            assert ledger.pending[before:] == batch
        seen.append(ledger.stream)
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(order)


def test_an_uneven_last_round_is_recorded_as_accelerate_fills_it():
    order = list(range(10))  # 5 batches of 2 for 2 ranks: accelerate fills rank 1's last from the start
    ledger, dealt = _rank_stream(order, 1)
    assert ledger.stream == [i for b in dealt for i in b] and dealt[-1] == [0, 1]
    assert ledger.epoch_starts == [(0, 0)]


def test_a_resume_after_an_effective_batch_change_counts_every_ranks_rows(tmp_path):
    order = list(range(100, 124))
    for rank, rows in ((0, [100, 101, 104, 105]), (1, [102, 103, 106, 107])):  # steps 1-2, batch 2, 2 ranks
        for step in (1, 2):
            append_step(ledger_file(tmp_path, rank), StepSamples(step, 1, 0, tuple(rows[(step - 1) * 2:step * 2])))
        append_order(order_file(tmp_path, rank), epoch=0, attempt=1, order=order)
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    torch.save(types.SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1),
               ckpt / "training_args.bin")
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}')
    args = types.SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=0,
                                 world_size=2, ignore_data_skip=False)
    trainer = types.SimpleNamespace(args=args, train_dataset=list(range(24)))
    events = []
    ledger = types.SimpleNamespace(sharded=True, resume_epoch=None, resume_order=None)
    journal = types.SimpleNamespace(emit=lambda name, **kw: events.append((name, kw)))
    plan = apply_position(trainer, ledger, ckpt, tmp_path, 1, journal)
    assert plan.seen_total == 8 and ledger.resume_order == order[8:]  # none of either rank's rows again
    assert args.ignore_data_skip and events[0][0] == "effective_batch_changed"
    assert [e.samples for e in read_ledger(ledger_file(tmp_path, 1))] == [(102, 103), (106, 107)]
