"""The child's allocator config: the ``expandable_segments`` knob, delivered through the environment. Pure.

torch reads ``PYTORCH_ALLOC_CONF`` (>= 2.9), else ``PYTORCH_CUDA_ALLOC_CONF``, once, when CUDA's caching
allocator starts: only the supervisor, before the child imports torch, can set it. The rules:
- no order (attempt 1, or a rung on another knob): the user's config stands as written; where the user set
  neither variable, ``expandable_segments:True`` (DESIGN §6: a fragmentation OOM became a success);
- an ``expandable_segments`` order: merged into the variable torch will read; the user's other options
  (``max_split_size_mb``, ``garbage_collection_threshold``...) kept in their order; a user's explicit
  ``expandable_segments:False`` is turned over and the note says so.
Whether it took is verified in the child (``guard/free_rungs.allocator_expandable``), not assumed here:
the ``cudaMallocAsync`` backend, for one, has no expandable segments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from oomguard.knobs import ALLOC_CONF_ENVS, EXPANDABLE_SEGMENTS, alloc_conf_in

__all__ = ["AllocEnv", "DEFAULT_CONF", "alloc_env", "merge_option"]

DEFAULT_CONF = f"{EXPANDABLE_SEGMENTS}:True"
_CUDA_VAR = ALLOC_CONF_ENVS[-1]  # PYTORCH_CUDA_ALLOC_CONF, what every torch version reads


@dataclasses.dataclass(frozen=True)
class AllocEnv:
    """What to set in the child's env (``updates``) and, when it changes a config the user wrote, why (``note``)."""

    updates: dict[str, str]
    note: str = ""


def merge_option(conf: str, key: str, value: str) -> tuple[str, str | None]:
    """``conf`` with ``key:value`` (replacing every earlier ``key``, the rest kept in order) and the value the
    user had for ``key`` (None: not set)."""
    parts = [p.strip() for p in conf.split(",") if p.strip()]
    old = None
    kept = []
    for part in parts:
        k, _, v = part.partition(":")
        if k.strip() == key:
            old = v.strip()
            continue
        kept.append(part)
    return ",".join([*kept, f"{key}:{value}"]), old


def alloc_env(env: Mapping[str, str], orders: Mapping[str, Any]) -> AllocEnv:
    """The allocator variables for one attempt's child, from the supervisor's env and the attempt's orders.

    The one call in ``supervisor/attempt.child_env`` (in place of its ``setdefault``)::

        env.update(alloc_env(env, attempt.orders).updates)
    """
    name, conf = alloc_conf_in(env)
    if EXPANDABLE_SEGMENTS not in orders:
        return AllocEnv({} if name is not None else {_CUDA_VAR: DEFAULT_CONF})
    want = "True" if orders[EXPANDABLE_SEGMENTS] is True else "False"
    merged, old = merge_option(conf, EXPANDABLE_SEGMENTS, want)
    target = name or _CUDA_VAR
    note = ""
    if name is not None and old is not None and old.lower() != want.lower():
        note = (f"the user's {target}={conf!r} says {EXPANDABLE_SEGMENTS}:{old}; this attempt runs "
                f"{target}={merged!r} (the cuda_oom rung {EXPANDABLE_SEGMENTS} → {want.lower()}); the user's "
                "other allocator options are kept")
    elif name is not None and conf.strip():
        note = f"{EXPANDABLE_SEGMENTS}:{want} added to the user's {target}={conf!r}: {target}={merged!r}"
    return AllocEnv({target: merged}, note)
