"""Is the learning rate asked for in the range its recipe's class is trained with? Pure (issue 19).

Stated once at the start of a run, never acted on: attempt 1 trains what the command asks. A divergence
later is met by the ``nan_loss`` ladder (the shipped ones halve once, then step by x0.1: a rate off by a
factor is a typo, not a bit too high).
"""

from __future__ import annotations

__all__ = ["FAR", "LORA_LR_RANGE", "lr_note"]

# LoRA / QLoRA on 7-70B models, as the recipes people copy train them (QLoRA paper 1e-4..2e-4; TRL, Axolotl,
# Unsloth examples 5e-5..2e-4; issue 19: "commonly 1e-5 ... 5e-4").
LORA_LR_RANGE = (1e-5, 5e-4)
FAR = 10.0  # said only this far outside the range: a factor of two is taste, a factor of ten a typo


def lr_note(learning_rate: object, lora: bool) -> str | None:
    """A sentence when ``learning_rate`` is :data:`FAR` or more outside :data:`LORA_LR_RANGE` for a LoRA run,
    else None (None for full fine-tuning: no class range is claimed for it)."""
    if not lora or isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        return None
    low, high = LORA_LR_RANGE
    lr = float(learning_rate)
    if low <= lr <= high:
        return None
    if lr <= 0:
        return f"learning_rate {lr:g} trains nothing (LoRA/QLoRA usually runs at {low:g} to {high:g})"
    factor, side = (lr / high, "above") if lr > high else (low / lr, "below")
    if factor < FAR:
        return None
    return (f"learning_rate {lr:g} is {factor:,.0f}x {side} the usual LoRA/QLoRA range {low:g} to {high:g}; "
            "training it as written (attempt 1 is your command)"
            + ("; if it diverges, the nan_loss ladder lowers it" if lr > high else ""))
