"""A checkpoint's LoRA adapter cut to the live model's rank (DESIGN §5 "resume with transform").

:func:`lora_change` tells whether the checkpoint's adapter differs from the model's (rank or alpha);
:func:`apply_cut` writes the cut adapter (truncated SVD, :mod:`oomguard.guard.resume.lora_cut`) into
the resume copy and drops the optimizer state of the cut tensors (Adam moments cannot change rank;
the LR schedule and step count continue).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from oomguard.guard.resume.lora_cut import AdapterCut, LoraCutError, cut_adapter
from oomguard.guard.writer import EventWriter

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "OPTIMIZER", "apply_cut", "lora_change", "replace_file"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.pt"


def replace_file(path: Path, write) -> None:
    """Write a new file at ``path``: unlink first, so a hard link to the original stays untouched."""
    path.unlink(missing_ok=True)
    write(path)


def lora_change(model, checkpoint: Path) -> dict[str, Any] | None:
    """{from, to} LoRA settings when the checkpoint's adapter differs from the model's; else None."""
    config_file = checkpoint / ADAPTER_CONFIG
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config or not config_file.is_file():
        return None
    adapter = getattr(model, "active_adapter", None)
    adapter = adapter if isinstance(adapter, str) and adapter in peft_config else next(iter(peft_config))
    want = peft_config[adapter]
    have = json.loads(config_file.read_text())
    if (have.get("r"), float(have.get("lora_alpha", 0))) == (want.r, float(want.lora_alpha)):
        return None
    if have.get("rank_pattern") or have.get("alpha_pattern"):
        raise LoraCutError(f"{config_file} uses rank_pattern/alpha_pattern; the rank cut needs one r for "
                           "every layer: drop the lora_r rung from the policy for this adapter")
    return {"config": have, "rank": int(have["r"]), "alpha": float(have["lora_alpha"]),
            "new_rank": int(want.r), "new_alpha": float(want.lora_alpha),
            "use_rslora": bool(have.get("use_rslora", False))}


def apply_cut(source: Path, target: Path, lora: dict[str, Any], journal: EventWriter) -> None:
    """Cut ``source``'s adapter as ``lora`` says into ``target`` (a copy of it); journal ``lora_rank_cut``."""
    from safetensors.torch import load_file, save_file

    weights = source / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LoraCutError(f"{source} has no {ADAPTER_WEIGHTS}; the rank cut reads safetensors adapters only: "
                           "save with safe_serialization=True")
    cut = cut_adapter(load_file(str(weights)), rank=lora["rank"], alpha=lora["alpha"],
                      new_rank=lora["new_rank"], new_alpha=lora["new_alpha"], use_rslora=lora["use_rslora"])
    replace_file(target / ADAPTER_WEIGHTS, lambda p: save_file(cut.state, str(p), metadata={"format": "pt"}))
    config = {**lora["config"], "r": lora["new_rank"], "lora_alpha": lora["new_alpha"]}
    replace_file(target / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))
    optimizer = _reset_optimizer_state(source, target, cut)
    journal.emit("lora_rank_cut", checkpoint=str(source), copy=str(target),
                 lora_r=[lora["rank"], lora["new_rank"]], lora_alpha=[lora["alpha"], lora["new_alpha"]],
                 total_relative_error=round(cut.total_relative_error, 6),
                 per_layer={k: round(v, 6) for k, v in cut.per_layer().items()}, optimizer=optimizer)


def _reset_optimizer_state(source: Path, target: Path, cut: AdapterCut) -> dict[str, Any]:
    """Drop the optimizer state of the cut tensors (Adam moments cannot change rank); keep the rest.

    The checkpoint's state is indexed by parameter order, not name; a cut tensor is recognised by
    its old shape. An uncut tensor of the same shape is reset too: a reset is safe, wrong moments are not.
    """
    path = source / OPTIMIZER
    if not path.is_file():
        return {"reset": 0, "kept": 0, "note": f"no {OPTIMIZER} in the checkpoint"}
    state = torch.load(path, map_location="cpu", weights_only=True)
    old = set(cut.old_shapes.values())
    dropped = [k for k, v in state.get("state", {}).items() if any(s in old for s in _shapes(v))]
    for k in dropped:
        del state["state"][k]
    replace_file(target / OPTIMIZER, lambda p: torch.save(state, p))
    return {"reset": len(dropped), "kept": len(state["state"]),
            "note": "Adam moments restart for the cut tensors; the LR schedule and step count continue"}


def _shapes(value: Any) -> Iterator[tuple[int, ...]]:
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        yield tuple(value.shape)
    elif isinstance(value, dict):  # bitsandbytes nests its moments one level down
        for v in value.values():
            yield from _shapes(v)
