"""The ledger of samples seen: compact encoding, newest attempt wins, the position derived from samples."""

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from oomguard import protocol
from oomguard.guard.ledger import (SampleLedgerCallback, StepSamples, append_step, compress, expand, ledger_file,
                                   read_ledger, remaining_in_epoch, samples_seen)


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
