"""At train begin: the ordered learning rate made the one in force, then the recipe reported.

:class:`RecipeCallback` runs at ``on_train_begin`` - in transformers 5.x after ``_prepare_for_training``
has loaded a checkpoint's ``optimizer.pt``/``scheduler.pt`` (which carry the OLD learning rate in
``base_lrs``, ``initial_lr`` and ``lr``) - so it can (1) make an ordered ``learning_rate`` the one in
force by rescaling the restored schedule, and (2) journal the stage ``in_force`` observation.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

from transformers import TrainerCallback

from oomguard import knobs as K
from oomguard.guard import free_rungs
from oomguard.guard import trainer_patches as internals
from oomguard.guard.env import GuardEnv
from oomguard.guard.notices import warn_once
from oomguard.guard.observe import _get, _groups, _number, base_lr, observe
from oomguard.guard.writer import EventWriter
from oomguard.protocol import EVENT_RECIPE_OBSERVED, STAGE_IN_FORCE

__all__ = ["EVENT_LR_OVERRIDE", "RecipeCallback", "apply_lr_order"]

log = logging.getLogger("oomguard.guard")

EVENT_LR_OVERRIDE = "lr_override"  # the ordered learning rate replaced the one a checkpoint restored


def _scaled(v: Any, ratio: float) -> Any:
    """``v * ratio`` as a new value (a tensor LR stays a tensor; never in place, so an LR tensor
    shared between a group and the scheduler is not scaled twice)."""
    return v * ratio


def _scale_scheduler(s: Any, ratio: float, seen: set[int]) -> None:
    if s is None or id(s) in seen:
        return
    seen.add(id(s))
    for attr in ("base_lrs", "_last_lr"):
        values = _get(s, attr)
        if isinstance(values, (list, tuple)):
            try:
                setattr(s, attr, type(values)(_scaled(v, ratio) if _number(v) is not None else v for v in values))
            except Exception as exc:
                log.warning("oomguard: could not rescale %s.%s: %s", type(s).__name__, attr, exc)
    for attr in ("_schedulers", "schedulers"):  # SequentialLR / ChainedScheduler
        inner = _get(s, attr)
        if isinstance(inner, (list, tuple)):
            for sub in inner:
                _scale_scheduler(sub, ratio, seen)


def apply_lr_order(ordered: Any, optimizer: Any, lr_scheduler: Any = None) -> dict[str, Any] | None:
    """Make ``ordered`` the base learning rate in force, keeping the schedule's shape.

    ratio = ordered / current base LR (``base_lrs[0]``, else group 0 ``initial_lr``, else ``lr``).
    Every param group's ``lr`` and ``initial_lr`` and the scheduler's ``base_lrs`` and ``_last_lr``
    (what HF logs through ``get_last_lr()``) are multiplied by it, so warmup/decay keep their shape
    and groups keep their relative LRs. Returns the ``lr_override`` fields, or None when nothing
    was changed (no optimizer, no usable order, already in force).
    """
    target = _number(ordered)
    groups = _groups(optimizer)
    if target is None or target <= 0 or not groups:
        return None
    target = float(target)
    before = base_lr(optimizer, lr_scheduler)
    if before is None or before <= 0:
        return None  # no base to scale from (an LR of 0 has no shape to keep)
    ratio = target / before
    if ratio == 1 or math.isclose(ratio, 1.0, rel_tol=1e-12):
        return None
    for g in groups:
        for key in ("lr", "initial_lr"):
            if key in g and _number(g[key]) is not None:
                g[key] = _scaled(g[key], ratio)
    _scale_scheduler(lr_scheduler, ratio, set())
    after = base_lr(optimizer, lr_scheduler)
    return {"ordered": target, "before": before, "after": after, "ratio": ratio,
            "groups": [_number(g.get("lr")) for g in groups]}


def _trainer_class() -> str | None:
    """The class name of the Trainer whose training loop called us (callbacks are not given the
    Trainer): the ``self`` of the nearest ``_inner_training_loop``/``train`` frame. Best effort."""
    try:
        import sys

        frame = sys._getframe(1)
        for _ in range(40):
            if frame is None:
                break
            if frame.f_code.co_name in (internals.INNER_TRAINING_LOOP, "train"):
                owner = frame.f_locals.get("self")
                if owner is not None and hasattr(owner, "callback_handler"):
                    return type(owner).__name__
            frame = frame.f_back
    except Exception:
        pass
    return None


def _reset_foreign_optimizer_state(optimizer: Any) -> str | None:
    """A resumed optimizer state written by another optimizer (an ``optim`` rung) dropped before the first
    step, which it would crash or silently run at the old precision; said once and in the payload."""
    try:
        reset = free_rungs.reset_foreign_state(optimizer)
    except Exception as exc:
        log.warning("oomguard: could not check the resumed optimizer state: %s", exc)
        return None
    if reset:
        warn_once("optimizer_state_reset", f"oomguard: {reset}", stacklevel=2)
    return reset


class RecipeCallback(TrainerCallback):
    """At train begin: apply an ordered ``learning_rate`` over the restored schedule, then journal
    the recipe in force (``recipe_observed`` stage ``in_force``). Harmless outside oomguard."""

    def __init__(self, env: GuardEnv, extra_knobs: Iterable[str] = ()):
        self.env = env
        # policy-declared knobs to report (GuardEnv.observe, from OOMGUARD_OBSERVE where the env has it)
        self.extra_knobs = tuple(dict.fromkeys((*extra_knobs, *(getattr(env, "observe", None) or ()))))
        self.journal = EventWriter(env.run_dir, env.rank)
        self.last_observed: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        knobs = self.env.knobs or {}
        if K.LEARNING_RATE in knobs and optimizer is not None:
            try:
                change = apply_lr_order(knobs[K.LEARNING_RATE], optimizer, lr_scheduler)
            except Exception as exc:  # the observation below then shows the old LR: reported, not hidden
                log.warning("oomguard: could not apply the ordered learning_rate %r: %s", knobs[K.LEARNING_RATE], exc)
                change = None
            if change is not None:
                self.journal.emit(EVENT_LR_OVERRIDE, attempt=self.env.attempt, step=state.global_step, **change)
        reset = _reset_foreign_optimizer_state(optimizer)  # empty on a fresh start: nothing to check
        try:
            payload = observe(args=args, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                              train_dataloader=train_dataloader, stage=STAGE_IN_FORCE, extra_knobs=self.extra_knobs)
            payload["trainer"] = _trainer_class()
            if reset:
                payload["optimizer_state_reset"] = reset
        except Exception as exc:  # observe does not raise; belt and braces for a training run
            log.warning("oomguard: could not observe the recipe: %s", exc)
            return
        self.last_observed = payload
        self.journal.emit(EVENT_RECIPE_OBSERVED, attempt=self.env.attempt, **payload)
