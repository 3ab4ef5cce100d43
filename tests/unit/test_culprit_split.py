"""A split culprit step trains the same gradient as the unsplit one (issue 19), on CPU, through the real
``Trainer.training_step``: both of its loss branches (normalised by ``num_items_in_batch``, or a mean divided
by the accumulation steps), factors 2 and 4 over rows of unequal length; quarantined rows are left out and
recorded; a one-row micro-batch cannot be split and says so."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from oomguard.guard.culprit import CulpritStep, chunk_bounds, label_tokens, unsplittable
from oomguard.protocol import CulpritOrder

ROWS = (5, 9, 3, 12)  # lengths: the chunks hold unequal label-token shares


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 2  # what the training loop sets before each step
    accepts = trainer.model_accepts_loss_kwargs
    yield trainer
    trainer.model_accepts_loss_kwargs = accepts


def _batch():
    g = torch.Generator().manual_seed(1)
    width = max(ROWS)
    ids = torch.zeros(len(ROWS), width, dtype=torch.long)
    labels = torch.full((len(ROWS), width), -100)
    mask = torch.zeros(len(ROWS), width, dtype=torch.long)
    for i, n in enumerate(ROWS):
        ids[i, :n] = torch.randint(1, 64, (n,), generator=g)
        labels[i, :n], mask[i, :n] = ids[i, :n], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _grads(trainer, train):
    trainer.model.zero_grad(set_to_none=True)
    loss = train()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _close(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("scaled", [True, False], ids=["num_items_in_batch", "mean_over_accumulation"])
def test_a_split_step_has_the_unsplit_gradient(trainer, scaled):
    trainer.model_accepts_loss_kwargs = scaled  # False: HF's other branch (a mean, divided by GA)
    batch = _batch()
    items = torch.tensor(label_tokens(batch) * 2)  # the step's count over both micro-batches
    ref_loss, ref = _grads(trainer, lambda: trainer.training_step(trainer.model, dict(batch), items))
    for factor in (2, 4):
        step = CulpritStep(CulpritOrder(split=((1, factor),)), None)
        loss, got = _grads(trainer, lambda: step.train(trainer, trainer.training_step, trainer.model, dict(batch),
                                                       (10, 11, 12, 13), items))
        _close(ref, got)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        assert trainer.current_gradient_accumulation_steps == 2  # restored after the chunks
        assert step._split == {"micro_batches": 1, "chunks": factor, "rows": 4, "factor": factor,
                               "max_chunk_tokens": 12 * (4 // factor)}


def test_quarantined_rows_are_left_out_and_recorded(trainer, tmp_path):
    trainer.model_accepts_loss_kwargs = True
    batch, items = _batch(), torch.tensor(40)
    keep = {k: v[[0, 2, 3]] for k, v in batch.items()}
    _, ref = _grads(trainer, lambda: trainer.training_step(trainer.model, keep, items))
    step = CulpritStep(CulpritOrder(quarantine=(11,)), tmp_path, attempt=3)
    _, got = _grads(trainer, lambda: step.train(trainer, trainer.training_step, trainer.model, dict(batch),
                                                (10, 11, 12, 13), items))
    _close(ref, got)
    loss, none = _grads(trainer, lambda: step.train(trainer, trainer.training_step, trainer.model,
                                                    {k: v[[1]] for k, v in batch.items()}, (11,), items))
    assert none == {} and float(loss) == 0.0  # a micro-batch of quarantined rows only: no forward at all
    assert step.step_ended(1) == ((3 * 12, 0), (11, 11))  # tokens trained at once per micro-batch; skipped
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["event"], event["attempt"], event["rows"]) == ("rows_quarantined", 3, [11, 11])


def test_a_one_row_micro_batch_cannot_be_split_and_says_so(trainer, tmp_path):
    one = {k: v[[3]] for k, v in _batch().items()}
    assert "one row" in unsplittable(one) and "padding-free" in unsplittable(_batch(), padding_free=True)
    step = CulpritStep(CulpritOrder(split=((1, 2),)), tmp_path)
    step.train(trainer, trainer.training_step, trainer.model, one, (7,), torch.tensor(11))
    step.step_ended(1)
    [event] = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "culprit_unsplittable" and "one row" in event["why"]
    assert step.failure_line(2, "oom")["micro_batches"] == []  # the next step starts clean


def test_chunks_cover_the_rows_in_order():
    for rows in range(1, 9):
        for factor in (1, 2, 3, 4, 16):
            chunks = chunk_bounds(rows, factor)
            assert [i for c in chunks for i in c] == list(range(rows)) and all(chunks)
            assert len(chunks) == min(factor, rows) and max(map(len, chunks)) - min(map(len, chunks)) <= 1
