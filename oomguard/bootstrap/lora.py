"""``lora_r`` / ``lora_alpha`` onto every ``peft.LoraConfig`` the child builds.

TRL's ``get_peft_config(model_args)``, a script's ``LoraConfig(r=16, ...)`` and a trainer's
``peft_config=`` argument all construct a ``LoraConfig``: patching its ``__post_init__``
reaches each of them. A config *loaded* from a checkpoint (``PeftConfig.from_pretrained``,
``model.load_adapter`` on resume) describes weights already on disk and is left as saved.
"""

from __future__ import annotations

import contextvars
import functools
from types import ModuleType
from typing import Any, Callable, Mapping

from oomguard import knobs as registry
from oomguard.bootstrap.knobs import BY_COMMAND, LORA_KNOBS, Via

__all__ = ["apply_lora", "lora_values", "patch_lora_config", "patch_peft_config", "PATCHED"]

_loading = contextvars.ContextVar("oomguard_peft_loading", default=False)
PATCHED = "_oomguard_patched"


def lora_values(config: Any, orders: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Field -> (old, new) for the LoRA knobs oomguard orders. Pure."""
    out = {}
    for knob in LORA_KNOBS:
        field = registry.spec(knob).peft_field
        if knob in orders and field and hasattr(config, field):
            old = getattr(config, field)
            out[field] = (old, type(old)(orders[knob]) if isinstance(old, (int, float)) else orders[knob])
    return out


def apply_lora(config: Any, orders: Mapping[str, Any], delivered: Mapping[str, str]) -> dict[str, Any] | None:
    """Set the ordered r / lora_alpha on ``config``; the event fields, or None when nothing is ordered."""
    values = lora_values(config, orders)
    if not values:
        return None
    for field, (_old, new) in values.items():
        setattr(config, field, new)
    changed = any(old != new for old, new in values.values())
    by_flag = any(delivered.get(k) in BY_COMMAND for k in LORA_KNOBS)
    how = Via.IN_PROCESS if changed else Via.FLAG if by_flag else Via.UNCHANGED
    return {"config": type(config).__name__, "via": how.value,
            **{field: {"old": old, "new": new} for field, (old, new) in values.items()}}


def patch_peft_config(module: ModuleType) -> None:
    """Mark loads in ``peft.config`` so that ``on_built`` sees only configs the child builds."""
    mixin = getattr(module, "PeftConfigMixin", None)
    if mixin is None or mixin.__dict__.get(PATCHED):
        return
    original = mixin.__dict__["from_peft_type"].__func__

    @functools.wraps(original)
    def from_peft_type(cls, **kwargs):
        token = _loading.set(True)
        try:
            return original(cls, **kwargs)
        finally:
            _loading.reset(token)

    mixin.from_peft_type = classmethod(from_peft_type)
    setattr(mixin, PATCHED, True)


def patch_lora_config(module: ModuleType, on_built: Callable[[Any], None]) -> None:
    """Run ``on_built(config)`` at the end of every ``LoraConfig.__post_init__`` outside a load."""
    cls = getattr(module, "LoraConfig", None)
    if cls is None or cls.__dict__.get(PATCHED):  # own dict: PeftConfigMixin carries the mark too
        return
    original = cls.__post_init__

    @functools.wraps(original)
    def __post_init__(self):
        original(self)
        if not _loading.get():
            on_built(self)

    cls.__post_init__ = __post_init__
    setattr(cls, PATCHED, True)
