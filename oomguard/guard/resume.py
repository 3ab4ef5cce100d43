"""Resume preparation: make a checkpoint loadable by a trainer whose knobs changed (DESIGN §5, §7).

Entry point: :func:`prepare_resume` — ``guarded_train`` calls it just before ``trainer.train``;
a bootstrap that injects the guard into any HF ``Trainer`` should call it the same way:

    resume = prepare_resume(trainer, checkpoint, env)   # may return a different path
    trainer.train(resume_from_checkpoint=resume)

What it does, the changes recorded as journal events:
- under oomguard (a run dir), installs the sample ledger (:mod:`ledger`), on fresh runs too;
- the effective batch changed: the data continues at the exact next sample (:mod:`position`);
- ``max_length`` changed with packing on: the examples seen are mapped to the re-packed rows and the
  unseen ones trained first (:mod:`position`); where that cannot be done, an event says so;
- keeps the trainable parameters' dtype across the adapter load (PEFT upcasts bf16 to fp32);
- ``lora_r``/``lora_alpha`` changed: the adapter is cut by truncated SVD (:mod:`lora_cut`), the
  optimizer state of the cut tensors is reset (entries dropped; the LR schedule is kept);
- the GradScaler state of an fp16 checkpoint when this attempt is not fp16 (HF crashes on it);
- bf16 asked on a GPU without it (compute capability < 8.0): refused, naming the card;
- the previous attempt died of ``resume_oom``: the optimizer state is loaded to CPU first.
The original checkpoint is never modified: changes go to a copy (unchanged files hard-linked)
under ``<run_dir>/resume/`` (or ``<checkpoints>/.oomguard-resume/`` outside oomguard).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from oomguard import protocol
from oomguard.guard.env import GuardEnv
from oomguard.guard.journal import Journal
from oomguard.guard.ledger import install_ledger
from oomguard.guard.lora_cut import AdapterCut, LoraCutError, cut_adapter
from oomguard.guard.position import apply_packed_position, apply_position, state_packed_length_change

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
SCALER = "scaler.pt"
RESUME_DIR = "resume"  # under the run dir: the converted copies, one per attempt and rank


class PrecisionError(RuntimeError):
    """The precision asked for cannot run on this device."""


def bf16_refusal(bf16: bool, card: str | None, capability: tuple[int, int] | None) -> str | None:
    """Why bf16 cannot run on ``card`` (None: it can, or no GPU is in use). Pure."""
    if not bf16 or capability is None or tuple(capability) >= (8, 0):
        return None
    return (f"bf16 was asked for, but the GPU {card!r} has compute capability {capability[0]}.{capability[1]} "
            "and bf16 needs 8.0 or newer (Ampere+); train in fp16 or fp32 instead (an oomguard policy for this "
            "card should say capabilities: {bf16: false}, so its bf16 rungs are skipped)")


def check_precision(args) -> None:
    """Raise PrecisionError when ``args.bf16`` is set on a CUDA GPU without bf16."""
    if not getattr(args, "bf16", False) or getattr(args, "use_cpu", False) or not torch.cuda.is_available():
        return
    index = torch.cuda.current_device()
    why = bf16_refusal(True, torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))
    if why:
        raise PrecisionError(why)


def prepare_resume(trainer, checkpoint: str | None, env: GuardEnv) -> str | None:
    """The checkpoint ``trainer.train`` should resume from (``checkpoint`` itself or a converted copy).

    Raises PrecisionError or LoraCutError (the message says what and how to fix it).
    """
    check_precision(trainer.args)
    if env.run_dir is not None and not getattr(trainer, "_oomguard_ledger", None):
        trainer._oomguard_ledger = install_ledger(trainer, env.run_dir, rank=env.rank, attempt=env.attempt)
    if not checkpoint:
        return None
    _keep_trainable_dtypes(trainer)
    journal = Journal(env.run_dir, env.rank)
    source = Path(checkpoint)
    if _previous_failure(env) == protocol.FailureKind.RESUME_OOM.value:
        _load_optimizer_on_cpu_first(trainer)
        journal.emit("resume_cpu_first", checkpoint=str(source),
                     detail="the last attempt ran out of memory loading this checkpoint: optimizer state "
                            "is loaded to CPU first, then moved to the device tensor by tensor")
    ledger = getattr(trainer, "_oomguard_ledger", None)
    if ledger is not None:  # a re-packed dataset is mapped by examples; otherwise by rows
        if not apply_packed_position(trainer, ledger, source, env.run_dir, env.rank, journal):
            apply_position(trainer, ledger, source, env.run_dir, env.rank, journal)
    else:
        state_packed_length_change(trainer, source, journal, reason="no sample ledger (no run dir)")
    lora = _lora_change(trainer.model, source)
    drop_scaler = (source / SCALER).is_file() and not getattr(trainer.args, "fp16", False)
    if lora is None and not drop_scaler:
        return checkpoint
    target = _resume_copy(source, env, skip={SCALER} if drop_scaler else set())
    if drop_scaler:
        journal.emit("scaler_dropped", checkpoint=str(source), copy=str(target),
                     detail=f"{SCALER} is fp16 GradScaler state; this attempt is not fp16, so the copy has none")
    if lora is not None:
        _apply_cut(source, target, lora, journal)
    return str(target)


# --- the copy ---------------------------------------------------------------------------
def _resume_copy(source: Path, env: GuardEnv, *, skip: set[str]) -> Path:
    """A fresh copy of ``source`` without ``skip``; files hard-linked where possible (read-only use)."""
    if env.run_dir is not None:
        base = env.run_dir / RESUME_DIR / f"attempt-{env.attempt:03d}-rank{env.rank}"
    else:
        base = source.parent / ".oomguard-resume" / f"attempt-{env.attempt:03d}-rank{env.rank}"
    target = base / source.name
    if target.exists():
        shutil.rmtree(target)  # our own leftover from this attempt number, never a user's checkpoint
    shutil.copytree(source, target, copy_function=_link_or_copy,
                    ignore=lambda d, names: [n for n in names if Path(d) == source and n in skip])
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace(path: Path, write) -> None:
    """Write a new file at ``path``: unlink first, so a hard link to the original stays untouched."""
    path.unlink(missing_ok=True)
    write(path)


# --- LoRA rank cut ---------------------------------------------------------------------
def _lora_change(model, checkpoint: Path) -> dict[str, Any] | None:
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


def _apply_cut(source: Path, target: Path, lora: dict[str, Any], journal: Journal) -> None:
    from safetensors.torch import load_file, save_file

    weights = source / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LoraCutError(f"{source} has no {ADAPTER_WEIGHTS}; the rank cut reads safetensors adapters only: "
                           "save with safe_serialization=True")
    cut = cut_adapter(load_file(str(weights)), rank=lora["rank"], alpha=lora["alpha"],
                      new_rank=lora["new_rank"], new_alpha=lora["new_alpha"], use_rslora=lora["use_rslora"])
    _replace(target / ADAPTER_WEIGHTS, lambda p: save_file(cut.state, str(p), metadata={"format": "pt"}))
    config = {**lora["config"], "r": lora["new_rank"], "lora_alpha": lora["new_alpha"]}
    _replace(target / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2)))
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
    _replace(target / OPTIMIZER, lambda p: torch.save(state, p))
    return {"reset": len(dropped), "kept": len(state["state"]),
            "note": "Adam moments restart for the cut tensors; the LR schedule and step count continue"}


def _shapes(value: Any) -> Iterator[tuple[int, ...]]:
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        yield tuple(value.shape)
    elif isinstance(value, dict):  # bitsandbytes nests its moments one level down
        for v in value.values():
            yield from _shapes(v)


# --- the adapter's dtype ----------------------------------------------------------------
def _keep_trainable_dtypes(trainer) -> None:
    """Wrap ``trainer._load_from_checkpoint`` so trainable parameters keep the dtype they had.

    PEFT's ``load_adapter`` upcasts a bf16/fp16 adapter to fp32 (``autocast_adapter_dtype``), so a
    resumed run would train in another dtype than the run it continues (checked: the recipe's
    bf16 adapter came back fp32 after a resume, peft 0.21).
    """
    original = trainer._load_from_checkpoint

    def load(checkpoint, *args, **kwargs):
        dtypes = {name: p.dtype for name, p in trainer.model.named_parameters() if p.requires_grad}
        result = original(checkpoint, *args, **kwargs)
        for name, p in trainer.model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])
        return result

    trainer._load_from_checkpoint = load


# --- resume_oom: optimizer state to CPU first ------------------------------------------------
def _previous_failure(env: GuardEnv) -> str | None:
    """The failure kind the previous attempt's child recorded (rank 0's, the root cause), or None."""
    if env.run_dir is None or env.attempt <= 1:
        return None
    error = env.run_dir / protocol.ATTEMPTS_DIR / f"{env.attempt - 1:03d}" / protocol.ERROR_JSON
    records = protocol.read_error_records(error)
    return records[0].kind.value if records else None


def _load_optimizer_on_cpu_first(trainer) -> None:
    """Wrap ``trainer._load_optimizer_and_scheduler`` so every ``torch.load`` inside maps to CPU.

    ``optimizer.load_state_dict`` then moves each tensor to its parameter's device one at a time:
    the device never holds the whole serialized state next to the live one (the load spike).
    """
    original = trainer._load_optimizer_and_scheduler

    def load(checkpoint):
        from oomguard.guard.recorder import free_cuda_memory

        free_cuda_memory()
        with _torch_load_on_cpu():
            return original(checkpoint)

    trainer._load_optimizer_and_scheduler = load


@contextlib.contextmanager
def _torch_load_on_cpu() -> Iterator[None]:
    real = torch.load

    def on_cpu(f, map_location=None, *args, **kwargs):
        return real(f, "cpu", *args, **kwargs)

    torch.load = on_cpu
    try:
        yield
    finally:
        torch.load = real
