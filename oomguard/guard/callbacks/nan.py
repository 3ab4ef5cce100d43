"""NanGuardCallback: catch a non-finite loss or gradient on the step it happens, skip its update.

The logged ``loss`` cannot be trusted (HF logs a NaN step as 0.0 with logging_nan_inf_filter),
so the guard looks at the gradients right before ``optimizer.step()`` (DESIGN §7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from transformers import TrainerCallback

from oomguard.guard import trainer_patches as internals
from oomguard.guard.writer import EventWriter

__all__ = ["all_finite", "drop_grads", "NanGuardCallback", "NonFiniteLossError", "trainable_grads"]


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss/gradient and the skip budget is spent."""

    def __init__(self, step: int, last_finite_step: int | None, skipped: int):
        self.step = step  # last completed optimizer step
        self.last_finite_step = last_finite_step
        self.skipped = skipped
        super().__init__(
            f"non-finite loss or gradients at optimizer step {step + 1} (last finite step "
            f"{last_finite_step}, {skipped} step(s) skipped before); the update was not applied. "
            "Fix: roll back to the last finite checkpoint and lower the learning rate, tighten "
            "max_grad_norm or move fp16 to bf16 (oomguard's nan_loss ladder does this)")


def trainable_grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.requires_grad and p.grad is not None]


def all_finite(grads: list[torch.Tensor], loss: torch.Tensor | None = None) -> bool:
    """One fused check (a single device sync) over every gradient and the loss.

    The max-abs (inf) norm cannot overflow, unlike the 2-norm of a large-but-finite gradient,
    and is NaN or inf exactly when some element is.
    """
    norms: list[torch.Tensor] = []
    if grads:
        dense = [g.to_dense() if g.is_sparse else g for g in grads]
        norms = [n.float().reshape(1) for n in internals.inf_norms(dense)]
    if loss is not None:
        norms.append(loss.detach().float().reshape(-1)[:1])
    if not norms:
        return True
    target = norms[0].device
    return bool(torch.cat([n.to(target) for n in norms]).isfinite().all())


def drop_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """``p.grad = None`` everywhere: the optimizer then skips every parameter this step."""
    for p in params:
        p.grad = None


class NanGuardCallback(TrainerCallback):
    def __init__(self, run_dir: str | Path | None = None, *, rank: int = 0, skip_steps: int = 0):
        if skip_steps < 0:
            raise ValueError(f"skip_steps={skip_steps} must be >= 0 (non-finite steps to skip before stopping)")
        self.journal = EventWriter(run_dir, rank)
        self.skip_steps = skip_steps
        self.skipped = 0
        self.last_finite_step: int | None = None
        self.last_loss: torch.Tensor | None = None

    def observe_loss(self, loss: torch.Tensor | None) -> None:
        """Remember the latest micro-batch loss (detached, no sync); guarded_train feeds it."""
        if isinstance(loss, torch.Tensor):
            self.last_loss = loss.detach()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.last_finite_step is None:
            self.last_finite_step = state.global_step  # a resumed run starts from a finite checkpoint

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        params = list(model.parameters())
        loss, self.last_loss = self.last_loss, None
        if getattr(args, "fp16", False) and (loss is None or all_finite([], loss)):
            # fp16 AMP: inf in the *scaled* gradients with a finite loss is the GradScaler's
            # normal overflow probe; it skips that update and lowers the scale by itself.
            # A real divergence shows as a non-finite loss.
            if loss is not None:
                self.last_finite_step = state.global_step + 1
            return
        if all_finite(trainable_grads(params), loss):
            self.last_finite_step = state.global_step + 1  # the step about to be applied
            return
        drop_grads(params)
        self.skipped += 1
        stop = self.skipped > self.skip_steps
        self.journal.emit("nan_detected", step=state.global_step + 1, last_finite_step=self.last_finite_step,
                          skipped=self.skipped, action="stop" if stop else "skip")
        if stop:
            raise NonFiniteLossError(state.global_step, self.last_finite_step, self.skipped - 1)
