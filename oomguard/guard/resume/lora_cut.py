"""The LoRA rank cut: a rank-r adapter to rank r' by truncated SVD, on state dicts (no model).

PEFT has no resize API (DESIGN §7). For each LoRA pair the learned update is
ΔW = s·B·A with s = α/r (α/√r under rsLoRA), B: (out, r), A: (r, in). Its best
rank-r' approximation in Frobenius norm is the truncated SVD U_r'·S_r'·V_r'ᵀ
(Eckart–Young), and its error is exactly the norm of the dropped singular values.
The new pair carries the new scaling s' = α'/r': B' = U·√(S/s'), A' = √(S/s')·Vᵀ,
so s'·B'·A' equals the truncated ΔW and both factors share the magnitude evenly.

ΔW is never formed: with B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), ΔW = s·Q_B·(R_B·R_Aᵀ)·Q_Aᵀ,
so the SVD of the r×r core gives ΔW's — exact, and cheap next to a (4096×4096) SVD.
All arithmetic is float64; results are cast back to the adapter's dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch

__all__ = ["AdapterCut", "cut_adapter", "cut_pair", "find_pairs", "lora_scaling", "LoraCutError", "PairCut"]

# PEFT's saved key for a LoRA factor, adapter name already stripped:
# "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
_FACTOR_RE = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED = ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


class LoraCutError(ValueError):
    """The adapter cannot be cut as asked; the message names the tensor or setting and the fix."""


@dataclass(frozen=True)
class PairCut:
    """One LoRA pair after the cut. Errors are relative Frobenius norms (0.0–1.0)."""

    name: str  # the module prefix, e.g. "base_model.model.model.layers.0.self_attn.q_proj"
    a: torch.Tensor  # (r', in)
    b: torch.Tensor  # (out, r')
    singular_values: torch.Tensor  # float64, all min(r, out, in) of ΔW, descending
    kept: int  # r'
    norm: float  # ||ΔW||_F
    error: float  # ||ΔW - ΔW'||_F (absolute)

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclass(frozen=True)
class AdapterCut:
    """The whole adapter after the cut: the new state dict and what was lost, per layer and total."""

    state: dict[str, torch.Tensor]
    pairs: tuple[PairCut, ...]
    old_shapes: dict[str, tuple[int, ...]]  # the cut tensors' shapes before, by key

    @property
    def total_relative_error(self) -> float:
        """||all dropped||_F / ||all ΔW||_F over every pair (layers weighted by their size)."""
        norm2 = sum(p.norm ** 2 for p in self.pairs)
        err2 = sum(p.error ** 2 for p in self.pairs)
        return math.sqrt(err2 / norm2) if norm2 > 0 else 0.0

    def per_layer(self) -> dict[str, float]:
        return {p.name: p.relative_error for p in self.pairs}


def lora_scaling(alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """PEFT's scale of B·A: α/r, or α/√r under rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def cut_pair(name: str, a: torch.Tensor, b: torch.Tensor, *, scale: float, new_rank: int,
             new_scale: float) -> PairCut:
    """Cut one pair (A: (r, in), B: (out, r)) with scalings ``scale`` → ``new_scale``."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise LoraCutError(f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a 2-D pair "
                           "(r, in) and (out, r); only Linear LoRA layers can be cut")
    r = a.shape[0]
    if not 1 <= new_rank <= r:
        raise LoraCutError(f"{name}: cannot cut rank {r} to {new_rank}; the new rank must be 1..{r} "
                           "(a rank cut only goes down)")
    u, s, vh = _svd_of_product(b.double() * scale, a.double())
    keep = min(new_rank, s.numel())
    root = torch.sqrt(s[:keep] / new_scale)
    new_b = torch.zeros(b.shape[0], new_rank, dtype=torch.float64)
    new_a = torch.zeros(new_rank, a.shape[1], dtype=torch.float64)
    new_b[:, :keep] = u[:, :keep] * root
    new_a[:keep] = root[:, None] * vh[:keep]
    # rows past min(out, in) stay zero: nothing of ΔW is left to put there
    return PairCut(name=name, a=new_a.to(a.dtype), b=new_b.to(b.dtype), singular_values=s, kept=new_rank,
                   norm=float(torch.linalg.vector_norm(s)), error=float(torch.linalg.vector_norm(s[keep:])))


def _svd_of_product(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SVD of left @ right (out, r) @ (r, in) through thin QRs of both factors; float64."""
    q_left, r_left = torch.linalg.qr(left)  # (out, k), (k, r)
    q_right, r_right = torch.linalg.qr(right.T)  # (in, k'), (k', r)
    u_core, s, vh_core = torch.linalg.svd(r_left @ r_right.T)
    return q_left @ u_core, s, vh_core @ q_right.T


def find_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """module prefix → (lora_A key, lora_B key). Raises on a half pair or a LoRA variant we cannot cut."""
    odd = sorted(k for k in state if any(f".{u}" in k for u in _UNSUPPORTED))
    if odd:
        raise LoraCutError(f"the adapter holds {odd[0]} (DoRA or embedding LoRA); the SVD cut handles plain "
                           "Linear LoRA only: drop the lora_r rung from the policy for this adapter")
    halves: dict[str, dict[str, str]] = {}
    for key in state:
        m = _FACTOR_RE.match(key)
        if m:
            halves.setdefault(m["prefix"], {})[m["which"]] = key
    broken = sorted(p for p, h in halves.items() if len(h) != 2)
    if broken:
        raise LoraCutError(f"LoRA factor pair incomplete for {broken[0]} (found {sorted(halves[broken[0]])}); "
                           "the checkpoint's adapter is damaged: resume from an older checkpoint")
    return {p: (h["A"], h["B"]) for p, h in sorted(halves.items())}


def cut_adapter(state: Mapping[str, torch.Tensor], *, rank: int, alpha: float, new_rank: int,
                new_alpha: float, use_rslora: bool = False) -> AdapterCut:
    """Every LoRA pair of ``state`` cut from (rank, alpha) to (new_rank, new_alpha); other keys kept."""
    pairs = find_pairs(state)
    if not pairs:
        raise LoraCutError("no lora_A/lora_B weights in the adapter state; is this a LoRA checkpoint?")
    scale = lora_scaling(alpha, rank, use_rslora=use_rslora)
    new_scale = lora_scaling(new_alpha, new_rank, use_rslora=use_rslora)
    out = dict(state)
    cuts, old_shapes = [], {}
    for prefix, (key_a, key_b) in pairs.items():
        if state[key_a].shape[0] != rank:
            raise LoraCutError(f"{key_a} has rank {state[key_a].shape[0]}, adapter_config says r={rank}; "
                               "per-module ranks (rank_pattern) are not supported by the cut")
        cut = cut_pair(prefix, state[key_a], state[key_b], scale=scale, new_rank=new_rank, new_scale=new_scale)
        old_shapes[key_a], old_shapes[key_b] = tuple(state[key_a].shape), tuple(state[key_b].shape)
        out[key_a], out[key_b] = cut.a.contiguous(), cut.b.contiguous()
        cuts.append(cut)
    return AdapterCut(state=out, pairs=tuple(cuts), old_shapes=old_shapes)
