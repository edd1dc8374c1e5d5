"""Lattice quantizers (D4, E8): training-free codebooks with closed-form nearest-point search.

Nearest points (Conway & Sloane, "Fast quantizing and decoding algorithms for lattice
quantizers and codes", 1982):

* ``D_n = {x in Z^n : sum x even}``: round every coordinate; if the sum is odd, re-round the
  coordinate whose rounding error was largest the other way.
* ``E_8 = D_8 u (D_8 + 1/2)``: the nearer of the D_8 point of x and the D_8 point of x - 1/2
  (plus 1/2). Both cosets have even coordinate sums.

The kernels decode a finite codebook, so :func:`lattice_points` enumerates the 2**bits lattice
points nearest the origin (shells in order of norm, ties broken lexicographically; the last
shell may be cut). A point is encoded by the closed-form search; when its nearest lattice point
is not in the codebook (outside the enumerated ball) the nearest codebook entry is found by
blocked exhaustive search, so the encoding is always the exact nearest codebook entry (and a
2**16-entry E8 codebook is slow to encode: most of its cost is that scan).
The per-row scale is chosen by a grid search on the row's error, then refined by least squares
(kept only when it lowers the error).
"""

from __future__ import annotations

import torch

from .clustering import CHUNK_ELEMS, MIN_ROWS
from .learners import CodebookFit, _check_weight, _err

LATTICES = {"D4": 4, "E8": 8}


def dn_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of D_n (integer vectors with an even sum) to each row of x [..., n]."""
    f = torch.round(x)
    odd = torch.remainder(f.sum(-1), 2) != 0
    delta = x - f
    far = delta.abs().argmax(-1, keepdim=True)
    step = torch.gather(delta, -1, far)
    step = torch.where(step >= 0, torch.ones_like(step), -torch.ones_like(step))  # round the other way
    g = f.scatter_add(-1, far, step)
    return torch.where(odd.unsqueeze(-1), g, f)


def e8_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest point of E_8 = D_8 u (D_8 + 1/2) to each row of x [..., 8]."""
    y0 = dn_nearest(x)
    y1 = dn_nearest(x - 0.5) + 0.5
    d0 = (x - y0).square().sum(-1, keepdim=True)
    d1 = (x - y1).square().sum(-1, keepdim=True)
    return torch.where(d0 <= d1, y0, y1)


def nearest(x: torch.Tensor, lattice: str) -> torch.Tensor:
    if lattice == "D4":
        return dn_nearest(x)
    if lattice == "E8":
        return e8_nearest(x)
    raise _err(f"lattice must be one of {sorted(LATTICES)}, got {lattice!r}")


def _ball(values: torch.Tensor, n: int, r2: float) -> torch.Tensor:
    """All vectors with coordinates in `values` and squared norm <= r2 (pruned enumeration)."""
    pts = torch.zeros(1, 0, dtype=torch.float64)
    norms = torch.zeros(1, dtype=torch.float64)
    for _ in range(n):
        nn = norms.unsqueeze(1) + values.square().unsqueeze(0)
        keep = nn <= r2 + 1e-9
        i, j = keep.nonzero(as_tuple=True)
        pts = torch.cat([pts[i], values[j].unsqueeze(1)], 1)
        norms = nn[i, j]
    return pts


def lattice_points(lattice: str, count: int) -> torch.Tensor:
    """The `count` points of the lattice nearest the origin, float32 [count, d], origin first.

    Ordered by squared norm, then lexicographically, so the codebook is deterministic.
    """
    if lattice not in LATTICES:
        raise _err(f"lattice must be one of {sorted(LATTICES)}, got {lattice!r}")
    d = LATTICES[lattice]
    r2 = 2.0
    while True:
        m = int(r2**0.5) + 1
        ints = torch.arange(-m, m + 1, dtype=torch.float64)
        pts = _ball(ints, d, r2)
        pts = pts[torch.remainder(pts.sum(1), 2) == 0]
        if lattice == "E8":
            halves = torch.arange(-m, m, dtype=torch.float64) + 0.5
            hp = _ball(halves, d, r2)
            pts = torch.cat([pts, hp[torch.remainder(hp.sum(1), 2) == 0]])
        if pts.shape[0] >= count:
            break
        r2 += 2.0
    # Sort by norm, ties lexicographic: stable sorts from the least significant key up.
    order = torch.arange(pts.shape[0])
    for col in range(d - 1, -1, -1):
        order = order[torch.sort(pts[order, col], stable=True).indices]
    order = order[torch.sort(pts[order].square().sum(1), stable=True).indices]
    return pts[order[:count]].to(torch.float32)


class _Index:
    """Exact lookup of lattice points in the codebook: integer keys of 2x, sorted, binary search."""

    def __init__(self, points: torch.Tensor):
        self.points = points
        twice = torch.round(points.to(torch.float64) * 2).to(torch.int64)
        self.off = int(twice.abs().max()) + 1
        self.base = 2 * self.off + 1
        keys = self._key(twice)
        self.keys, self.order = torch.sort(keys)

    def _key(self, twice: torch.Tensor) -> torch.Tensor:
        k = torch.zeros(twice.shape[:-1], dtype=torch.int64)
        for c in range(twice.shape[-1]):
            k = k * self.base + (twice[..., c] + self.off)
        return k

    def find(self, p: torch.Tensor) -> torch.Tensor:
        """Codebook index of each lattice point p [m, d], or -1 where it is not in the codebook."""
        twice = torch.round(p.to(torch.float64) * 2).to(torch.int64)
        inside = (twice.abs() < self.off).all(-1)
        key = self._key(twice.clamp(-self.off + 1, self.off - 1))
        pos = torch.searchsorted(self.keys, key).clamp(max=self.keys.numel() - 1)
        hit = inside & (self.keys[pos] == key)
        return torch.where(hit, self.order[pos], torch.full_like(pos, -1))


def _brute_nearest(y: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    cn = cb.square().sum(-1)
    out = torch.empty(y.shape[0], dtype=torch.int64)
    rows = max(MIN_ROWS, CHUNK_ELEMS // cb.shape[0])
    for i in range(0, y.shape[0], rows):
        out[i : i + rows] = torch.addmm(cn, y[i : i + rows], cb.T, alpha=-2.0).min(1).indices
    return out


def encode(y: torch.Tensor, lattice: str, index: _Index) -> torch.Tensor:
    """Exact nearest codebook entry of each row of y [m, d].

    Closed form where the nearest lattice point is in the codebook (then it is also the nearest
    entry, the codebook being a subset of the lattice); a blocked scan of the codebook for the
    points outside the enumerated ball (O(2**bits) each: the cost of big E8 codebooks).
    """
    if index.points.shape[0] <= 256:
        return _brute_nearest(y, index.points)  # a small codebook is cheaper to scan
    codes = index.find(nearest(y, lattice))
    miss = (codes < 0).nonzero().squeeze(1)
    if miss.numel():
        codes[miss] = _brute_nearest(y[miss], index.points)
    return codes


def lattice_quantize(
    w: torch.Tensor,
    bits: int,
    dim: int = 8,
    *,
    lattice: str | None = None,
    scale_grid: int = 16,
    scale_sample: int = 256,
    seed: int = 0,
    history: list | None = None,
) -> CodebookFit:
    """Training-free lattice codebook with a per-row scale: ``w[n, blk] ~ scale[n] * point``.

    dim 4 -> D4, dim 8 -> E8 (or name `lattice`). The codebook holds the 2**bits lattice points
    nearest the origin. Each row's scale is picked from ``scale_grid`` multiples of its RMS
    (error measured on ``scale_sample`` sampled sub-vectors per row), then refined by least
    squares on all of the row and kept only where that lowers the error.
    ``history`` gets the total error after the grid search and after the refinement.
    """
    if lattice is None:
        lattice = {4: "D4", 8: "E8"}.get(dim)
        if lattice is None:
            raise _err(f"dim must be 4 (D4) or 8 (E8) for a lattice, got {dim}")
    if lattice not in LATTICES or LATTICES[lattice] != dim:
        raise _err(f"lattice {lattice!r} needs dim {LATTICES.get(lattice)}, got dim={dim}")
    N, K, J = _check_weight(w, bits, dim, 1, 1)
    E = 2**bits
    points = lattice_points(lattice, E)
    index = _Index(points)
    v = w.detach().to(torch.float32).reshape(N, J, dim)
    rms = v.square().mean((1, 2)).sqrt().clamp_min(1e-30)  # [N]
    # Typical norm of the codebook vs of a sub-vector: puts the grid around a useful scale.
    radius = points.square().sum(1).mean().sqrt()
    base = rms * (dim**0.5) / radius.clamp_min(1e-30)
    alphas = torch.logspace(-0.6, 0.4, scale_grid)  # x0.25 .. x2.5 of the base scale
    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(J, generator=g)[:scale_sample].sort().values if J > scale_sample else torch.arange(J)
    vs = v[:, cols]  # [N, js, d]
    best_err = torch.full((N,), float("inf"), dtype=torch.float64)
    best_scale = base.clone()
    for a in alphas:
        s = base * a
        y = (vs / s.view(N, 1, 1)).reshape(-1, dim)
        q = points[encode(y, lattice, index)].reshape(vs.shape) * s.view(N, 1, 1)
        e = (vs - q).square().sum((1, 2)).to(torch.float64)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_scale = torch.where(better, s, best_scale)

    def full(scale):
        codes = encode((v / scale.view(N, 1, 1)).reshape(-1, dim), lattice, index).reshape(N, J)
        q = points[codes]  # [N, J, d] unscaled
        err = (v - q * scale.view(N, 1, 1)).square().sum((1, 2)).to(torch.float64)
        return codes, q, err

    codes, q, err = full(best_scale)
    if history is not None:
        history.append(float(err.sum()))
    # Least-squares scale for these codes, then re-encode; keep rows where that helps.
    qq = q.square().sum((1, 2))
    ls = torch.where(qq > 0, (v * q).sum((1, 2)) / qq.clamp_min(1e-30), best_scale).clamp_min(1e-30)
    codes2, _, err2 = full(ls)
    better = err2 < err
    codes = torch.where(better.unsqueeze(1), codes2, codes)
    scale = torch.where(better, ls, best_scale)
    if history is not None:
        history.append(float(torch.where(better, err2, err).sum()))
    codebooks = points.reshape(1, 1, 1, E, dim).contiguous()
    return CodebookFit(codes.reshape(N, J, 1), codebooks, scale.to(torch.float32), None)
