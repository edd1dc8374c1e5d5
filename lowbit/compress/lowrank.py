"""Low-rank factorization of Linear layers by truncated SVD.

    W [N, K] = U S V^T  ->  W_r = (U_r S_r^1/2) (S_r^1/2 V_r^T)
    nn.Linear(K, N)     ->  LowRankLinear: nn.Linear(K, r, bias=False) then nn.Linear(r, N)

By Eckart–Young, W_r is the best rank-r approximation in Frobenius norm and
``||W - W_r||_F^2 = sum of the discarded sigma_i^2`` exactly. The square root of S goes to
both factors so that their row ranges are balanced, which is what per-row int8/int4 scales
want: both halves are ordinary nn.Linear modules that :func:`lowbit.quantize` converts.

    low_rank(model, energy=0.95)          # each Linear: smallest rank keeping 95 % of sum sigma^2
    low_rank(model, size_ratio=0.5)       # each Linear: largest rank with <= 50 % of its weights
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class SVDResult:
    rank: int
    singular_values: torch.Tensor  # all of them, float64, descending
    error_sq: float  # ||W - W_r||_F^2 = sum of discarded sigma^2
    relative_error: float  # ||W - W_r||_F / ||W||_F


def rank_for(singular_values: torch.Tensor, shape: tuple[int, int], *, rank: int | None = None,
             energy: float | None = None, size_ratio: float | None = None) -> int:
    """The rank that one of the three targets asks for (exactly one must be given).

    `energy`: smallest r with ``sum_{i<r} sigma_i^2 >= energy * sum sigma^2``.
    `size_ratio`: largest r with ``r * (N + K) <= size_ratio * N * K`` (at least 1).
    """
    if sum(x is not None for x in (rank, energy, size_ratio)) != 1:
        raise ValueError("lowbit.compress.rank_for: give exactly one of rank, energy, size_ratio")
    full = min(shape)
    if rank is not None:
        if not 1 <= rank <= full:
            raise ValueError(f"lowbit.compress: rank must be in [1, {full}], got {rank}")
        return rank
    if energy is not None:
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"lowbit.compress: energy must be in (0, 1], got {energy}")
        e = singular_values.double() ** 2
        cum = torch.cumsum(e, 0)
        # the tiny slack keeps energy=1.0 from asking for rank beyond the last nonzero sigma by rounding
        r = int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1
        return min(max(r, 1), full)
    if not 0.0 < size_ratio:
        raise ValueError(f"lowbit.compress: size_ratio must be > 0, got {size_ratio}")
    N, K = shape
    return min(max(1, math.floor(size_ratio * N * K / (N + K))), full)


def svd_factors(weight: torch.Tensor, **target) -> tuple[torch.Tensor, torch.Tensor, SVDResult]:
    """(A [N, r], B [r, K], result) with ``A @ B`` the best rank-r approximation of `weight`."""
    w = weight.detach().double()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    r = rank_for(S, tuple(w.shape), **target)
    root = S[:r].sqrt()
    A, B = U[:, :r] * root, root.unsqueeze(1) * Vh[:r]
    err = float((S[r:] ** 2).sum())
    total = float((S ** 2).sum())
    return A, B, SVDResult(r, S, err, math.sqrt(err / total) if total else 0.0)


class LowRankLinear(nn.Sequential):
    """``second(first(x))``: first = Linear(K, r, bias=False), second = Linear(r, N) (the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 device=None, dtype=None):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.svd: SVDResult | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **target) -> LowRankLinear:
        A, B, res = svd_factors(linear.weight, **target)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, res.rank, linear.bias is not None,
                device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.first.weight.copy_(B)
            m.second.weight.copy_(A)
            if linear.bias is not None:
                m.second.bias.copy_(linear.bias)
        m.svd = res
        m.train(linear.training)
        return m

    def weight(self) -> torch.Tensor:
        """The reconstructed [N, K] weight ``second.weight @ first.weight``."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank(model: nn.Module, *, rank: int | None = None, energy: float | None = None,
             size_ratio: float | None = None, filter_fn: Callable[[nn.Module, str], bool] | None = None,
             min_saving: float = 0.0) -> dict[str, SVDResult]:
    """Replace each Linear of `model` (that `filter_fn` accepts) by a :class:`LowRankLinear`, in place.

    A layer whose factorization would not save more than `min_saving` of its weights
    (``r (N + K) > (1 - min_saving) N K``) is left as it is. Returns ``{name: SVDResult}`` for
    the replaced layers.
    """
    done = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if type(child) is not nn.Linear:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if filter_fn is not None and not filter_fn(child, name):
                continue
            new = LowRankLinear.from_linear(child, rank=rank, energy=energy, size_ratio=size_ratio)
            N, K = child.out_features, child.in_features
            if new.rank * (N + K) > (1.0 - min_saving) * N * K:
                continue
            setattr(parent, child_name, new)
            done[name] = new.svd
    return done
