"""The SVD rank cut against a float64 reference: optimal in Frobenius norm, error = tail singular values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oomguard.guard.resume.lora_cut import LoraCutError, cut_adapter, cut_pair, lora_scaling


def pair(out, inp, r, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, inp, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(out, r, generator=g, dtype=torch.float64).to(dtype))


def reference(a, b, scale, new_rank):
    """Full SVD of the formed ΔW in float64: the Eckart–Young optimum and its error."""
    delta = scale * b.double() @ a.double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = u[:, :new_rank] @ torch.diag(s[:new_rank]) @ vh[:new_rank]
    return delta, best, s


@settings(max_examples=25, deadline=None)
@given(out=st.integers(3, 40), inp=st.integers(3, 40), r=st.integers(1, 12), data=st.data(),
       seed=st.integers(0, 10**6), rslora=st.booleans())
def test_cut_matches_the_truncated_svd(out, inp, r, data, seed, rslora):
    new_rank = data.draw(st.integers(1, r))
    alpha, new_alpha = data.draw(st.sampled_from([1.0, 8.0, 16.0])), data.draw(st.sampled_from([4.0, 16.0, 32.0]))
    a, b = pair(out, inp, r, seed, torch.float64)
    scale, new_scale = lora_scaling(alpha, r, use_rslora=rslora), lora_scaling(new_alpha, new_rank, use_rslora=rslora)
    cut = cut_pair("m", a, b, scale=scale, new_rank=new_rank, new_scale=new_scale)
    delta, best, s = reference(a, b, scale, new_rank)
    assert cut.a.shape == (new_rank, inp) and cut.b.shape == (out, new_rank)
    got = new_scale * cut.b @ cut.a
    tol = 1e-9 * max(1.0, float(s[0]))
    assert torch.allclose(got, best, atol=tol)
    tail = float(torch.linalg.vector_norm(s[new_rank:]))
    assert cut.error == pytest.approx(tail, abs=tol)
    assert float(torch.linalg.matrix_norm(delta - got)) == pytest.approx(tail, abs=tol)
    assert cut.relative_error == pytest.approx(tail / float(torch.linalg.vector_norm(s)), abs=1e-9)


def test_cut_beats_other_rank_r_prime_approximations():
    a, b = pair(24, 20, 8, seed=3)
    scale = lora_scaling(16, 8)
    cut = cut_pair("m", a, b, scale=scale, new_rank=3, new_scale=lora_scaling(16, 3))
    delta = scale * b.double() @ a.double()
    # naive cuts: keep the first 3 columns/rows, or a random rank-3 projection of ΔW
    naive = scale * b.double()[:, :3] @ a.double()[:3]
    q, _ = torch.linalg.qr(torch.randn(24, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    projected = q @ q.T @ delta
    for other in (naive, projected):
        assert cut.error < float(torch.linalg.matrix_norm(delta - other))


def test_same_rank_only_rescales_and_is_exact():
    a, b = pair(10, 12, 4, seed=1, dtype=torch.float64)
    cut = cut_pair("m", a, b, scale=2.0, new_rank=4, new_scale=0.5)
    assert cut.error == pytest.approx(0.0, abs=1e-10)
    assert torch.allclose(0.5 * cut.b @ cut.a, 2.0 * b @ a, atol=1e-10)
    assert torch.allclose(cut.b.norm(dim=0), cut.a.norm(dim=1), atol=1e-10)  # magnitude shared evenly


def test_rank_above_min_dimension_pads_with_zeros():
    a, b = pair(3, 30, 8, seed=2, dtype=torch.float64)  # ΔW has rank <= 3
    cut = cut_pair("m", a, b, scale=1.0, new_rank=5, new_scale=1.0)
    assert cut.error == pytest.approx(0.0, abs=1e-9)
    assert torch.count_nonzero(cut.a[3:]) == 0 and torch.count_nonzero(cut.b[:, 3:]) == 0


def test_adapter_cut_keeps_dtype_other_keys_and_reports_total():
    a1, b1 = pair(16, 16, 8, seed=4, dtype=torch.bfloat16)
    a2, b2 = pair(16, 32, 8, seed=5, dtype=torch.bfloat16)
    state = {"x.q_proj.lora_A.weight": a1, "x.q_proj.lora_B.weight": b1,
             "x.v_proj.lora_A.weight": a2, "x.v_proj.lora_B.weight": b2, "x.norm.weight": torch.ones(16)}
    cut = cut_adapter(state, rank=8, alpha=16, new_rank=2, new_alpha=16)
    assert cut.state["x.q_proj.lora_A.weight"].dtype == torch.bfloat16
    assert cut.state["x.v_proj.lora_B.weight"].shape == (16, 2)
    assert cut.state["x.norm.weight"] is state["x.norm.weight"]
    assert set(cut.per_layer()) == {"x.q_proj", "x.v_proj"}
    errs = [p.error for p in cut.pairs]
    norms = [p.norm for p in cut.pairs]
    assert cut.total_relative_error == pytest.approx(math.sqrt(sum(e * e for e in errs) / sum(n * n for n in norms)))
    assert min(cut.per_layer().values()) <= cut.total_relative_error <= max(cut.per_layer().values())
    assert cut.old_shapes["x.q_proj.lora_A.weight"] == (8, 16)


def test_refusals_name_the_problem():
    a, b = pair(8, 8, 4, seed=0)
    with pytest.raises(LoraCutError, match="only goes down"):
        cut_pair("m", a, b, scale=1.0, new_rank=5, new_scale=1.0)
    with pytest.raises(LoraCutError, match="incomplete"):
        cut_adapter({"m.lora_A.weight": a}, rank=4, alpha=8, new_rank=2, new_alpha=8)
    with pytest.raises(LoraCutError, match="DoRA"):
        cut_adapter({"m.lora_A.weight": a, "m.lora_B.weight": b, "m.lora_magnitude_vector": torch.ones(8)},
                    rank=4, alpha=8, new_rank=2, new_alpha=8)
    with pytest.raises(LoraCutError, match="rank_pattern"):
        cut_adapter({"m.lora_A.weight": a, "m.lora_B.weight": b}, rank=8, alpha=8, new_rank=2, new_alpha=8)
