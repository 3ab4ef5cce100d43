"""PyTorch caching-allocator defaults for the child, set before CUDA initialises."""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

__all__ = ["ALLOC_CONF", "ALLOC_CONF_NEW", "apply_allocator_defaults", "DEFAULT_ALLOC_CONF"]

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_CONF_NEW = "PYTORCH_ALLOC_CONF"  # torch >= 2.9 reads this name first
# expandable_segments turned a fragmentation OOM (3 GiB stuck in inactive_split) into a success (DESIGN §6).
DEFAULT_ALLOC_CONF = "expandable_segments:True"


def apply_allocator_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the user set either name.

    The allocator reads it once, when CUDA initialises: call this before the model loads.
    """
    if environ.get(ALLOC_CONF) or environ.get(ALLOC_CONF_NEW):
        return
    environ[ALLOC_CONF] = DEFAULT_ALLOC_CONF
    torch = sys.modules.get("torch")  # never import torch just to ask
    if environ is os.environ and torch is not None and torch.cuda.is_initialized():
        from oomguard.guard.notices import warn_once

        warn_once("alloc_conf_late", f"oomguard: {ALLOC_CONF} was set after CUDA initialised and has no effect "
                  "this run; call apply_allocator_defaults() before the model is created", stacklevel=2)
