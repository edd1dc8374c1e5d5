"""Batched linear solves shared by the quantizers."""

from __future__ import annotations

import torch


def solve_spd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """X with A X = B for a batch of symmetric positive (semi)definite A [..., n, n] and
    B [..., n, k], by Cholesky; returns (X, ok [...]). A system whose factorization fails (not
    numerically positive definite) is solved against the identity instead: its X is finite but
    meaningless, and the caller decides what stands in for it (`ok` says which).

    Not ``torch.linalg.solve``: its batched CPU LU (torch 2.14 + MKL 2024.2, more than one thread)
    can return invalid pivots ("Pivots given to lu_solve must all be greater or equal to 1") for a
    batch of several systems of a few hundred unknowns, in a fresh process; the quantizers build
    exactly such batches (one system per coordinate, group or row).
    """
    L, info = torch.linalg.cholesky_ex(A)
    ok = info == 0
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.cholesky_solve(B, torch.where(ok[..., None, None], L, eye)), ok
