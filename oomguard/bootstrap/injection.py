"""Wire the bootstrap into a child: post-import hooks on transformers and peft.

:func:`install` runs from ``sitecustomize`` and only registers hooks (stdlib); the guard,
torch and transformers are touched only when the child itself imports them.
"""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType
from typing import Any

from oomguard.bootstrap.imports import when_imported
from oomguard.bootstrap.switches import Part, Switches

# Processes that only start workers: they must not create a CUDA context (VRAM cap) themselves.
LAUNCHER_NAMES = ("accelerate", "torchrun", "trl", "deepspeed")
LAUNCHER_SUFFIXES = ("torch/distributed/run.py", "accelerate/commands/launch.py", "trl/cli/main.py",
                     "trl/cli/__main__.py")

__all__ = ["LAUNCHER_NAMES", "context", "install", "installed", "is_launcher", "lora_built"]

_context = None
_installed = False


def context():
    """The per-process Context, built on first use (after torch is already imported)."""
    global _context
    if _context is None:
        from oomguard.bootstrap.context import Context

        _context = Context()
    return _context


def install(switches: Switches | None = None) -> bool:
    """Register the hooks when running under oomguard with the bootstrap on; True if they are in place.

    Idempotent: ``sitecustomize`` calls it at start-up; a program started without the bootstrap on its
    ``PYTHONPATH`` (the built-in recipe run by hand with ``OOMGUARD_*`` set) may call it again first thing.
    """
    global _installed
    if _installed:
        return True
    switches = switches or Switches.from_env()
    if not switches.patching:
        return False
    _installed = True
    from oomguard.bootstrap.fast_exit import exit_fast_after_uncaught

    exit_fast_after_uncaught(is_launcher)  # a launcher whose worker failed: the quick exit (fast_exit.py)
    when_imported("transformers.trainer", _on_trainer_module)
    when_imported("transformers.modeling_utils", _on_modeling_utils)
    when_imported("peft.config", _on_peft_config)
    when_imported("peft.tuners.lora.config", _on_lora_config)
    return True


def installed() -> bool:
    """True once :func:`install` registered the hooks in this process."""
    return _installed


def _on_trainer_module(module: ModuleType) -> None:
    from oomguard.bootstrap.trainer import patch_trainer

    patch_trainer(module, context)


def _on_modeling_utils(module: ModuleType) -> None:
    """Allocator defaults and the VRAM cap when the first model is constructed (before its
    weights reach the GPU), not at import: that runs inside transformers' own imports."""
    cls = getattr(module, "PreTrainedModel", None)
    if cls is None or cls.__dict__.get("_oomguard_patched"):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        _cap_vram_once()
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    cls._oomguard_patched = True


_vram_done = False


def _cap_vram_once() -> None:
    global _vram_done
    if _vram_done:
        return
    _vram_done = True
    ctx = context()
    if not ctx.on(Part.VRAM) or is_launcher(sys.argv):
        return
    from oomguard.guard import apply_allocator_defaults, apply_vram_limit

    apply_allocator_defaults()
    if ctx.env.vram_limit is not None:
        apply_vram_limit(ctx.env.vram_limit, device=int(os.environ.get("LOCAL_RANK", "0") or 0),
                         run_dir=ctx.env.run_dir, rank=ctx.env.rank)


def _on_peft_config(module: ModuleType) -> None:
    from oomguard.bootstrap.lora import patch_peft_config

    patch_peft_config(module)


def _on_lora_config(module: ModuleType) -> None:
    if not Switches.from_env().on(Part.LORA):  # not context(): peft is still importing
        return
    from oomguard.bootstrap.lora import patch_lora_config

    patch_lora_config(module, lambda config: lora_built(context(), config))


def lora_built(ctx, config: Any) -> None:
    """Apply the LoRA knobs to a config the child built; journal it (rank 0)."""
    from oomguard.bootstrap.lora import apply_lora

    if not ctx.first_sight(config):
        return  # the same object again (TRL's peft_config= after its __post_init__)
    done = apply_lora(config, ctx.env.knobs, ctx.delivered)
    if done is None:
        return
    ctx.lora.append(done)
    ctx.journal.emit("bootstrap_lora", **done)


def is_launcher(argv: list[str]) -> bool:
    """True in ``accelerate launch`` / ``torchrun`` / ``trl`` parents, which only spawn workers."""
    first = (argv or [""])[0].replace("\\", "/")
    return os.path.basename(first) in LAUNCHER_NAMES or first.endswith(LAUNCHER_SUFFIXES)
