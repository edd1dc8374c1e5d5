"""N:M pruner (magnitude, activation saliency, partial groups) and least-squares recovery."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.quant.nm_prune import (input_norms, is_nm_sparse, least_squares_recovery, nm_prune,
                                   nm_prune_mask)


def groups_of(t, m):
    N, K = t.shape
    G = math.ceil(K / m)
    padded = torch.zeros((N, G * m), dtype=t.dtype)
    padded[:, :K] = t
    return padded.view(N, G, m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 7), (1, 2)])
@pytest.mark.parametrize("K", [8, 37, 130])
def test_exactly_n_of_m_and_the_largest(n, m, K):
    w = torch.randn(11, K)
    mask = nm_prune_mask(w, n, m)
    counts = groups_of(mask.int(), m).sum(-1)
    full = K // m
    assert (counts[:, :full] == n).all()
    if K % m:
        assert (counts[:, full] == min(n, K % m)).all()  # a partial group keeps at most n real columns
    # Every kept magnitude is >= every pruned one in its group.
    a = groups_of(w.abs(), m)
    gm = groups_of(mask, m)
    kept_min = torch.where(gm, a, torch.full_like(a, float("inf"))).amin(-1)
    real = groups_of(torch.ones_like(w, dtype=torch.bool), m)
    pruned_max = torch.where(~gm & real, a, torch.full_like(a, -1.0)).amax(-1)
    assert (kept_min >= pruned_max).all()
    pruned = nm_prune(w, n, m)
    assert is_nm_sparse(pruned, n, m)
    assert torch.equal(pruned, torch.where(mask, w, torch.zeros_like(w)))


def test_ties_go_to_the_lower_column():
    w = torch.ones(2, 8)
    mask = nm_prune_mask(w, 2, 4)
    assert mask[0].tolist() == [True, True, False, False] * 2


def test_activation_saliency_changes_the_choice():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    x = torch.tensor([[100.0, 100.0, 0.01, 0.01]])
    assert nm_prune_mask(w).tolist() == [[False, False, True, True]]
    assert nm_prune_mask(w, saliency=input_norms(x)).tolist() == [[True, True, False, False]]
    full = torch.tensor([[0.0, 5.0, 5.0, 0.0]])
    assert nm_prune_mask(w, saliency=full).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="saliency"):
        nm_prune_mask(w, saliency=torch.ones(3))


def test_bad_n_m():
    with pytest.raises(ValueError, match="0 < n <= m"):
        nm_prune_mask(torch.randn(2, 8), 5, 4)


def test_is_nm_sparse_detects_violations():
    w = torch.randn(3, 8)
    assert not is_nm_sparse(w)
    assert is_nm_sparse(nm_prune(w, 1, 4), 1, 4)


def test_least_squares_recovery_reduces_output_error():
    torch.manual_seed(0)
    N, K, T = 24, 64, 512
    # Correlated features: where recovery helps (uncorrelated inputs leave little to recover).
    mix = torch.randn(K, K) / math.sqrt(K) + torch.eye(K)
    x = torch.randn(T, K) @ mix
    w = torch.randn(N, K)
    mask = nm_prune_mask(w, saliency=input_norms(x))
    pruned = torch.where(mask, w, torch.zeros_like(w))
    rec = least_squares_recovery(w, mask, x, damp=1e-4)
    assert torch.equal(rec != 0, mask & (rec != 0)) and is_nm_sparse(rec)
    err_pruned = (x @ (pruned - w).T).pow(2).sum()
    err_rec = (x @ (rec - w).T).pow(2).sum()
    assert err_rec < 0.8 * err_pruned, (float(err_rec), float(err_pruned))
    # It is the per-row (ridge) least-squares optimum: the gradient vanishes on the kept columns.
    x64, H = x.double(), x.double().T @ x.double()
    lam = 1e-4 * H.diagonal().mean()
    grad = (rec.double() - w.double()) @ H + lam * (rec.double() - pruned.double())   # [N, K]
    tol = 1e-5 * H.abs().sum(1).max() * rec.abs().max()  # rec is the float64 solution rounded to fp32
    assert grad[mask].abs().max() < tol


def test_recovery_solves_in_a_fresh_multithreaded_process():
    """Regression: the per-row solves were one batched torch.linalg.solve, whose CPU LU (torch 2.14 +
    MKL 2024.2, 2 threads) returns invalid pivots in a fresh process for [rows, 192, 192] systems
    (MiniLM's K = 384 at 2:4): "Pivots given to lu_solve must all be greater or equal to 1". A
    process that has already factored small matrices does not show it, hence a fresh interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\n"
        "from lowbit.quant import nm_prune as P\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "w, x = torch.randn(8, 384, generator=g), torch.randn(1000, 384, generator=g)\n"
        "out = P.least_squares_recovery(w, P.nm_prune_mask(w), x)\n"
        "assert bool(torch.isfinite(out).all()) and P.is_nm_sparse(out)\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]


def test_recovery_leaves_a_dense_row_unchanged():
    x = torch.randn(100, 8)
    w = torch.randn(2, 8)
    rec = least_squares_recovery(w, torch.ones_like(w, dtype=torch.bool), x)
    torch.testing.assert_close(rec, w, rtol=1e-5, atol=1e-5)
