"""N:M structured pruning along K, and a least-squares recovery of the kept weights.

N:M: in every group of M consecutive input columns (``m*g .. m*g+M-1``) of an [out, in] weight,
only N entries survive. 2:4 is what sparse tensor cores (and lowbit's sparse24 kernels) run;
1:4, 4:8 and any N < M are supported here.

Which entries survive is decided by a saliency score, largest first:

* ``saliency=None``: magnitude ``|w|``.
* ``saliency`` a [K] tensor of per-input-feature activation norms ``‖x_k‖`` (from
  :func:`input_norms` on calibration activations): ``|w| · ‖x_k‖`` (the Wanda score: a weight on
  an input that is always large matters more than its magnitude says).
* ``saliency`` an [N, K] tensor: used as is.

Ties go to the lower column (deterministic). When K is not a multiple of M, the last group is
partial: it keeps at most N of its real columns (the weight is treated as zero-padded).

Public entry points: :func:`nm_prune_mask`, :func:`nm_prune`, :func:`is_nm_sparse`,
:func:`input_norms`, :func:`least_squares_recovery`.
"""

from __future__ import annotations

import math

import torch

from ._linalg import solve_spd


def _fail(msg: str):
    raise ValueError(f"lowbit.quant.nm_prune: {msg}")


def _check_nm(n: int, m: int):
    if not (isinstance(n, int) and isinstance(m, int)) or m < 1 or not (0 < n <= m):
        _fail(f"need integers 0 < n <= m, got n={n}, m={m}")


def input_norms(x: torch.Tensor) -> torch.Tensor:
    """float32 [K]: the L2 norm of each input feature over calibration activations x [..., K]."""
    x2 = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    return x2.pow(2).sum(0).sqrt()


def _score(weight: torch.Tensor, saliency: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().to(torch.float32).abs()
    if saliency is None:
        return w
    s = saliency.detach().to(device=w.device, dtype=torch.float32)
    if s.dim() == 1 and s.shape[0] == w.shape[1]:
        return w * s
    if tuple(s.shape) == tuple(w.shape):
        return s
    _fail(f"saliency must be [K]=[{w.shape[1]}] (activation norms) or [N, K]={list(w.shape)}, "
          f"got {list(s.shape)}")


def nm_prune_mask(weight: torch.Tensor, n: int = 2, m: int = 4, saliency: torch.Tensor | None = None) -> torch.Tensor:
    """bool [N, K]: True where a weight survives N:M pruning along K (the last dim).

    In each group of `m` consecutive columns the `n` entries with the largest saliency survive
    (see the module docstring; ties to the lower column). A partial last group keeps at most
    `n` of its real columns.
    """
    _check_nm(n, m)
    if weight.dim() != 2:
        _fail(f"weight must be 2-D [N, K], got shape {list(weight.shape)}")
    score = _score(weight, saliency)
    if not bool(torch.isfinite(score).all()):
        _fail("weight/saliency has inf or NaN values")
    N, K = score.shape
    G = math.ceil(K / m)
    padded = torch.full((N, G * m), -1.0, dtype=torch.float32, device=score.device)  # scores are >= 0
    padded[:, :K] = score
    groups = padded.view(N, G, m)
    # Stable descending sort: equal scores keep column order, so the lower column wins a tie.
    order = groups.argsort(dim=-1, descending=True, stable=True)[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    keep &= groups >= 0  # never keep a padding column
    return keep.view(N, G * m)[:, :K].contiguous()


def nm_prune(weight: torch.Tensor, n: int = 2, m: int = 4, saliency: torch.Tensor | None = None) -> torch.Tensor:
    """The weight with everything but the N:M survivors set to zero (same dtype and device)."""
    mask = nm_prune_mask(weight, n, m, saliency)
    return torch.where(mask, weight.detach(), torch.zeros_like(weight))


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True iff every group of `m` columns along K has at most `n` nonzeros."""
    _check_nm(n, m)
    N, K = weight.shape
    G = math.ceil(K / m)
    nz = torch.zeros((N, G * m), dtype=torch.int32, device=weight.device)
    nz[:, :K] = (weight != 0).to(torch.int32)
    return bool((nz.view(N, G, m).sum(-1) <= n).all())


def least_squares_recovery(weight: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, damp: float = 0.1,
                           rows_per_chunk: int = 256) -> torch.Tensor:
    """Re-fit the kept weights so the pruned layer best reproduces the dense one on calibration data.

    For each output row n with kept columns S: ``w_S = argmin ‖X_S w_S - X w_n‖²``, i.e.
    ``(H_SS + λI) w_S = H_S: w_n + λ w_S`` with ``H = XᵀX`` over the calibration activations
    `x` [..., K] and ``λ = damp · mean(diag H)``: a ridge pull towards the original kept values,
    which keeps the solve well posed when features are collinear or the calibration set is
    small (and leaves an unpruned row unchanged). Pruned entries stay exactly zero, so the
    result has the same N:M pattern. Cost: one [|S|, |S|] solve per row, O(N · |S|³).
    Returns float32 [N, K].
    """
    if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
        _fail(f"weight must be 2-D and mask the same shape, got {list(weight.shape)} and {list(mask.shape)}")
    X = x.detach().reshape(-1, x.shape[-1]).to(device=weight.device, dtype=torch.float64)
    if X.shape[1] != weight.shape[1]:
        _fail(f"calibration activations must have K={weight.shape[1]} features, got {X.shape[1]}")
    W = weight.detach().to(torch.float64)
    H = X.T @ X
    lam = damp * float(H.diagonal().mean().clamp(min=1e-12))
    out = torch.where(mask, W, torch.zeros_like(W))
    counts = mask.sum(1)
    for count in counts.unique().tolist():
        if count == 0:
            continue
        rows = (counts == count).nonzero().flatten()
        for r0 in range(0, rows.numel(), rows_per_chunk):
            r = rows[r0 : r0 + rows_per_chunk]
            # Kept columns of each row (count of them), in increasing order.
            cols = mask[r].to(torch.int64).argsort(dim=1, descending=True, stable=True)[:, :count].sort(1).values
            Hss = H[cols.unsqueeze(2), cols.unsqueeze(1)]                      # [R, S, S]
            Hss = Hss + lam * torch.eye(count, dtype=H.dtype, device=H.device)
            rhs = (H[cols] * W[r].unsqueeze(1)).sum(-1) + lam * W[r.unsqueeze(1), cols]  # [R, S]
            sol, ok = solve_spd(Hss, rhs.unsqueeze(-1))  # X^T X + lam I, lam > 0: positive definite
            sol = sol.squeeze(-1)
            for i in (~ok).nonzero().flatten().tolist():  # numerically not PD: one pivoted LU each
                sol[i] = torch.linalg.solve(Hss[i], rhs[i])
            out[r.unsqueeze(1), cols] = sol
    return out.to(torch.float32)
