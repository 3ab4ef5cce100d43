"""The knobs of the rungs that free memory without retraining differently (issue 18 item 6), read in the child.

- ``gradient_checkpointing``: the arguments' ``activation_checkpointing`` (transformers >= 5.23) or
  ``gradient_checkpointing``; in force: a live module with ``gradient_checkpointing`` on (HF enables it in
  ``train()``, before ``on_train_begin``).
- ``activation_offload``: the checkpointing kwargs' ``offload``; in force: that module's checkpoint function
  enters ``save_on_cpu``.
- ``optim``: the arguments' ``optim``; in force: the optimizer's class (bitsandbytes bits and paging) agrees.
- ``expandable_segments``: the allocator config this process was started with; in force (CUDA): the caching
  allocator's segments are expandable.

A checkpoint's optimizer state written by another optimizer crashes the first step (torch AdamW's
``exp_avg`` in a bitsandbytes AdamW: ``KeyError: 'state1'``, and back) or, between bitsandbytes 32- and 8-bit,
silently keeps the old precision: :func:`reset_foreign_state` drops it at train begin, the schedule kept.
Readers never raise.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping

from oomguard import knobs as K

__all__ = ["alloc_conf_in_env", "args_knobs", "expandable_in", "in_force", "optimizer_matches",
           "reset_foreign_state"]

FIELD_MODEL = "model:gradient_checkpointing"
FIELD_OFFLOAD = "checkpointing_kwargs:offload"
FIELD_OPTIMIZER_CLASS = "optimizer:class"
FIELD_ALLOCATOR = "allocator:segments"
_ABSENT = object()
_BNB_QUANT_STATE = "__bnb_optimizer_quant_state__"  # what a bitsandbytes state_dict packs its tensors under


def _get(obj: Any, name: str, default: Any = None) -> Any:
    try:
        return getattr(obj, name, default)
    except Exception:
        return default


def args_knobs(args: Any, knobs: dict[str, Any], fields: dict[str, str]) -> None:
    """Into ``knobs``/``fields``: the bool/choice knobs the arguments carry, the kwargs' ``offload`` and
    ``expandable_segments`` from the environment (what torch reads when CUDA starts)."""
    if args is None:
        return
    for name in (K.GRADIENT_CHECKPOINTING, K.OPTIM):
        for f in K.spec(name).fields:
            v = _get(args, f)
            if isinstance(v, bool) or (name == K.OPTIM and v is not None):
                knobs[name], fields[name] = (v if isinstance(v, bool) else str(getattr(v, "value", v))), f
                break
    for f in K.spec(K.ACTIVATION_OFFLOAD).fields:
        kw = _get(args, f, _ABSENT)
        if kw is not _ABSENT:  # None (the default) or a dict
            knobs[K.ACTIVATION_OFFLOAD] = isinstance(kw, dict) and bool(kw.get("offload"))
            fields[K.ACTIVATION_OFFLOAD] = FIELD_OFFLOAD
            break
    if not knobs:  # no training recipe on this object: no allocator knob to report either
        return
    name, conf = alloc_conf_in_env(os.environ)
    knobs[K.EXPANDABLE_SEGMENTS], fields[K.EXPANDABLE_SEGMENTS] = expandable_in(conf), f"env:{name}"


def alloc_conf_in_env(environ: Mapping[str, str]) -> tuple[str, str]:
    """(the variable torch reads, its value): ``PYTORCH_ALLOC_CONF`` when set, else ``PYTORCH_CUDA_ALLOC_CONF``."""
    name, conf = K.alloc_conf_in(environ)
    return name or K.ALLOC_CONF_ENVS[-1], conf


def expandable_in(conf: str) -> bool:
    """What ``expandable_segments`` an allocator config asks for (the last mention wins; torch's default: off)."""
    on = False
    for part in (conf or "").split(","):
        key, _, value = part.partition(":")
        if key.strip() == K.EXPANDABLE_SEGMENTS:
            on = value.strip().lower() == "true"
    return on


# --- in force -------------------------------------------------------------------------------
def in_force(model: Any, optimizer: Any, args: Any, knobs: dict[str, Any], fields: dict[str, str]) -> None:
    """At train begin, over what the arguments said: the live model, optimizer and allocator."""
    for read in (_checkpointing, _optimizer, _allocator):
        try:
            read(model, optimizer, args, knobs, fields)
        except Exception:
            continue


def _checkpointing(model: Any, optimizer: Any, args: Any, knobs: dict[str, Any], fields: dict[str, str]) -> None:
    on, offload = layers_checkpointing(model)
    if on is not None:
        knobs[K.GRADIENT_CHECKPOINTING], fields[K.GRADIENT_CHECKPOINTING] = on, FIELD_MODEL
        knobs[K.ACTIVATION_OFFLOAD], fields[K.ACTIVATION_OFFLOAD] = bool(offload), FIELD_MODEL


def layers_checkpointing(model: Any) -> tuple[bool | None, bool | None]:
    """(a module with ``gradient_checkpointing`` on, whether its checkpoint function offloads to the host);
    (None, None) when no module has the flag (not a transformers model)."""
    modules = _get(model, "modules")
    if not callable(modules):
        return None, None
    seen = False
    for module in modules():
        flag = _get(module, "gradient_checkpointing")
        if not isinstance(flag, bool):
            continue
        seen = True
        if flag:
            return True, offloads(_get(module, "_gradient_checkpointing_func"))
    return (False, False) if seen else (None, None)


def offloads(func: Any) -> bool:
    """A checkpoint function that enters ``save_on_cpu`` (transformers >= 5.24 builds ``partial(checkpoint_func)``
    around a local function that does): read from the code's names."""
    inner = _get(func, "func", func)
    code = _get(inner, "__code__")
    return bool(code is not None and "save_on_cpu" in code.co_names)


def _inner(optimizer: Any) -> Any:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    for _ in range(3):
        inner = _get(optimizer, "optimizer")
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def describe(optimizer: Any) -> dict[str, Any]:
    opt = _inner(optimizer)
    cls = type(opt)
    bits = _get(_get(opt, "args"), "optim_bits")
    return {"module": cls.__module__, "class": cls.__name__, "bits": bits, "paged": _get(opt, "is_paged")}


def optimizer_matches(name: str, desc: Mapping[str, Any]) -> bool | None:
    """Whether the optimizer ``desc`` is what transformers builds for ``optim=name``; None: a name whose
    class this check does not know (reported as the arguments say). Pure."""
    bnb = str(desc.get("module", "")).startswith("bitsandbytes")
    if name in ("adamw_torch", "adamw_torch_fused"):
        return str(desc.get("module", "")).startswith("torch.optim") and desc.get("class") == "AdamW"
    family = next((f for f in ("ademamix", "adamw", "lion", "rmsprop") if f in name), None)
    if family is None or not ("bnb" in name or "bit" in name or name.startswith("paged_")):
        return None
    bits = 8 if "8bit" in name else 32
    # transformers builds bitsandbytes' AdamW(optim_bits=, is_paged=); its aliases PagedAdamW8bit... say the same
    cls = str(desc.get("class", "")).lower().replace("paged", "").replace("8bit", "").replace("32bit", "")
    return (bnb and cls == family and desc.get("bits") == bits
            and bool(desc.get("paged")) == name.startswith("paged_"))


def _optimizer(model: Any, optimizer: Any, args: Any, knobs: dict[str, Any], fields: dict[str, str]) -> None:
    if optimizer is None or K.OPTIM not in knobs:
        return
    desc = describe(optimizer)
    ok = optimizer_matches(str(knobs[K.OPTIM]), desc)
    if ok is False:  # the child runs something else: say what, so the verdict shows it
        paged = ", paged" if desc["paged"] else ""
        bits = f" {desc['bits']}-bit" if desc["bits"] else ""
        knobs[K.OPTIM] = f"{desc['module']}.{desc['class']}{bits}{paged}"
    if ok is not None:
        fields[K.OPTIM] = FIELD_OPTIMIZER_CLASS


def _allocator(model: Any, optimizer: Any, args: Any, knobs: dict[str, Any], fields: dict[str, str]) -> None:
    on = allocator_expandable()
    if on is not None:
        knobs[K.EXPANDABLE_SEGMENTS], fields[K.EXPANDABLE_SEGMENTS] = on, FIELD_ALLOCATOR


def allocator_expandable() -> bool | None:
    """Whether CUDA's caching allocator runs expandable segments (its snapshot's segments say), or None:
    no CUDA in use yet, or no segment to tell."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    segments = torch.cuda.memory_snapshot()
    flags = [s.get("is_expandable") for s in segments if isinstance(s, dict) and "is_expandable" in s]
    return any(flags) if flags else None


# --- a foreign optimizer state ---------------------------------------------------------------
def foreign_state(optimizer: Any) -> str | None:
    """Why the loaded state of ``optimizer`` was written by another optimizer (None: it fits, or is empty)."""
    opt = _inner(optimizer)
    state = _get(opt, "state")
    if not state:
        return None
    desc = describe(opt)
    bnb = str(desc["module"]).startswith("bitsandbytes")
    min_8bit = _get(_get(opt, "args"), "min_8bit_size", 4096)
    for param, entry in list(state.items()):
        keys = set(entry) if isinstance(entry, dict) else set()
        if bnb and "state1" not in keys:
            return f"its entries hold {sorted(keys)}, not bitsandbytes' state1/state2"
        if not bnb and ("state1" in keys or _BNB_QUANT_STATE in keys):
            return "its entries are bitsandbytes state (state1/state2)"
        if bnb and desc["bits"] in (8, 32):
            dtype = str(_get(entry.get("state1"), "dtype", ""))
            wide = _get(param, "numel", lambda: 0)() >= min_8bit
            if desc["bits"] == 8 and wide and dtype != "torch.uint8":
                return f"a {dtype} state1 in an 8-bit optimizer (a 32-bit state: it would keep running 32-bit)"
            if desc["bits"] == 32 and dtype == "torch.uint8":
                return "an 8-bit state1 in a 32-bit optimizer"
    return None


def reset_foreign_state(optimizer: Any) -> str | None:
    """Drop a loaded state another optimizer wrote (fresh moments from here; param groups, LR and the schedule
    stay); returns what was reset and why, or None when the state fits."""
    why = foreign_state(optimizer)
    if why is None:
        return None
    opt = _inner(optimizer)
    n = len(opt.state)
    opt.state.clear()
    desc = describe(opt)
    return (f"the checkpoint's optimizer state does not fit {desc['module']}.{desc['class']} ({why}): "
            f"the moments of {n} parameters were reset; the learning-rate schedule continues")
