"""The ledger of samples seen: compact encoding, newest attempt wins, the position derived from samples."""

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from oomguard import protocol
from oomguard.guard.resume.ledger import (
    SampleLedgerCallback,
    StepSamples,
    append_order,
    append_step,
    compress,
    expand,
    ledger_file,
    order_file,
    read_ledger,
    read_orders,
    remaining_in_epoch,
    samples_seen,
)
from oomguard.guard.resume.packed import packed_length_change, state_packed_length_change
from oomguard.guard.resume.position import Batch, PositionUnknown, checkpoint_batch, plan_position
from oomguard.guard.writer import EventWriter


@given(st.lists(st.integers(0, 50), max_size=60))
def test_compress_round_trips_and_keeps_order(indices):
    runs = compress(indices)
    assert expand(runs) == indices
    assert len(runs) <= len(indices)


def test_sequential_order_is_one_run():
    assert compress(list(range(100, 164))) == [[100, 64]]


def test_newest_attempt_supersedes_and_torn_lines_are_skipped(tmp_path):
    path = ledger_file(tmp_path, 0)
    for step, attempt, rows in [(1, 1, [4, 5]), (2, 1, [9, 1]), (3, 1, [2, 3]), (3, 2, [2, 7]), (4, 2, [8, 0])]:
        append_step(path, StepSamples(step, attempt, 0, tuple(rows)))
    with open(path, "a") as f:
        f.write('{"step": 5, "attempt"')  # a kill mid-line
    entries = read_ledger(path)
    assert [(e.step, e.attempt, e.samples) for e in entries] == [
        (1, 1, (4, 5)), (2, 1, (9, 1)), (3, 2, (2, 7)), (4, 2, (8, 0))]
    assert samples_seen(entries, up_to_step=2) == Counter({4: 1, 5: 1, 9: 1, 1: 1})
    assert path.parent.name == protocol.LEDGER_DIR


def test_remaining_in_epoch_is_the_order_minus_what_was_seen():
    order = [5, 3, 8, 1, 0, 7]
    assert remaining_in_epoch(order, Counter({3: 1, 5: 1, 0: 1})) == [8, 1, 7]
    assert remaining_in_epoch(order, Counter()) == order


class _Args:
    ignore_data_skip = False
    gradient_accumulation_steps = 2
    per_device_train_batch_size = 3


class _State:
    def __init__(self, step, epoch=0.0):
        self.global_step, self.epoch = step, epoch


def test_callback_maps_consumption_onto_the_sampler_stream(tmp_path):
    cb = SampleLedgerCallback(tmp_path, attempt=2)
    cb.stream.extend(range(100, 130))  # what the sampler handed out, prefetch included
    # resumed at step 2 of an epoch of 5 steps (10 batches): HF drew 2 x 2 x 3 = 12 samples to skip them
    cb.on_train_begin(_Args(), _State(2), None, train_dataloader=[None] * 10)
    assert cb.pointer == 12
    cb.on_step_begin(_Args(), _State(2, 0.4), None)
    cb.consumed(3)
    cb.consumed(2)  # a short last micro-batch
    cb.on_step_end(_Args(), _State(3, 0.6), None)
    [entry] = read_ledger(ledger_file(tmp_path))
    assert (entry.step, entry.attempt, entry.samples) == (3, 2, (112, 113, 114, 115, 116))


# --- the position after an effective-batch change (guard/position.py) -------------------------
def _entries(order, per_step, steps, epoch=0, attempt=1):
    return [StepSamples(k + 1, attempt, epoch, tuple(order[k * per_step:(k + 1) * per_step])) for k in range(steps)]


def test_plan_continues_at_the_next_unseen_sample_and_keeps_the_sample_budget():
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5, 11, 10]
    entries = _entries(order, 4, 2)  # steps 1-2 of epoch 0, 4 samples each
    plan = plan_position(entries, {0: order}, step=2, old=Batch(1, 4), new=Batch(1, 2), max_steps=3,
                         dataset_rows=len(order))
    assert plan.remaining == tuple(order[8:])
    assert (plan.seen_total, plan.seen_in_epoch, plan.epoch) == (8, 8, 0)
    assert plan.max_steps == (3, 4)  # one step of 4 samples left = two steps of 2
    assert plan.warnings == ()
    assert plan.event()["effective_batch"] == [4, 2]


def test_plan_ignores_steps_after_the_checkpoint_and_other_epochs():
    first, second = list(range(8)), [5, 3, 1, 7, 0, 2, 6, 4]
    entries = _entries(first, 4, 2) + [StepSamples(3, 1, 1, (5, 3)), StepSamples(4, 1, 1, (1, 7))]
    # steps 1-2 (4 samples) filled epoch 0; steps 3-4 took 2 each in epoch 1; resume from step 3
    plan = plan_position(entries, {0: first, 1: second}, step=3, old=Batch(2, 1), new=Batch(1, 1), max_steps=-1,
                         dataset_rows=8)
    assert plan.epoch == 1 and plan.remaining == (1, 7, 0, 2, 6, 4)
    assert plan.max_steps is None and plan.seen_total == 10


def test_plan_states_what_hf_cannot_do_exactly():
    order = list(range(10))
    plan = plan_position(_entries(order, 3, 1), {0: order}, step=1, old=Batch(3, 1), new=Batch(1, 2),
                         max_steps=-1, dataset_rows=10)
    assert len(plan.remaining) == 7 and any("short step" in w for w in plan.warnings)


def test_plan_refuses_without_the_step_or_the_order():
    import pytest

    order = list(range(8))
    with pytest.raises(PositionUnknown, match="no record of step 3"):
        plan_position(_entries(order, 4, 2), {0: order}, step=3, old=Batch(4, 1), new=Batch(2, 1), max_steps=-1,
                      dataset_rows=8)
    with pytest.raises(PositionUnknown, match="no sampler order for epoch 0"):
        plan_position(_entries(order, 4, 2), {}, step=2, old=Batch(4, 1), new=Batch(2, 1), max_steps=-1,
                      dataset_rows=8)


def test_orders_keep_the_newest_attempt_per_epoch(tmp_path):
    path = order_file(tmp_path, 1)
    append_order(path, epoch=0, attempt=1, order=[3, 1, 2])
    append_order(path, epoch=1, attempt=1, order=[2, 3, 1])
    append_order(path, epoch=1, attempt=2, order=[1, 2, 3])
    assert read_orders(path) == {0: (3, 1, 2), 1: (1, 2, 3)}


def test_sampler_passes_are_numbered_and_a_resume_order_replaces_the_first(tmp_path):
    from oomguard.guard.resume.ledger import _RecordingSampler

    cb = SampleLedgerCallback(tmp_path, attempt=2)
    cb.first_epoch, cb.resume_order = 3, [9, 8]
    sampler = _RecordingSampler(range(4), cb)
    assert list(sampler) == [9, 8] and list(sampler) == [0, 1, 2, 3]
    assert cb.epoch_starts == [(0, 3), (2, 4)] and cb.epoch_at(1) == 3 and cb.epoch_at(2) == 4
    assert read_orders(order_file(tmp_path)) == {4: (0, 1, 2, 3)}  # the resumed epoch's order stays on file


def _args(**fields):
    from types import SimpleNamespace

    return SimpleNamespace(**{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, **fields})


def test_packed_length_change_only_when_packing_and_the_length_moved():
    assert packed_length_change(_args(max_length=128), _args(max_length=64, packing=True)) == (128, 64)
    assert packed_length_change(_args(max_length=128), _args(max_length=64, packing=False)) is None  # exact in HF
    assert packed_length_change(_args(max_length=64), _args(max_length=64, packing=True)) is None
    assert packed_length_change(None, _args(max_length=64, packing=True)) is None  # unreadable: nothing to say


def test_a_repacked_resume_is_stated_in_the_journal(tmp_path):
    import json

    import torch

    checkpoint, run_dir = tmp_path / "checkpoint-3", tmp_path / "run"
    checkpoint.mkdir()
    run_dir.mkdir()
    torch.save(_args(max_length=128, packing=True), checkpoint / "training_args.bin")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert checkpoint_batch(checkpoint) == Batch(2, 2)

    class FakeTrainer:
        args = _args(max_length=64, packing=True)

    assert state_packed_length_change(FakeTrainer(), checkpoint, EventWriter(run_dir)) == (128, 64)
    events = list(protocol.read_jsonl(run_dir / protocol.EVENTS_JSONL))
    [event] = [e for e in events if e["event"] == "resume_position_inexact"]
    assert event["max_length"] == [128, 64] and event["step"] == 3 and "packing" in event["detail"]
    FakeTrainer.args = _args(max_length=128, packing=True)
    assert state_packed_length_change(FakeTrainer(), checkpoint, EventWriter(run_dir)) is None
    assert len(list(protocol.read_jsonl(run_dir / protocol.EVENTS_JSONL))) == 1


def test_packed_plan_maps_rows_seen_to_examples_and_keeps_the_rest_in_order():
    from oomguard.guard.resume.packed import plan_packed

    old_rows = [(0, 5), (1,), (2, 3, 4), (6,)]  # example ids per row at the old max_length
    entries = [StepSamples(1, 1, 0, (2,)), StepSamples(2, 1, 0, (0,)), StepSamples(3, 2, 0, (3,))]
    plan = plan_packed(entries, {0: [2, 0, 3, 1]}, old_rows, step=2, max_length=(128, 64))
    assert plan.examples_seen_in_epoch == 5 and plan.remaining == (6, 1)  # row 3 then row 1
    import pytest

    with pytest.raises(PositionUnknown):  # the order is over 3 rows, the mapping makes 4: do not guess
        plan_packed(entries, {0: [2, 0, 1]}, old_rows, step=2, max_length=(128, 64))


def test_batch_size_reads_mappings_that_are_not_dicts():
    """transformers' collators return BatchEncoding (a UserDict); an H100 run of a plain HF Trainer
    script crashed on it before."""
    import torch
    from transformers import BatchEncoding

    from oomguard.guard.resume.ledger import _batch_size

    assert _batch_size(BatchEncoding({"input_ids": torch.zeros(3, 7), "labels": torch.zeros(3, 7)})) == 3
    assert _batch_size({"inputs_embeds": torch.zeros(5, 2, 4)}) == 5
    assert _batch_size({"pixel_values": torch.zeros(2, 3)}) is None  # the caller counts the configured batch
    assert _batch_size([torch.zeros(2)]) is None
