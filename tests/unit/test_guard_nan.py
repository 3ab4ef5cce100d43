"""NaN/inf detection on a small real nn.Module's gradients."""

import math
from types import SimpleNamespace

import pytest
import torch

from oomguard.guard.callbacks.nan import NanGuardCallback, NonFiniteLossError, all_finite, trainable_grads


def model_with_grads(poison: float | None = None, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).to(dtype)
    model[0].weight.requires_grad_(False)  # frozen, like a base model under LoRA
    x = torch.randn(3, 4, dtype=dtype)
    loss = model(x).sum()
    if poison is not None:
        loss = loss * poison
    loss.backward()
    return model


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_non_finite_grads_detected(poison):
    assert not all_finite(trainable_grads(model_with_grads(poison).parameters()))


def test_finite_grads_pass_and_big_bf16_does_not_overflow():
    assert all_finite(trainable_grads(model_with_grads().parameters()))
    big = [torch.full((1000,), 1e38, dtype=torch.bfloat16)]  # the 2-norm would overflow even in fp32
    assert all_finite(big)


def test_non_finite_loss_with_finite_grads_detected():
    grads = trainable_grads(model_with_grads().parameters())
    assert not all_finite(grads, torch.tensor(float("nan")))


def state(step):
    return SimpleNamespace(global_step=step)


def test_guard_drops_grads_and_stops_when_budget_spent():
    guard = NanGuardCallback(skip_steps=0)
    model = model_with_grads()
    guard.on_pre_optimizer_step(None, state(4), None, model=model)
    assert guard.last_finite_step == 5
    model = model_with_grads(math.nan)
    with pytest.raises(NonFiniteLossError) as info:
        guard.on_pre_optimizer_step(None, state(5), None, model=model)
    assert info.value.step == 5 and info.value.last_finite_step == 5
    assert all(p.grad is None for p in model.parameters())


def test_guard_skips_within_budget_then_stops():
    guard = NanGuardCallback(skip_steps=1)
    model = model_with_grads(math.inf)
    guard.on_pre_optimizer_step(None, state(0), None, model=model)  # skipped, training goes on
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NonFiniteLossError):
        guard.on_pre_optimizer_step(None, state(1), None, model=model_with_grads(math.nan))


def test_skipped_update_leaves_weights_unchanged():
    guard = NanGuardCallback(skip_steps=5)
    model = model_with_grads(math.nan)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    guard.on_pre_optimizer_step(None, state(0), None, model=model)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
