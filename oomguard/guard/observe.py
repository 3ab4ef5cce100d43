"""What the child really runs: the recipe read back from the live objects.

Trust rule (DESIGN, issue 12): a change oomguard makes to a run is reported as made only after the
child shows it in force. :func:`observe` reads the recipe (``recipe_observed`` payload) from the
argument object, the model (PEFT adapters), and, at train begin, from the optimizer, the LR
scheduler and the train dataloader HF really uses. It never writes and never raises: a field that
is missing or odd is an absent knob.

The train-begin report and the LR order made real are in :mod:`oomguard.guard.callbacks.in_force`.
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
import os
from typing import Any, Iterable

from oomguard import knobs as K
from oomguard.guard import free_rungs
from oomguard.protocol import STAGE_BUILT, STAGE_IN_FORCE

log = logging.getLogger("oomguard.guard")

FIELD_OPTIMIZER = "optimizer"
FIELD_DATALOADER = "dataloader"
_SKIP_GENERIC = (K.PRECISION, K.LORA_R, K.LORA_ALPHA)

_MISSING = object()


# --- small, never-raising readers ----------------------------------------------------------
def _get(obj: Any, name: str) -> Any:
    """``getattr`` that never raises (properties may touch distributed state)."""
    if obj is None:
        return _MISSING
    try:
        return getattr(obj, name)
    except Exception:
        return _MISSING


def _number(v: Any) -> int | float | None:
    """``v`` as a plain int/float (a 0-d tensor or numpy scalar too); None for bools and the rest."""
    if v is None or v is _MISSING or isinstance(v, bool):
        return None
    if hasattr(v, "item") and not isinstance(v, numbers.Number):
        try:
            if getattr(v, "numel", lambda: 1)() != 1:
                return None
            v = v.item()
        except Exception:
            return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    if isinstance(v, numbers.Integral):
        return int(v)
    f = float(v)
    return f if math.isfinite(f) else None


def _text(v: Any) -> str | None:
    if v is None or v is _MISSING:
        return None
    if isinstance(v, enum.Enum):
        v = v.value
    try:
        return str(v)
    except Exception:
        return None


def _groups(optimizer: Any) -> list[dict]:
    groups = _get(optimizer, "param_groups")
    try:
        return [g for g in groups if isinstance(g, dict)] if groups is not _MISSING and groups is not None else []
    except Exception:
        return []


def _group_base_lr(group: dict) -> Any:
    return group.get("initial_lr", group.get("lr"))


def _scheduler_base_lr(lr_scheduler: Any) -> int | float | None:
    base = _get(lr_scheduler, "base_lrs")
    try:
        return _number(base[0]) if base is not _MISSING and base is not None and len(base) else None
    except Exception:
        return None


def base_lr(optimizer: Any = None, lr_scheduler: Any = None) -> float | None:
    """The learning rate the schedule is built on: ``lr_scheduler.base_lrs[0]``, else param group 0's
    ``initial_lr``, else its ``lr``; None when neither object tells."""
    v = _scheduler_base_lr(lr_scheduler)
    if v is None:
        groups = _groups(optimizer)
        v = _number(_group_base_lr(groups[0])) if groups else None
    return float(v) if v is not None else None


def current_lr(optimizer: Any) -> float | None:
    """Param group 0's ``lr`` now."""
    groups = _groups(optimizer)
    v = _number(groups[0].get("lr")) if groups else None
    return float(v) if v is not None else None


def _unwrap(model: Any) -> Any:
    """The model under DDP/compile wrappers (``.module``, ``._orig_mod``), at most a few levels."""
    for _ in range(4):
        inner = _get(model, "module")
        if inner is _MISSING or inner is None:
            inner = _get(model, "_orig_mod")
        if inner is _MISSING or inner is None:
            break
        model = inner
    return model


def _active_adapter(model: Any, configs: dict) -> str | None:
    active = _get(model, "active_adapter")
    if callable(active):  # transformers' PeftAdapterMixin.active_adapter() (a method)
        try:
            active = active()
        except Exception:
            active = _MISSING
    if isinstance(active, (list, tuple)):
        active = active[0] if active else _MISSING
    if isinstance(active, str) and active in configs:
        return active
    return next(iter(configs), None)


def _lora_configs(model: Any) -> dict:
    configs = _get(model, "peft_config")
    if not isinstance(configs, dict):
        return {}
    return {name: c for name, c in configs.items() if _text(_get(c, "peft_type")) in ("LORA", "PeftType.LORA")
            or (_get(c, "r") is not _MISSING and _get(c, "lora_alpha") is not _MISSING)}


def _live_lora_rank(model: Any, adapter: str | None) -> tuple[int | None, bool]:
    """(rank of the first ``lora_A[adapter]`` weight, whether any ``lora_A`` exists)."""
    named = _get(model, "named_modules")
    if not callable(named):
        return None, False
    found = False
    try:
        for _, module in named():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or not hasattr(lora_a, "keys"):
                continue
            found = True
            keys = list(lora_a.keys())
            key = adapter if adapter in keys else (keys[0] if keys else None)
            if key is None:
                continue
            weight = getattr(lora_a[key], "weight", None)
            shape = getattr(weight, "shape", None)
            if shape is not None and len(shape) >= 1:
                return int(shape[0]), True
    except Exception:
        pass
    return None, found


def _read_lora(model: Any, stage: str, knobs: dict, fields: dict) -> bool:
    model = _unwrap(model)
    configs = _lora_configs(model)
    adapter = _active_adapter(model, configs) if configs else None
    config = configs.get(adapter) if adapter is not None else None
    for knob in (K.LORA_R, K.LORA_ALPHA):
        peft_field = K.REGISTRY[knob].peft_field
        v = _number(_get(config, peft_field)) if config is not None else None
        if v is not None:
            knobs[knob], fields[knob] = v, f"peft:{peft_field}"
    live, any_lora = (None, False)
    if stage == STAGE_IN_FORCE or not configs:
        live, any_lora = _live_lora_rank(model, adapter)
    if stage == STAGE_IN_FORCE and live is not None:
        knobs[K.LORA_R], fields[K.LORA_R] = live, f"peft:{K.REGISTRY[K.LORA_R].peft_field}"
    return bool(configs) or any_lora


def _dataloader_batch(dl: Any, args: Any) -> int | None:
    """Per-device batch of the dataloader HF iterates (plain ``DataLoader`` or accelerate's
    ``DataLoaderShard``/``DataLoaderDispatcher``, which keep ``batch_size``/``batch_sampler``)."""
    if dl is None:
        return None
    sampler = _get(dl, "batch_sampler")
    bs = _number(_get(dl, "batch_size"))
    if bs is None:
        bs = _number(_get(sampler, "batch_size"))
    if not isinstance(bs, int) or bs <= 0:
        return None
    split = _get(dl, "split_batches") is True or _get(sampler, "split_batches") is True
    if split:  # accelerate split_batches: the loader yields the global batch, each rank a slice
        n = _number(_get(sampler, "num_processes")) or _number(_get(_get(dl, "state"), "num_processes")) \
            or _number(_get(args, "world_size")) or 1
        bs = bs // int(n) if isinstance(n, int) and n > 0 else bs
    return bs


# --- the observation ------------------------------------------------------------------------
def _args_knobs(args: Any, extra_knobs: Iterable[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The knobs the arguments object carries (registry fields, then ``extra_knobs``) and their fields."""
    knobs: dict[str, Any] = {}
    fields: dict[str, str] = {}
    names = [k for k in K.REGISTRY if k not in _SKIP_GENERIC]
    names += [k for k in dict.fromkeys(extra_knobs or ()) if k not in K.REGISTRY]
    for name in names:
        try:
            for f in K.spec(name).fields:
                v = _number(_get(args, f))
                if v is not None:
                    knobs[name], fields[name] = v, f
                    break
        except Exception:
            continue
    free_rungs.args_knobs(args, knobs, fields)
    try:
        bf16, fp16 = _get(args, "bf16"), _get(args, "fp16")
        if bf16 is not _MISSING and fp16 is not _MISSING:
            knobs[K.PRECISION], fields[K.PRECISION] = K.precision_of(bf16, fp16), "bf16/fp16"
    except Exception:
        pass
    return knobs, fields


def _in_force(args: Any, optimizer: Any, lr_scheduler: Any, train_dataloader: Any, knobs: dict[str, Any],
              fields: dict[str, str], model: Any = None) -> dict[str, Any]:
    """At train begin: the LR and batch the optimizer and dataloader really use (into ``knobs``);
    returns the payload's ``current_lr``."""
    try:
        lr = base_lr(optimizer, lr_scheduler)
        if lr is not None:
            knobs[K.LEARNING_RATE], fields[K.LEARNING_RATE] = lr, FIELD_OPTIMIZER
    except Exception:
        pass
    try:
        extra = {"current_lr": current_lr(optimizer)}
    except Exception:
        extra = {"current_lr": None}
    free_rungs.in_force(model, optimizer, args, knobs, fields)
    try:
        bs = _dataloader_batch(train_dataloader, args)
        if bs is not None:
            knobs[K.BATCH], fields[K.BATCH] = bs, FIELD_DATALOADER
    except Exception:
        pass
    return extra


def _output_dir(args: Any) -> str | None:
    out_dir = _get(args, "output_dir")
    try:
        return os.path.abspath(os.fspath(out_dir)) if out_dir not in (None, _MISSING) else None
    except Exception:
        return None


def observe(trainer: Any = None, *, args: Any = None, model: Any = None, optimizer: Any = None,
            lr_scheduler: Any = None, train_dataloader: Any = None, stage: str,
            extra_knobs: Iterable[str] = ()) -> dict[str, Any]:
    """The recipe the child runs, as a ``recipe_observed`` payload (without attempt/rank).

    Objects not passed are taken from ``trainer`` (``args``, ``model``, ``optimizer``,
    ``lr_scheduler``, the callback handler's ``train_dataloader``). Reads only; never raises.
    """
    if trainer is not None:
        args = args if args is not None else _none(_get(trainer, "args"))
        model = model if model is not None else _none(_get(trainer, "model"))
        optimizer = optimizer if optimizer is not None else _none(_get(trainer, "optimizer"))
        lr_scheduler = lr_scheduler if lr_scheduler is not None else _none(_get(trainer, "lr_scheduler"))
        if train_dataloader is None:
            train_dataloader = _none(_get(_get(trainer, "callback_handler"), "train_dataloader"))
    knobs, fields = _args_knobs(args, extra_knobs)
    try:
        lora = _read_lora(model, stage, knobs, fields) if model is not None else False
    except Exception:
        lora = False
    payload_extra = _in_force(args, optimizer, lr_scheduler, train_dataloader, knobs, fields, model) \
        if stage == STAGE_IN_FORCE else {}
    ws = _number(_get(args, "world_size"))
    world_size = ws if isinstance(ws, int) and ws >= 1 else 1
    try:
        eff = K.effective_batch(knobs, world_size)
    except Exception:
        eff = None
    return {
        "stage": stage,
        "knobs": knobs,
        "fields": fields,
        "effective_batch": eff,
        "world_size": world_size,
        "output_dir": _output_dir(args),
        "trainer": type(trainer).__name__ if trainer is not None else None,
        "args_class": type(args).__name__ if args is not None else None,
        "lr_scheduler_type": _text(_get(args, "lr_scheduler_type")),
        "optim": _text(_get(args, "optim")),
        "lora": lora,
        **payload_extra,
    }


def _none(v: Any) -> Any:
    return None if v is _MISSING else v


__all__ = ["STAGE_BUILT", "STAGE_IN_FORCE", "base_lr", "current_lr", "observe"]
