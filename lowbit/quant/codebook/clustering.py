"""k-means in pure torch: the core every codebook learner is built on.

Two engines:

* :func:`kmeans_batched` — vector k-means on ``B`` independent problems at once (``x`` is
  ``[B, n, d]``; PQ's column groups are the batch). Greedy k-means++ seeding (scikit-learn's
  rule: ``2 + log k`` candidates per step, keep the one that lowers the potential most), Lloyd
  iterations with distances computed in bounded blocks (``||c||^2 - 2 x.c`` by matmul, never an
  ``[n, k, d]`` tensor), empty clusters moved onto the points that are worst served.
* :func:`kmeans1d` — scalar k-means on sorted values. In one dimension every cluster is an
  interval of the sorted data, so an assignment step is ``k - 1`` binary searches for the
  midpoints between centroids and an update step is differences of prefix sums: an iteration is
  O(k log n) instead of O(n k). Sorting 16M weights once is the whole cost.

Distances (sample weights ``w``, per-coordinate weights ``w[:, t]``, or a per-point metric ``M``):

    point:  w_i * ||x_i - c||^2
    diag:   sum_t w_it (x_it - c_t)^2                 (importance per coordinate)
    full:   (x_i - c)^T M_i (x_i - c)                 (Mahalanobis, M_i SPD)

A metric shared by every point is handled by whitening (``M = L L^T``: k-means on ``x L`` is
k-means under ``M``; centroids map back through ``L^-T``), which keeps the cheap Euclidean path.

Every Lloyd step is monotone: the assignment keeps a point's old code unless the new one is
strictly closer (so float rounding in the matmul form cannot raise the objective), the update is
the weighted mean (the exact minimizer for fixed codes), and a relocated empty centroid sits on a
data point, which can only lower the next assignment's cost. ``history`` records the objective
after every assignment step; tests check it never rises.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from .._linalg import solve_spd

# Floats in one block of the distance matrix: 2**17 * 4 B = 512 KiB, so memory stays bounded
# whatever n and k are, and the block is still in L2 when the argmin reads it back (measured
# 1.6x faster than 16 MiB blocks). MIN_ROWS keeps per-block Python overhead small for huge k.
CHUNK_ELEMS = 1 << 17
MIN_ROWS = 256


class KMeansResult(NamedTuple):
    centroids: torch.Tensor  # float32 [B, k, d]
    codes: torch.Tensor  # int64 [B, n]
    inertia: torch.Tensor  # float64 [B]: objective of (centroids, codes)
    history: list[float]  # total objective after each assignment step (non-increasing)


@contextlib.contextmanager
def serial():
    """Run a loop of many small tensor ops on one thread (restored afterwards).

    k-means++ seeding and the 1-D k-means are sequential loops of ops on a few thousand
    elements: an OpenMP fork/join per op costs more than it saves, and on a shared, loaded
    machine a barrier waiting for a descheduled thread made them 20x slower (measured:
    PQ of a 128 x 256 weight, 43 s on 2 threads vs 1.9 s on 1).
    """
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def serial_if_small(work: int):
    """:func:`serial` for a problem of fewer than 2**27 element-ops per pass, else no change.

    Below that, one pass is a loop of blocks of at most a few MB each: two threads gain at most
    2x on an idle machine, and lose far more on a busy one (see :func:`serial`).
    """
    return serial() if work < (1 << 27) else contextlib.nullcontext()


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar, or None; callers do ``bar and bar.update()`` so tqdm stays optional."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _weights_kind(x: torch.Tensor, weight: torch.Tensor | None) -> str:
    """Which distance `weight` selects for `x` [B, n, d]: none | point | diag | full."""
    if weight is None:
        return "none"
    B, n, d = x.shape
    if weight.shape == (B, n):
        return "point"
    if weight.shape == (B, n, d):
        return "diag"
    if weight.shape == (B, n, d, d):
        return "full"
    raise ValueError(
        f"lowbit.quant.codebook: weight must be [B, n], [B, n, d] or [B, n, d, d] for x {list(x.shape)}, "
        f"got {list(weight.shape)}"
    )


def _pair_dist(x: torch.Tensor, w: torch.Tensor | None, kind: str, c: torch.Tensor, xx=None) -> torch.Tensor:
    """Weighted distance of each point to each of a few centers: x [B,n,d], c [B,t,d] -> [B,n,t].

    Expanded as ``x.x - 2 x.c + c.c`` (weighted) by matmul, so no [B, n, t, d] tensor is formed;
    `xx` is the precomputed (weighted) ``x.x`` [B, n]. Used for seeding, where a distance off
    by rounding only perturbs the sampling.
    """
    if kind == "full":
        diff = x.unsqueeze(2) - c.unsqueeze(1)
        return torch.einsum("bntd,bnde,bnte->bnt", diff, w, diff)
    if kind == "diag":
        if xx is None:
            xx = (x.square() * w).sum(-1)
        out = torch.bmm(w, c.square().transpose(1, 2)) - 2.0 * torch.bmm(w * x, c.transpose(1, 2))
        return (out + xx.unsqueeze(-1)).clamp_min_(0)
    if xx is None:
        xx = x.square().sum(-1)
    out = torch.baddbmm(c.square().sum(-1).unsqueeze(1), x, c.transpose(1, 2), alpha=-2.0)
    out = (out + xx.unsqueeze(-1)).clamp_min_(0)
    return out * w.unsqueeze(-1) if kind == "point" else out


def _point_dist(x: torch.Tensor, w: torch.Tensor | None, kind: str, c: torch.Tensor, codes: torch.Tensor):
    """Exact weighted distance of every point to its own centroid: [B, n] float32."""
    diff = x - torch.gather(c, 1, codes.unsqueeze(-1).expand(-1, -1, c.shape[-1]))
    if kind == "none":
        return diff.square().sum(-1)
    if kind == "point":
        return diff.square().sum(-1) * w
    if kind == "diag":
        return (diff.square() * w).sum(-1)
    return torch.einsum("bnd,bnde,bne->bn", diff, w, diff)


def _blocks(B: int, n: int, per_point: int):
    """(b0, b1, n0, n1) blocks with (b1-b0)*(n1-n0)*per_point <= CHUNK_ELEMS."""
    rows = max(MIN_ROWS, CHUNK_ELEMS // max(1, per_point))
    if rows >= n:
        nb = max(1, rows // n)
        for b0 in range(0, B, nb):
            yield b0, min(B, b0 + nb), 0, n
    else:
        for b0 in range(B):
            for n0 in range(0, n, rows):
                yield b0, b0 + 1, n0, min(n, n0 + rows)


def assign(x: torch.Tensor, c: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest centroid of every point: x [B, n, d], c [B, k, d] -> codes int64 [B, n].

    Only the centroid-dependent part of the distance is formed, block by block:
    none/point ``||c||^2 - 2 x.c``; diag ``w.c^2 - 2 (w*x).c``; full ``c^T M c - 2 (M x).c``
    (the quadratic term as ``vec(M) . vec(c c^T)``, one matmul).
    """
    kind = _weights_kind(x, weight)
    B, n, d = x.shape
    k = c.shape[1]
    codes = torch.empty(B, n, dtype=torch.int64)
    if kind in ("none", "point"):
        cnorm = c.square().sum(-1)  # [B, k]
    elif kind == "full":
        cc = (c.unsqueeze(-1) * c.unsqueeze(-2)).reshape(B, k, d * d)  # [B, k, d*d]
    per_point = k * (2 if kind != "full" else 2) + (d * d if kind == "full" else 0)
    for b0, b1, n0, n1 in _blocks(B, n, per_point):
        xb = x[b0:b1, n0:n1]
        cb = c[b0:b1]
        if kind in ("none", "point"):
            s = torch.baddbmm(cnorm[b0:b1].unsqueeze(1), xb, cb.transpose(1, 2), alpha=-2.0)
        elif kind == "diag":
            wb = weight[b0:b1, n0:n1]
            s = torch.bmm(wb, cb.square().transpose(1, 2)) - 2.0 * torch.bmm(wb * xb, cb.transpose(1, 2))
        else:
            mb = weight[b0:b1, n0:n1]
            mx = torch.einsum("bnde,bne->bnd", mb, xb)
            s = torch.bmm(mb.reshape(b1 - b0, n1 - n0, d * d), cc[b0:b1].transpose(1, 2))
            s = s - 2.0 * torch.bmm(mx, cb.transpose(1, 2))
        codes[b0:b1, n0:n1] = s.min(-1).indices  # min(dim) is faster than argmin on CPU
    return codes


def _update(x, w, kind, codes, c_old):
    """Weighted means of the clusters (the exact minimizer for fixed codes); [B, k] empty mask."""
    B, n, d = x.shape
    k = c_old.shape[1]
    idx = codes.unsqueeze(-1)
    if kind in ("none", "point"):
        wp = torch.ones(B, n, dtype=torch.float64) if kind == "none" else w.to(torch.float64)
        mass = torch.zeros(B, k, dtype=torch.float64).scatter_add_(1, codes, wp)
        sums = torch.zeros(B, k, d, dtype=torch.float64).scatter_add_(
            1, idx.expand(-1, -1, d), x.to(torch.float64) * wp.unsqueeze(-1)
        )
        empty = mass <= 0
        c = torch.where(empty.unsqueeze(-1), c_old.to(torch.float64), sums / mass.clamp_min(1e-300).unsqueeze(-1))
        return c.to(torch.float32), empty
    if kind == "diag":
        wd = w.to(torch.float64)
        mass = torch.zeros(B, k, d, dtype=torch.float64).scatter_add_(1, idx.expand(-1, -1, d), wd)
        sums = torch.zeros(B, k, d, dtype=torch.float64).scatter_add_(
            1, idx.expand(-1, -1, d), x.to(torch.float64) * wd
        )
        # A coordinate with zero total weight in a cluster does not affect the objective: keep it.
        c = torch.where(mass > 0, sums / mass.clamp_min(1e-300), c_old.to(torch.float64))
        return c.to(torch.float32), (mass <= 0).all(-1)
    m = w.to(torch.float64)
    A = torch.zeros(B, k, d * d, dtype=torch.float64).scatter_add_(
        1, idx.expand(-1, -1, d * d), m.reshape(B, n, d * d)
    )
    A = A.reshape(B, k, d, d)
    rhs = torch.zeros(B, k, d, dtype=torch.float64).scatter_add_(
        1, idx.expand(-1, -1, d), torch.einsum("bnde,bne->bnd", m, x.to(torch.float64))
    )
    # A singular cluster metric (empty cluster, or points that only constrain some directions)
    # keeps its old centroid: still monotone, since only solvable clusters move to their minimizer.
    sol, ok = solve_spd(A, rhs.unsqueeze(-1))
    c = torch.where(ok.unsqueeze(-1), sol.squeeze(-1), c_old.to(torch.float64))
    empty = A.diagonal(dim1=-2, dim2=-1).sum(-1) <= 0
    return c.to(torch.float32), empty


def _relocate(x, dist, c, empty):
    """Put empty centroids on the worst-served points (distinct ones, largest distance first)."""
    if not bool(empty.any()):
        return c
    m = int(empty.sum(1).max())
    top = torch.topk(dist, min(m, dist.shape[1]), dim=1).indices  # [B, m]
    rank = (torch.cumsum(empty.to(torch.int64), 1) - 1).clamp(0, top.shape[1] - 1)  # [B, k]
    pick = torch.gather(top, 1, rank)  # [B, k]
    src = torch.gather(x, 1, pick.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    useful = empty & (torch.gather(dist, 1, pick) > 0)
    return torch.where(useful.unsqueeze(-1), src, c)


def kmeans_plusplus(
    x: torch.Tensor, k: int, weight: torch.Tensor | None = None, *, generator: torch.Generator, n_trials: int | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; scikit-learn's greedy variant) -> [B, k, d].

    Each new center is drawn from the D^2 distribution ``n_trials`` times and the candidate that
    lowers the total potential most is kept. Sampling uses the weighted distance, so heavy points
    are both likelier seeds and better served.
    """
    with serial():
        return _kmeans_plusplus(x, k, weight, generator=generator, n_trials=n_trials)


def _kmeans_plusplus(x, k, weight, *, generator, n_trials):
    kind = _weights_kind(x, weight)
    B, n, d = x.shape
    if n_trials is None:
        n_trials = 2 + int(math.log(k))
    ar = torch.arange(B)
    if kind == "point":
        mass = weight
    elif kind == "diag":
        mass = weight.sum(-1)
    elif kind == "full":
        mass = weight.diagonal(dim1=-2, dim2=-1).sum(-1)
    else:
        mass = torch.ones(B, n)
    mass = mass.to(torch.float64)
    first = torch.multinomial((mass + (mass.sum(1, keepdim=True) <= 0)).to(torch.float32), 1, generator=generator)
    centers = torch.empty(B, k, d, dtype=torch.float32)
    centers[:, 0] = x[ar, first[:, 0]]
    xx = None if kind == "full" else (x.square() * weight).sum(-1) if kind == "diag" else x.square().sum(-1)
    closest = _pair_dist(x, weight, kind, centers[:, :1], xx).squeeze(-1)
    for i in range(1, k):
        cum = torch.cumsum(closest, 1, dtype=torch.float64)
        pot = cum[:, -1:]
        r = torch.rand(B, n_trials, generator=generator, dtype=torch.float64) * pot
        cand = torch.searchsorted(cum, r).clamp_(max=n - 1)  # [B, t]
        # All points already sit on a center (pot == 0): any point is as good as another.
        cand = torch.where(pot > 0, cand, torch.zeros_like(cand))
        cpts = torch.gather(x, 1, cand.unsqueeze(-1).expand(-1, -1, d))  # [B, t, d]
        new = torch.minimum(closest.unsqueeze(-1), _pair_dist(x, weight, kind, cpts, xx))  # [B, n, t]
        best = new.sum(1, dtype=torch.float64).argmin(1)  # [B]
        centers[:, i] = cpts[ar, best]
        closest = new[ar, :, best]
    return centers


def kmeans_batched(x: torch.Tensor, k: int, weight: torch.Tensor | None = None, **kwargs) -> KMeansResult:
    with serial_if_small(x.shape[0] * x.shape[1] * k * max(1, x.shape[-1] // 4)):
        return _kmeans_batched(x, k, weight, **kwargs)


def _kmeans_batched(
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor | None = None,
    *,
    iters: int = 25,
    tol: float = 1e-6,
    seed: int = 0,
    init: str | torch.Tensor = "auto",
    init_size: int | None = None,
    max_points_per_centroid: int | None = None,
    progress: bool = False,
    desc: str = "k-means",
) -> KMeansResult:
    """Lloyd's k-means on ``B`` independent problems: x float32 [B, n, d] -> :class:`KMeansResult`.

    weight: None, [B, n] sample weights, [B, n, d] per-coordinate weights, or [B, n, d, d] SPD
    per-point metrics. init: "k-means++", "random" (k distinct sampled points) or centroids
    [B, k, d]. init_size: seed k-means++ on that many sampled points (default: all up to
    max(4096, 32 k)). max_points_per_centroid: run Lloyd on a sample of k * that many points
    and assign all points once at the end (FAISS's rule; None: use all points).
    Stops after `iters` updates, when no code changes, or when an iteration lowers the objective
    by less than ``tol`` (relative).
    """
    if x.dim() != 3:
        raise ValueError(f"lowbit.quant.codebook: x must be [B, n, d], got {list(x.shape)}")
    x = x.to(torch.float32).contiguous()
    B, n, d = x.shape
    if not 1 <= k:
        raise ValueError(f"lowbit.quant.codebook: k must be >= 1, got {k}")
    kind = _weights_kind(x, weight)
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()
        if bool((weight.diagonal(dim1=-2, dim2=-1) if kind == "full" else weight).lt(0).any()):
            raise ValueError("lowbit.quant.codebook: weight must be non-negative")
    gen = make_generator(seed)

    full_x, full_w = x, weight
    if max_points_per_centroid is not None and n > k * max_points_per_centroid:
        sel = torch.randperm(n, generator=gen)[: k * max_points_per_centroid].sort().values
        x = x[:, sel]
        weight = None if weight is None else weight[:, sel]
        n = x.shape[1]

    if isinstance(init, str) and init == "auto":
        # k-means++ costs k sequential passes; beyond a thousand clusters random points seed
        # nearly as well (FAISS seeds randomly at every k).
        init = "k-means++" if k <= 1024 else "random"
    if isinstance(init, torch.Tensor):
        c = init.to(torch.float32).reshape(B, k, d).clone()
    elif init == "k-means++" or init == "random":
        size = min(n, init_size or max(4096, 32 * k))
        if size < n:
            sel = torch.randperm(n, generator=gen)[:size].sort().values
            xs, ws = x[:, sel], (None if weight is None else weight[:, sel])
        else:
            xs, ws = x, weight
        if init == "random":
            pick = torch.stack([torch.randperm(xs.shape[1], generator=gen)[:k] for _ in range(B)])
            if pick.shape[1] < k:  # fewer points than clusters: repeat, the extras stay empty
                pick = pick[:, torch.arange(k) % pick.shape[1]]
            c = torch.gather(xs, 1, pick.unsqueeze(-1).expand(-1, -1, d))
        else:
            c = kmeans_plusplus(xs, k, ws, generator=gen)
    else:
        raise ValueError(f"lowbit.quant.codebook: init must be 'k-means++', 'random' or a tensor, got {init!r}")

    history: list[float] = []
    codes = None
    bar = progress_bar(iters, progress, desc)
    for it in range(iters + 1):
        new = assign(x, c, weight)
        dist_new = _point_dist(x, weight, kind, c, new)
        if codes is not None:
            dist_old = _point_dist(x, weight, kind, c, codes)
            keep = dist_old <= dist_new
            changed = int((~keep & (new != codes)).sum())
            codes = torch.where(keep, codes, new)
            dist = torch.where(keep, dist_old, dist_new)
        else:
            codes, dist, changed = new, dist_new, -1
        inertia = dist.to(torch.float64).sum(1)
        total = float(inertia.sum())
        history.append(total)
        if changed == 0 or it == iters:
            break
        if len(history) >= 2 and history[-2] - total <= tol * history[-2]:
            break
        c, empty = _update(x, weight, kind, codes, c)
        c = _relocate(x, dist, c, empty)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{total:.4g}")
    if bar is not None:
        bar.close()

    if x is not full_x:  # trained on a sample: one assignment of every point
        x, weight = full_x, full_w
        codes = assign(x, c, weight)
        inertia = _point_dist(x, weight, kind, c, codes).to(torch.float64).sum(1)
    return KMeansResult(c, codes, inertia, history)


kmeans_batched.__doc__ = _kmeans_batched.__doc__


def whiten(metric: torch.Tensor) -> torch.Tensor:
    """Cholesky factor L (metric = L L^T) for a shared SPD metric [.., d, d]; ValueError if not SPD."""
    L, info = torch.linalg.cholesky_ex(metric.to(torch.float64))
    if bool((info != 0).any()):
        raise ValueError("lowbit.quant.codebook: metric must be symmetric positive definite")
    return L


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    sample_weight: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    iters: int = 25,
    seed: int = 0,
    init: str | torch.Tensor = "auto",
    progress: bool = False,
    tol: float = 1e-6,
    return_result: bool = False,
    **kwargs,
):
    """k-means of the rows of ``x`` [n, d] -> ``(centroids float32 [k, d], codes int64 [n])``.

    sample_weight: [n] importance per point, or [n, d] per coordinate (diagonal metric).
    metric: a shared SPD [d, d] (Mahalanobis distance ``(x-c)^T metric (x-c)``, done by
    whitening the points with its Cholesky factor) or per-point metrics [n, d, d].
    With ``return_result=True`` the full :class:`KMeansResult` (history, inertia) is returned
    instead, with the batch dimension removed from its tensors.
    """
    if x.dim() != 2:
        raise ValueError(f"lowbit.quant.codebook: x must be [n, d], got {list(x.shape)}")
    x = x.to(torch.float32)
    n, d = x.shape
    weight = None
    L = None
    if metric is not None and metric.shape == (d, d):
        L = whiten(metric)
        x = (x.to(torch.float64) @ L).to(torch.float32)  # ||(x - c) L||^2 = (x-c)^T L L^T (x-c)
        if isinstance(init, torch.Tensor):
            init = (init.to(torch.float64) @ L).to(torch.float32)
        metric = None
    if metric is not None:
        if metric.shape != (n, d, d):
            raise ValueError(f"lowbit.quant.codebook: metric must be [d, d] or [n, d, d], got {list(metric.shape)}")
        if sample_weight is not None:
            metric = metric * sample_weight.reshape(n, 1, 1)
        weight = metric.unsqueeze(0)
    elif sample_weight is not None:
        if sample_weight.shape not in ((n,), (n, d)):
            raise ValueError(
                f"lowbit.quant.codebook: sample_weight must be [n] or [n, d], got {list(sample_weight.shape)}"
            )
        if L is not None and sample_weight.dim() == 2:
            raise ValueError("lowbit.quant.codebook: per-coordinate sample_weight cannot be combined with a [d, d] metric")
        weight = sample_weight.unsqueeze(0)
    res = kmeans_batched(
        x.unsqueeze(0),
        k,
        weight,
        iters=iters,
        seed=seed,
        init=init if not isinstance(init, torch.Tensor) else init.unsqueeze(0),
        progress=progress,
        tol=tol,
        **kwargs,
    )
    c = res.centroids[0]
    if L is not None:
        # Whitened centroids are c L (rows): c = c_y L^-1, i.e. solve L^T c^T = c_y^T.
        c = torch.linalg.solve_triangular(L.T, c.to(torch.float64).T, upper=True).T.to(torch.float32).contiguous()
    if return_result:
        return KMeansResult(c, res.codes[0], res.inertia[0], res.history)
    return c, res.codes[0]



def _sort_rows(x: torch.Tensor, with_perm: bool):
    """Sort each row of float32 ``x`` [G, n]: (values, permutation or None).

    numpy's vectorized sort is several times faster than ``torch.sort`` on CPU. The permutation
    comes from sorting int64 keys ``order_bits(x) << 32 | position`` (an order-preserving integer
    image of the float in the high half), which is still a plain vectorized integer sort.
    """
    import numpy as np

    a = x.detach().to(torch.float32).contiguous().numpy()
    if not with_perm:
        return torch.from_numpy(np.sort(a, axis=1)), None
    key = a.view(np.int32).astype(np.int64)
    # Negative floats order backwards as integers: flipping the magnitude bits fixes that.
    np.bitwise_xor(key, 0x7FFFFFFF, out=key, where=key < 0)
    key <<= 32
    key |= np.arange(a.shape[1], dtype=np.int64)
    key.sort(axis=1)
    perm = torch.from_numpy(key & 0xFFFFFFFF)
    return torch.gather(x.to(torch.float32), 1, perm), perm


def kmeans1d(
    x: torch.Tensor,
    k: int,
    weight: torch.Tensor | None = None,
    *,
    iters: int = 50,
    tol: float = 0.0,
    seed: int = 0,
    init: str = "auto",
    progress: bool = False,
    desc: str = "k-means 1-D",
) -> KMeansResult:
    """Scalar k-means on ``G`` independent groups: x [G, n] -> :class:`KMeansResult` (d = 1).

    The values are sorted once; then each cluster is an interval of the sorted values and its
    weight, sum and sum of squares are differences of float64 prefix sums. An assignment is
    k - 1 binary searches per group, an update k divisions: the same Lloyd iteration as
    :func:`kmeans_batched` (exact nearest centroid, exact weighted mean) at O(k log n).
    The greedy k-means++ seeding is exact on all the data as well: the D^2 mass of an interval
    and the potential after adding a candidate are prefix-sum differences, and a D^2 sample is
    a binary search on the (monotone) cumulative D^2 of one interval.
    Centroids come back sorted ascending per group.
    """
    if x.dim() != 2:
        raise ValueError(f"lowbit.quant.codebook: x must be [G, n], got {list(x.shape)}")
    if k < 1:
        raise ValueError(f"lowbit.quant.codebook: k must be >= 1, got {k}")
    G, n = x.shape
    gen = make_generator(seed)
    xs, perm = _sort_rows(x, weight is not None)
    # Values shifted by the group mean: less cancellation in S2 - 2 c S1 + c^2 S0.
    mu = xs.to(torch.float64).mean(1, keepdim=True)
    xc = xs.to(torch.float64) - mu
    del xs
    zero = torch.zeros(G, 1, dtype=torch.float64)
    if weight is not None:
        if weight.shape != x.shape:
            raise ValueError(f"lowbit.quant.codebook: weight must be {list(x.shape)}, got {list(weight.shape)}")
        ws = torch.gather(weight.to(torch.float64), 1, perm)
        del perm
        if bool((ws < 0).any()):
            raise ValueError("lowbit.quant.codebook: weight must be non-negative")
        P0 = torch.cat([zero, torch.cumsum(ws, 1)], 1)
        P1 = torch.cat([zero, torch.cumsum(ws * xc, 1)], 1)
        P2 = torch.cat([zero, torch.cumsum(ws * xc * xc, 1)], 1)
    else:
        ws = P0 = None
        P1 = torch.cat([zero, torch.cumsum(xc, 1)], 1)
        P2 = torch.cat([zero, torch.cumsum(xc * xc, 1)], 1)

    if init == "auto":
        # Exact k-means++ takes k sequential steps; for big k, quantiles seed 1-D data well.
        init = "k-means++" if k <= 256 else "quantile"
    if init == "quantile":
        frac = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        if P0 is None:
            qpos = (frac * n).long().clamp_(max=n - 1).expand(G, k)
        else:
            qpos = torch.searchsorted(P0[:, 1:].contiguous(), (frac * P0[:, -1:]).contiguous()).clamp_(max=n - 1)
        c = torch.gather(xc, 1, qpos.contiguous())
    elif init != "k-means++":
        raise ValueError(f"lowbit.quant.codebook: init must be 'auto', 'k-means++' or 'quantile', got {init!r}")
    else:
        with serial():
            c = _kmeanspp_1d(xc, P0, P1, P2, k, gen)
    c = c.sort(1).values
    return _lloyd_1d(x, xc, mu, ws, P0, P1, P2, c, iters, tol, progress, desc)


def _range_sums(P0, P1, P2, lo, hi):
    def at(P, p):
        return p.to(torch.float64) if P is None else torch.gather(P, 1, p)

    return at(P0, hi) - at(P0, lo), at(P1, hi) - at(P1, lo), at(P2, hi) - at(P2, lo)


def _kmeanspp_1d(xc, P0, P1, P2, k, gen):
    G, n = xc.shape

    def cost(c, lo, hi):
        S0, S1, S2 = _range_sums(P0, P1, P2, lo, hi)
        return (S2 - 2.0 * c * S1 + c * c * S0).clamp_min(0)

    def pos(v):
        return torch.searchsorted(xc, v.contiguous())

    def segments(c):
        mid = (c[:, :-1] + c[:, 1:]) * 0.5
        return torch.cat([torch.zeros(G, 1, dtype=torch.int64), pos(mid), torch.full((G, 1), n, dtype=torch.int64)], 1)

    trials = 2 + int(math.log(k))
    if P0 is None:
        first = torch.randint(n, (G, 1), generator=gen)
    else:
        u = torch.rand(G, 1, generator=gen, dtype=torch.float64) * P0[:, -1:]
        first = torch.searchsorted(P0[:, 1:].contiguous(), u).clamp_(max=n - 1)
    c = torch.gather(xc, 1, first)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for i in range(1, k):
        bounds = segments(c)
        seg_pot = cost(c, bounds[:, :-1], bounds[:, 1:])  # [G, i]
        cum = torch.cumsum(seg_pot, 1)
        pot = cum[:, -1:]
        u = torch.rand(G, trials, generator=gen, dtype=torch.float64) * pot
        j = torch.searchsorted(cum, u).clamp_(max=i - 1)
        u = u - (torch.gather(cum, 1, j) - torch.gather(seg_pot, 1, j))
        a, b = torch.gather(bounds, 1, j), torch.gather(bounds, 1, j + 1)
        cj = torch.gather(c, 1, j)
        # Smallest p in [a, b) whose cumulative D^2 over [a, p] reaches u.
        lo, hi = a.clone(), (b - 1).clamp_min(a)
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            reach = cost(cj, a, mid + 1) >= u
            hi = torch.where(reach, mid, hi)
            lo = torch.where(reach, lo, mid + 1)
        y = torch.gather(xc, 1, lo.clamp(max=n - 1))  # [G, t] candidates
        r = torch.searchsorted(c, y)
        has_l, has_r = r > 0, r < i
        cl = torch.gather(c, 1, (r - 1).clamp(min=0))
        cr = torch.gather(c, 1, r.clamp(max=i - 1))
        # Adding y re-serves exactly the points between its midpoints with its neighbours.
        pl = pos(torch.where(has_l, (cl + y) * 0.5, -inf))
        ph = pos(torch.where(has_r, (y + cr) * 0.5, inf))
        pm = pos(torch.where(has_l & has_r, (cl + cr) * 0.5, torch.where(has_l, inf, -inf))).clamp(pl, ph)
        old = cost(cl, pl, pm) + cost(cr, pm, ph)
        gain = old - cost(y, pl, ph)
        best = gain.argmax(1, keepdim=True)
        c = torch.cat([c, torch.gather(y, 1, best)], 1).sort(1).values
    return c


def _lloyd_1d(x, xc, mu, ws, P0, P1, P2, c, iters, tol, progress, desc):
    G, n = xc.shape
    k = c.shape[1]

    def cost(c, lo, hi):
        S0, S1, S2 = _range_sums(P0, P1, P2, lo, hi)
        return (S2 - 2.0 * c * S1 + c * c * S0).clamp_min(0), S0, S1

    def segments(c):
        mid = (c[:, :-1] + c[:, 1:]) * 0.5
        inner = torch.searchsorted(xc, mid.contiguous())
        return torch.cat([torch.zeros(G, 1, dtype=torch.int64), inner, torch.full((G, 1), n, dtype=torch.int64)], 1)

    history: list[float] = []
    bounds_prev = None
    bar = progress_bar(iters, progress, desc)
    for it in range(iters + 1):
        bounds = segments(c)
        pots, S0, S1 = cost(c, bounds[:, :-1], bounds[:, 1:])
        inertia = pots.sum(1)
        total = float(inertia.sum())
        history.append(total)
        if it == iters or (bounds_prev is not None and torch.equal(bounds, bounds_prev)):
            break
        if len(history) >= 2 and history[-2] - total <= tol * history[-2]:
            break
        bounds_prev = bounds
        empty = S0 <= 0
        c = torch.where(empty, c, S1 / S0.clamp_min(1e-300))
        if bool(empty.any()):
            # The worst-served points of an interval are at its ends: candidates are the 2k ends.
            ends = torch.cat([bounds[:, :-1].clamp(max=n - 1), (bounds[:, 1:] - 1).clamp(min=0)], 1)
            xe = torch.gather(xc, 1, ends)
            de = (xe - torch.cat([c, c], 1)).square()
            if ws is not None:
                de = de * torch.gather(ws, 1, ends)
            de = torch.where(torch.cat([empty, empty], 1), torch.zeros_like(de), de)
            c = _relocate(xe.unsqueeze(-1), de, c.unsqueeze(-1), empty).squeeze(-1).sort(1).values
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{total:.4g}")
    if bar is not None:
        bar.close()
    del P0, P1, P2, xc
    # Codes of the unsorted values by the same rule as the intervals (x < midpoint -> left).
    mid = ((c[:, :-1] + c[:, 1:]) * 0.5).contiguous()
    codes = torch.searchsorted(mid, x.to(torch.float64) - mu, right=True)
    centroids = (c + mu).to(torch.float32).unsqueeze(-1)
    return KMeansResult(centroids, codes, inertia, history)
