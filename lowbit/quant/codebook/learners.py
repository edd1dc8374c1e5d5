"""Codebook learners for a weight matrix: scalar k-means, PQ, OPQ, RQ, AQ and coarse/fine.

Every learner returns a :class:`CodebookFit` in the one format of :mod:`lowbit.formats.codebook`
(see /work/notes/codebook-interface.md): the weight ``w`` [N, K] is cut into sub-vectors
``v[n, j] = w[n, j*d:(j+1)*d]`` and decoded as

    w[n, j*d:(j+1)*d] = scale[n] * sum_c codebooks[r(n), g(j), c, codes[n, j, c]]   (@ rotation)

with ``R`` row groups and ``G`` column groups. Each (row group, column group) pair is an
independent problem whose points are its sub-vectors; the problems are solved as one batch.

The objective is the squared reconstruction error, weighted when asked:

* ``importance`` [K] (diagonal Hessian, ``E[x_k^2]``): coordinate k of a sub-vector counts
  ``importance[k]`` times — the diagonal of the layer-output error ``||X (W - W')^T||^2``;
* ``metric`` [K, K] (the input second moment ``X^T X``): each sub-vector's error is measured
  under its diagonal d x d block (Mahalanobis). When every problem holds one column of
  sub-vectors this is done by Cholesky whitening; otherwise with per-point metrics.

``history``: pass a list and the learner appends the (weighted) objective on all the data after
each of its iterations; the tests check it never rises.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._linalg import solve_spd
from .clustering import (
    CHUNK_ELEMS,
    MIN_ROWS,
    kmeans1d,
    kmeans_batched,
    make_generator,
    progress_bar,
    serial_if_small,
    whiten,
)


class CodebookFit(NamedTuple):
    codes: torch.Tensor  # int64 [N, J, C], values in [0, 2**bits)
    codebooks: torch.Tensor  # float32 [R, G, C, 2**bits, d]
    scale: torch.Tensor | None  # float32 [N] or None
    rotation: torch.Tensor | None  # float32 [B, b, b] or None (OPQ only)


def _err(msg: str) -> ValueError:
    return ValueError(f"lowbit.quant.codebook: {msg}")


# ---------------------------------------------------------------- layout and decode


def _check_weight(w: torch.Tensor, bits: int, dim: int, groups: int, row_groups: int) -> tuple[int, int, int]:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise _err(f"w must be a float [N, K] tensor, got {getattr(w, 'shape', type(w))}")
    if not bool(torch.isfinite(w).all()):
        raise _err("w must be finite")
    N, K = w.shape
    if not 1 <= bits <= 16:
        raise _err(f"bits must be in [1, 16], got {bits}")
    if dim < 1 or K % dim != 0:
        raise _err(f"dim must be a positive divisor of K={K}, got {dim}")
    J = K // dim
    if groups < 1 or J % groups != 0:
        raise _err(f"groups must divide the {J} sub-vectors per row (K // dim), got {groups}")
    if row_groups < 1 or N % row_groups != 0:
        raise _err(f"row_groups must divide N={N}, got {row_groups}")
    return N, K, J


def to_problems(t: torch.Tensor, R: int, G: int) -> torch.Tensor:
    """[N, J, *f] -> [R*G, (N/R)*(J/G), *f]: the points of each (row group, column group)."""
    N, J = t.shape[:2]
    f = t.shape[2:]
    t = t.reshape(R, N // R, G, J // G, *f).transpose(1, 2)
    return t.reshape(R * G, (N // R) * (J // G), *f)


def from_problems(t: torch.Tensor, N: int, J: int, R: int, G: int) -> torch.Tensor:
    """Inverse of :func:`to_problems`: [R*G, (N/R)*(J/G), *f] -> [N, J, *f]."""
    f = t.shape[2:]
    t = t.reshape(R, G, N // R, J // G, *f).transpose(1, 2)
    return t.reshape(N, J, *f)


def decode(fit: CodebookFit) -> torch.Tensor:
    """The float32 weight [N, K] a fit stands for (pure torch; the format's dequantize is the spec)."""
    codes, cb = fit.codes, fit.codebooks
    N, J, C = codes.shape
    R, G, _, E, d = cb.shape
    r = (torch.arange(N) // (N // R)).view(N, 1, 1)
    g = (torch.arange(J) // (J // G)).view(1, J, 1)
    c = torch.arange(C).view(1, 1, C)
    v = cb.to(torch.float32)[r, g, c, codes].sum(2)  # [N, J, d]
    w = v.reshape(N, J * d)
    if fit.scale is not None:
        w = w * fit.scale.to(torch.float32).unsqueeze(1)
    if fit.rotation is not None:
        nb, b, _ = fit.rotation.shape
        w = torch.bmm(w.reshape(N, nb, b).transpose(0, 1), fit.rotation.to(torch.float32)).transpose(0, 1)
        w = w.reshape(N, J * d)
    return w


def reconstruction_error(fit: CodebookFit, w: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    """Sum of (importance-weighted) squared errors of the decoded weight."""
    e = (decode(fit) - w.to(torch.float32)).square()
    if importance is not None:
        e = e * importance.to(torch.float32)
    return float(e.to(torch.float64).sum())


class _Problems:
    """The learners' data: points [B, n, d] plus the distance weighting, and how to map back."""

    def __init__(self, w, dim, groups, row_groups, importance, metric):
        N, K, J = _check_weight(w, 1, dim, groups, row_groups)
        self.N, self.K, self.J, self.d, self.R, self.G = N, K, J, dim, row_groups, groups
        v = w.detach().to(torch.float32).reshape(N, J, dim)
        self.x = to_problems(v, row_groups, groups).contiguous()
        B, n, d = self.x.shape
        self.weight = None
        self.L = None  # per-problem Cholesky factors when whitened
        imp = None
        if importance is not None:
            if importance.shape != (K,):
                raise _err(f"importance must be [K]=[{K}], got {list(importance.shape)}")
            imp = importance.detach().to(torch.float32)
            if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
                raise _err("importance must be finite and non-negative")
        if metric is not None:
            if metric.shape != (K, K):
                raise _err(f"metric must be [K, K]=[{K}, {K}], got {list(metric.shape)}")
            ar = torch.arange(J)
            blocks = metric.detach().to(torch.float64).reshape(J, d, J, d)[ar, :, ar, :]  # [J, d, d]
            blocks = 0.5 * (blocks + blocks.transpose(1, 2))
            if imp is not None:
                s = imp.to(torch.float64).reshape(J, d).sqrt()
                blocks = blocks * s.unsqueeze(2) * s.unsqueeze(1)
            if d == 1:
                imp = blocks.reshape(K).to(torch.float32)
            elif J // groups == 1:
                Lj = whiten(blocks)  # raises if a block is not SPD
                self.L = Lj.repeat(row_groups, 1, 1)  # problem (r, g) holds column g only
                self.x = torch.bmm(self.x.to(torch.float64), self.L).to(torch.float32)
                imp = None
            else:
                whiten(blocks)
                m = blocks.to(torch.float32).unsqueeze(0).expand(N, J, d, d)
                self.weight = to_problems(m, row_groups, groups).contiguous()
                imp = None
        if imp is not None:
            wi = imp.reshape(1, J, d).expand(N, J, d)
            self.weight = to_problems(wi, row_groups, groups).contiguous()

    def unwhiten(self, c: torch.Tensor) -> torch.Tensor:
        """Codebooks [B, ..., E, d] learned on whitened points -> codebooks of the weight."""
        if self.L is None:
            return c
        B = c.shape[0]
        flat = c.reshape(B, -1, self.d).to(torch.float64)
        # whitened rows are c L: c = c_w L^-1, i.e. solve L^T c^T = c_w^T
        out = torch.linalg.solve_triangular(self.L.transpose(1, 2), flat.transpose(1, 2), upper=True)
        return out.transpose(1, 2).reshape(c.shape).to(torch.float32)

    def codes_out(self, codes: torch.Tensor) -> torch.Tensor:
        """[B, n, C] problem codes -> [N, J, C]."""
        return from_problems(codes, self.N, self.J, self.R, self.G).contiguous()

    def codebooks_out(self, cb: torch.Tensor) -> torch.Tensor:
        """[B, C, E, d] -> [R, G, C, E, d]."""
        cb = self.unwhiten(cb)
        return cb.reshape(self.R, self.G, *cb.shape[1:]).contiguous()


def sq_error(x: torch.Tensor, weight: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Per-point weighted squared distance between x and y [B, n, d] -> [B, n]."""
    diff = x - y
    if weight is None:
        return diff.square().sum(-1)
    if weight.dim() == 2:
        return diff.square().sum(-1) * weight
    if weight.dim() == 3:
        return (diff.square() * weight).sum(-1)
    return torch.einsum("bnd,bnde,bne->bn", diff, weight, diff)


def _gather_sum(cb: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Sum over c of cb[b, c, codes[b, i, c]]: cb [B, C, E, d], codes [B, n, C] -> [B, n, d]."""
    B, C, E, d = cb.shape
    out = torch.zeros(B, codes.shape[1], d)
    for c in range(C):
        out += torch.gather(cb[:, c], 1, codes[:, :, c : c + 1].expand(-1, -1, d))
    return out


def _total(x, weight, cb, codes) -> float:
    return float(sq_error(x, weight, _gather_sum(cb, codes)).to(torch.float64).sum())


# ---------------------------------------------------------------- scalar k-means


def scalar_kmeans_quantize(
    w: torch.Tensor,
    bits: int,
    *,
    row_groups: int = 1,
    importance: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    iters: int = 25,
    seed: int = 0,
    progress: bool = False,
    history: list | None = None,
) -> CodebookFit:
    """Weight sharing: one sorted codebook of ``2**bits`` scalars per row group (d = 1, C = 1, G = 1).

    Exact 1-D Lloyd on sorted values (:func:`kmeans1d`). For a scalar the Mahalanobis metric
    reduces to its diagonal, so ``metric`` [K, K] acts as per-column importance.
    """
    N, K, _ = _check_weight(w, bits, 1, 1, row_groups)
    imp = None
    if importance is not None:
        if importance.shape != (K,):
            raise _err(f"importance must be [K]=[{K}], got {list(importance.shape)}")
        imp = importance.to(torch.float32)
    if metric is not None:
        if metric.shape != (K, K):
            raise _err(f"metric must be [K, K]=[{K}, {K}], got {list(metric.shape)}")
        diag = metric.diagonal().to(torch.float32)
        imp = diag if imp is None else imp * diag
    if imp is not None and (not bool(torch.isfinite(imp).all()) or bool((imp < 0).any())):
        raise _err("importance must be finite and non-negative")
    x = w.detach().to(torch.float32).reshape(row_groups, (N // row_groups) * K)
    weight = None if imp is None else imp.expand(N, K).reshape(row_groups, -1)
    res = kmeans1d(x, 2**bits, weight, iters=iters, seed=seed, progress=progress, desc=f"k-means {bits}-bit")
    if history is not None:
        history.extend(res.history)
    codes = res.codes.reshape(N, K, 1)
    codebooks = res.centroids.reshape(row_groups, 1, 1, 2**bits, 1)
    return CodebookFit(codes, codebooks, None, None)


# ---------------------------------------------------------------- PQ


def product_quantize(
    w: torch.Tensor,
    bits: int,
    dim: int,
    *,
    groups: int = 1,
    row_groups: int = 1,
    importance: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    iters: int = 25,
    seed: int = 0,
    progress: bool = False,
    max_points_per_centroid: int | None = 256,
    history: list | None = None,
) -> CodebookFit:
    """Product quantization: an independent ``2**bits``-entry codebook of d-vectors per group.

    ``groups = K // dim`` is FAISS's PQ (one codebook per sub-vector column). Codebooks are trained
    on at most ``max_points_per_centroid * 2**bits`` sampled sub-vectors per problem (FAISS's
    rule), then every sub-vector is assigned (None: Lloyd on all points).
    """
    _check_weight(w, bits, dim, groups, row_groups)
    if dim == 1 and groups == 1 and metric is None:
        fit = scalar_kmeans_quantize(
            w, bits, row_groups=row_groups, importance=importance, iters=iters, seed=seed, progress=progress, history=history
        )
        return fit
    P = _Problems(w, dim, groups, row_groups, importance, metric)
    res = kmeans_batched(
        P.x,
        2**bits,
        P.weight,
        iters=iters,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        progress=progress,
        desc=f"PQ {bits}-bit d={dim}",
    )
    if history is not None:
        if res.codes.shape[1] == P.x.shape[1] and max_points_per_centroid is None:
            history.extend(res.history)
        else:
            history.append(float(res.inertia.sum()))
    return CodebookFit(P.codes_out(res.codes.unsqueeze(-1)), P.codebooks_out(res.centroids.unsqueeze(1)), None, None)


# ---------------------------------------------------------------- beam search and least squares


def beam_encode(
    x: torch.Tensor, weight: torch.Tensor | None, cb: torch.Tensor, beam: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of x [B, n, d] in the sum of C codebooks cb [B, C, E, d]: (codes [B, n, C], err [B, n]).

    Beam search over the codebooks in order: each of the ``beam`` best partial sums is extended
    by every entry of the next codebook (the error of an extension is ``||r||^2 - 2 r.e + ||e||^2``
    under the weighting, one matmul for all of them) and the ``beam`` best extensions survive.
    beam = 1 is greedy residual encoding. Point blocks bound the [points, beam, E] score tensor.
    """
    with serial_if_small(x.shape[0] * x.shape[1] * beam * cb.shape[2] * cb.shape[1]):
        return _beam_encode(x, weight, cb, beam)


def _beam_encode(x, weight, cb, beam):
    B, n, d = x.shape
    C, E = cb.shape[1], cb.shape[2]
    kind = "none" if weight is None else {2: "point", 3: "diag", 4: "full"}[weight.dim()]
    codes = torch.empty(B, n, C, dtype=torch.int64)
    err = torch.empty(B, n)
    rows = max(MIN_ROWS, CHUNK_ELEMS // (beam * E * 2 + (d * d if kind == "full" else 0)))
    for b in range(B):
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            xb = x[b, n0:n1]  # [r, d]
            wb = None if weight is None else weight[b, n0:n1]
            r = n1 - n0
            S = torch.zeros(r, 1, d)
            path = torch.zeros(r, 1, 0, dtype=torch.int64)
            for c in range(C):
                e = cb[b, c]  # [E, d]
                res = xb.unsqueeze(1) - S  # [r, m, d]
                m = res.shape[1]
                # One [r*m, d] x [d, E] matmul for every extension of every beam entry.
                if kind in ("none", "point"):
                    cross = torch.addmm(e.square().sum(-1), res.reshape(r * m, d), e.T, alpha=-2.0).view(r, m, E)
                    score = cross + res.square().sum(-1, keepdim=True)
                elif kind == "diag":
                    wres = res * wb.unsqueeze(1)
                    cross = (wres.reshape(r * m, d) @ e.T).view(r, m, E)
                    score = (wres * res).sum(-1, keepdim=True) - 2.0 * cross + (wb @ e.square().T).unsqueeze(1)
                else:
                    mres = torch.einsum("rde,rme->rmd", wb, res)
                    quad = wb.reshape(r, d * d) @ (e.unsqueeze(-1) * e.unsqueeze(-2)).reshape(E, d * d).T
                    cross = (mres.reshape(r * m, d) @ e.T).view(r, m, E)
                    score = (mres * res).sum(-1, keepdim=True) - 2.0 * cross + quad.unsqueeze(1)
                top = torch.topk(score.reshape(r, m * E), min(beam, m * E), dim=1, largest=False)
                parent, entry = top.indices // E, top.indices % E
                S = torch.gather(S, 1, parent.unsqueeze(-1).expand(-1, -1, d)) + e[entry]
                path = torch.cat([torch.gather(path, 1, parent.unsqueeze(-1).expand(-1, -1, c)), entry.unsqueeze(-1)], 2)
            codes[b, n0:n1] = path[:, 0]
            err[b, n0:n1] = sq_error(xb.unsqueeze(0), None if wb is None else wb.unsqueeze(0), S[:, 0].unsqueeze(0))[0]
    return codes, err


def _kind(weight):
    return "none" if weight is None else {2: "point", 3: "diag", 4: "full"}[weight.dim()]


def ls_codebooks(
    x: torch.Tensor, weight: torch.Tensor | None, cb: torch.Tensor, codes: torch.Tensor, max_joint: int = 4096
) -> torch.Tensor:
    """Codebooks minimizing the weighted error for fixed codes: cb [B, C, E, d] -> new cb.

    Joint least squares over all C*E entries (normal equations from code co-occurrence counts,
    one system per problem, or per coordinate under diagonal weights) when C*E <= max_joint;
    otherwise (or under full per-point metrics) block coordinate descent, one codebook at a time
    (each block's exact minimizer is a weighted mean of the residual it must explain).
    The joint system is damped toward the current codebooks, ``(A + lam I) t = b + lam t_old``:
    it has null directions (a constant moved from one codebook to another) and entries no point
    uses, and the damping keeps the update a descent step whatever lam is.

    ``A`` (a sum of non-negatively weighted outer products of code indicators) is positive
    semidefinite, so ``A + lam I`` is positive definite and is solved by Cholesky
    (:func:`lowbit.quant._linalg.solve_spd`, which says why not ``torch.linalg.solve``): every
    diagonal importance (one system per coordinate) and every multi-problem fit (groups or row
    groups > 1) builds a batch of systems. A system whose factorization still fails numerically
    keeps its old codebooks, which is a descent step too.
    """
    B, n, d = x.shape
    C, E = cb.shape[1], cb.shape[2]
    kind = _kind(weight)
    CE = C * E
    if CE > max_joint or kind == "full":
        from .clustering import _update

        cb = cb.clone()
        for c in range(C):
            others = _gather_sum(cb, codes) - torch.gather(cb[:, c], 1, codes[:, :, c : c + 1].expand(-1, -1, d))
            cb[:, c] = _update(x - others, weight, kind, codes[:, :, c], cb[:, c])[0]
        return cb
    q = codes + (torch.arange(C) * E).view(1, 1, C)  # [B, n, C] entry index in the stacked codebook
    pairs = (q.unsqueeze(3) * CE + q.unsqueeze(2)).reshape(B, n * C * C)
    pairs = pairs + (torch.arange(B) * CE * CE).unsqueeze(1)
    x64 = x.to(torch.float64)
    if kind in ("none", "point"):
        wp = torch.ones(B, n, dtype=torch.float64) if kind == "none" else weight.to(torch.float64)
        A = torch.bincount(pairs.reshape(-1), wp.repeat_interleave(C * C, dim=1).reshape(-1), minlength=B * CE * CE)
        A = A.reshape(B, 1, CE, CE)
        rhs = torch.zeros(B, CE, d, dtype=torch.float64)
        for c in range(C):
            rhs.scatter_add_(1, q[:, :, c : c + 1].expand(-1, -1, d), x64 * wp.unsqueeze(-1))
        rhs = rhs.transpose(1, 2).unsqueeze(-1)  # [B, d, CE, 1]
    else:
        w64 = weight.to(torch.float64)
        A = torch.stack(
            [
                torch.bincount(
                    pairs.reshape(-1), w64[:, :, t].repeat_interleave(C * C, dim=1).reshape(-1), minlength=B * CE * CE
                ).reshape(B, CE, CE)
                for t in range(d)
            ],
            1,
        )  # [B, d, CE, CE]
        rhs = torch.zeros(B, CE, d, dtype=torch.float64)
        for c in range(C):
            rhs.scatter_add_(1, q[:, :, c : c + 1].expand(-1, -1, d), x64 * w64)
        rhs = rhs.transpose(1, 2).unsqueeze(-1)
    old = cb.to(torch.float64).reshape(B, CE, d).transpose(1, 2).unsqueeze(-1)  # [B, d, CE, 1]
    diag = A.diagonal(dim1=-2, dim2=-1)
    lam = 1e-7 * diag.mean(-1, keepdim=True).clamp_min(1e-30) + 1e-30
    eye = torch.eye(CE, dtype=torch.float64)
    sol, ok = solve_spd(A + lam.unsqueeze(-1) * eye, rhs + lam.unsqueeze(-1) * old)
    sol = torch.where(ok[..., None, None], sol, old)
    return sol.squeeze(-1).transpose(1, 2).reshape(B, C, E, d).to(torch.float32)


def _stagewise(x, weight, E: int, C: int, iters: int, seed: int, mppc, progress, bar_desc):
    """Greedy residual quantization: k-means on what the previous codebooks left."""
    B, n, d = x.shape
    cb = torch.zeros(B, C, E, d)
    codes = torch.zeros(B, n, C, dtype=torch.int64)
    resid = x
    errs = []
    for c in range(C):
        res = kmeans_batched(
            resid, E, weight, iters=iters, seed=seed + c, max_points_per_centroid=mppc, progress=progress,
            desc=f"{bar_desc} codebook {c + 1}/{C}",
        )
        cb[:, c] = res.centroids
        codes[:, :, c] = res.codes
        resid = resid - torch.gather(res.centroids, 1, res.codes.unsqueeze(-1).expand(-1, -1, d))
        errs.append(float(res.inertia.sum()))
    return cb, codes, errs


def _check_multi(P: _Problems, C: int):
    if C < 1:
        raise _err(f"num_codebooks must be >= 1, got {C}")
    if P.weight is not None and P.weight.dim() == 4:
        raise _err(
            "a [K, K] metric with several sub-vector columns per codebook is supported by k-means and PQ only; "
            "use groups = K // dim (whitening) or importance"
        )


def residual_quantize(
    w: torch.Tensor,
    bits: int,
    dim: int,
    num_codebooks: int = 2,
    *,
    groups: int = 1,
    row_groups: int = 1,
    importance: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    iters: int = 25,
    beam: int = 5,
    seed: int = 0,
    progress: bool = False,
    max_points_per_centroid: int | None = 256,
    history: list | None = None,
) -> CodebookFit:
    """Residual quantization: codebook c is k-means on the residual left by codebooks 0..c-1.

    After the stage-wise training every sub-vector is re-encoded by beam search over the
    codebooks (width ``beam``, FAISS's default 5), keeping its greedy codes where those are
    better. ``history`` gets the error after each stage, then after the beam re-encode.
    """
    _check_weight(w, bits, dim, groups, row_groups)
    P = _Problems(w, dim, groups, row_groups, importance, metric)
    _check_multi(P, num_codebooks)
    E = 2**bits
    cb, codes, errs = _stagewise(P.x, P.weight, E, num_codebooks, iters, seed, max_points_per_centroid, progress, "RQ")
    # errs[c] is the error on all points after stage c (each stage's final assignment is full).
    if history is not None:
        history.extend(errs)
    if beam > 1:
        old_err = sq_error(P.x, P.weight, _gather_sum(cb, codes))
        new_codes, new_err = beam_encode(P.x, P.weight, cb, beam)
        better = new_err < old_err
        codes = torch.where(better.unsqueeze(-1), new_codes, codes)
        if history is not None:
            history.append(float(torch.where(better, new_err, old_err).to(torch.float64).sum()))
    return CodebookFit(P.codes_out(codes), P.codebooks_out(cb), None, None)


def additive_quantize(
    w: torch.Tensor,
    bits: int,
    dim: int,
    num_codebooks: int = 2,
    *,
    groups: int = 1,
    row_groups: int = 1,
    beam: int = 8,
    iters: int = 10,
    importance: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
    kmeans_iters: int = 25,
    max_points_per_centroid: int | None = 256,
    train_points: int | None = 65536,
    history: list | None = None,
) -> CodebookFit:
    """Additive quantization: C codebooks summed, codes chosen jointly, codebooks by least squares.

    Starts from residual quantization, then alternates ``iters`` times: beam-search encoding of
    every sub-vector (a point keeps its codes unless the search finds strictly better ones) and
    the joint least-squares codebook update (:func:`ls_codebooks`). Both steps are descent steps.
    The alternation runs on ``train_points`` sampled sub-vectors per problem (None: all); all
    sub-vectors are then encoded once with the learned codebooks. ``history`` gets the training
    objective after the RQ start and after each round.
    """
    _check_weight(w, bits, dim, groups, row_groups)
    P = _Problems(w, dim, groups, row_groups, importance, metric)
    _check_multi(P, num_codebooks)
    E = 2**bits
    B, n, d = P.x.shape
    gen = make_generator(seed + 7919)
    if train_points is not None and n > train_points:
        sel = torch.randperm(n, generator=gen)[:train_points].sort().values
        xt = P.x[:, sel]
        wt = None if P.weight is None else P.weight[:, sel]
    else:
        xt, wt = P.x, P.weight
    cb, codes, _ = _stagewise(xt, wt, E, num_codebooks, kmeans_iters, seed, max_points_per_centroid, progress, "AQ init")
    err = sq_error(xt, wt, _gather_sum(cb, codes))
    if history is not None:
        history.append(float(err.to(torch.float64).sum()))
    bar = progress_bar(iters, progress, f"AQ {num_codebooks}x{bits}-bit d={dim}")
    for _ in range(iters):
        new_codes, new_err = beam_encode(xt, wt, cb, beam)
        better = new_err < err
        codes = torch.where(better.unsqueeze(-1), new_codes, codes)
        cb = ls_codebooks(xt, wt, cb, codes)
        err = sq_error(xt, wt, _gather_sum(cb, codes))
        total = float(err.to(torch.float64).sum())
        if history is not None:
            history.append(total)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{total:.4g}")
    if bar is not None:
        bar.close()
    if xt is not P.x:
        codes, _ = beam_encode(P.x, P.weight, cb, beam)
    return CodebookFit(P.codes_out(codes), P.codebooks_out(cb), None, None)


def two_level_quantize(
    w: torch.Tensor,
    bits: int,
    dim: int,
    *,
    groups: int = 4,
    row_groups: int = 1,
    importance: torch.Tensor | None = None,
    iters: int = 25,
    beam: int = 1,
    seed: int = 0,
    progress: bool = False,
    max_points_per_centroid: int | None = 256,
    history: list | None = None,
) -> CodebookFit:
    """Coarse/fine two-level codebooks: one coarse codebook for the whole layer, and a fine
    codebook per (row group, column group) learned on the residual of the coarse one.

    Decode is coarse + fine (C = 2); the coarse codebook is stored once per group (identical
    copies) so the one format and kernel serve it. The shared coarse level captures the layer's
    overall distribution, the fine level adapts to each group's local residual.
    """
    N, K, J = _check_weight(w, bits, dim, groups, row_groups)
    E = 2**bits
    whole = _Problems(w, dim, 1, 1, importance, None)
    coarse = kmeans_batched(
        whole.x, E, whole.weight, iters=iters, seed=seed, max_points_per_centroid=max_points_per_centroid,
        progress=progress, desc="coarse",
    )
    if history is not None:
        history.append(float(coarse.inertia.sum()))
    P = _Problems(w, dim, groups, row_groups, importance, None)
    cc = from_problems(coarse.codes.unsqueeze(-1), N, J, 1, 1)  # [N, J, 1]
    ccodes = to_problems(cc, row_groups, groups)[..., 0]  # [B, n]
    B, n, d = P.x.shape
    cvec = coarse.centroids[0][ccodes]  # [B, n, d]
    fine = kmeans_batched(
        P.x - cvec, E, P.weight, iters=iters, seed=seed + 1, max_points_per_centroid=max_points_per_centroid,
        progress=progress, desc="fine",
    )
    cb = torch.stack([coarse.centroids.expand(B, E, d), fine.centroids], 1)
    codes = torch.stack([ccodes, fine.codes], -1)
    err = sq_error(P.x, P.weight, _gather_sum(cb, codes))
    if history is not None:
        history.append(float(err.to(torch.float64).sum()))
    if beam > 1:
        new_codes, new_err = beam_encode(P.x, P.weight, cb, beam)
        better = new_err < err
        codes = torch.where(better.unsqueeze(-1), new_codes, codes)
        if history is not None:
            history.append(float(torch.where(better, new_err, err).to(torch.float64).sum()))
    return CodebookFit(P.codes_out(codes), P.codebooks_out(cb), None, None)


# ---------------------------------------------------------------- OPQ


def _rotate(w: torch.Tensor, rot: torch.Tensor, transpose: bool) -> torch.Tensor:
    """w [N, K] times blockdiag(rot) (or its transpose): block i is w[:, blk] @ rot[i] (.T)."""
    N, K = w.shape
    nb, b, _ = rot.shape
    r = rot.transpose(1, 2) if transpose else rot
    return torch.bmm(w.reshape(N, nb, b).transpose(0, 1), r).transpose(0, 1).reshape(N, K)


def optimized_product_quantize(
    w: torch.Tensor,
    bits: int,
    dim: int,
    *,
    groups: int = 1,
    row_groups: int = 1,
    block: int = 128,
    opq_iters: int = 50,
    importance: torch.Tensor | None = None,
    iters: int = 25,
    pq_iters: int = 1,
    seed: int = 0,
    progress: bool = False,
    max_points_per_centroid: int | None = 256,
    train_rows: int | None = None,
    init_rotation: str = "random",
    history: list | None = None,
) -> CodebookFit:
    """Optimized PQ (Ge et al.): PQ of ``w @ blockdiag(R)^T`` with R learned orthogonal per K-block.

    Alternates ``opq_iters`` times (FAISS's 50: the rotation moves a little per step, and one
    Lloyd step between rotations converges as well per step as several): ``pq_iters`` Lloyd iterations of the PQ codebooks (warm
    started) on the rotated weight, then the orthogonal Procrustes update of each block,
    ``R = U V^T`` from the SVD of ``Y_hat^T W`` (the rotation that best maps the decoded PQ
    weight onto the weight). Each step lowers ``||W - Y_hat R||``. The rotation is learned on
    ``train_rows`` sampled rows (default: enough for FAISS's 256 points per centroid, at least
    2 * block); then PQ is run on all rows with the final rotation.
    ``importance`` enters the k-means as the diagonal of ``R D R^T`` (exact for R = I; an
    approximation otherwise, and the rotation update is kept only if it lowers the weighted error).
    """
    N, K, J = _check_weight(w, bits, dim, groups, row_groups)
    if block < dim or K % block != 0 or block % dim != 0:
        raise _err(f"block must divide K={K} and be a multiple of dim={dim}, got {block}")
    E = 2**bits
    nb = K // block
    w32 = w.detach().to(torch.float32)
    gen = make_generator(seed + 104729)
    if train_rows is None:
        train_rows = max(2 * block, math.ceil((max_points_per_centroid or 256) * E * groups / J))
    train_rows = max(row_groups, min(N, train_rows) // row_groups * row_groups)
    rows = torch.randperm(N, generator=gen)[:train_rows].sort().values if train_rows < N else torch.arange(N)
    wt = w32[rows]
    imp = None if importance is None else importance.detach().to(torch.float32)
    if init_rotation == "random":
        # A random rotation spreads the variance evenly over the subspaces (FAISS starts OPQ so too).
        q, r = torch.linalg.qr(torch.randn(nb, block, block, generator=gen, dtype=torch.float64))
        rot = (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).to(torch.float32).contiguous()
    elif init_rotation == "identity":
        rot = torch.eye(block).expand(nb, block, block).contiguous()
    else:
        raise _err(f"init_rotation must be 'random' or 'identity', got {init_rotation!r}")

    def y_importance(rot):
        if imp is None:
            return None
        D = imp.reshape(nb, block)
        # Y = W R^T per block: coordinate i of Y sees diag(R D R^T)_i = sum_j R_ij^2 D_j.
        return (rot.square() * D.unsqueeze(1)).sum(-1).reshape(K)

    def weighted_err(wm, y_hat, rot):
        e = (wm - _rotate(y_hat, rot, False)).square()
        if imp is not None:
            e = e * imp
        return float(e.to(torch.float64).sum())

    def pq_step(wm, rot, init, n_iter, mppc):
        Y = _rotate(wm, rot, True)
        P = _Problems(Y, dim, groups, row_groups, y_importance(rot), None)
        res = kmeans_batched(P.x, E, P.weight, iters=n_iter, seed=seed, init=init, max_points_per_centroid=mppc)
        fit = CodebookFit(P.codes_out(res.codes.unsqueeze(-1)), P.codebooks_out(res.centroids.unsqueeze(1)), None, None)
        return fit, res.centroids

    fit, cents = pq_step(wt, rot, "auto", iters, None)
    y_hat = decode(fit)
    cur = weighted_err(wt, y_hat, rot)
    if history is not None:
        history.append(cur)
    bar = progress_bar(opq_iters, progress, f"OPQ {bits}-bit d={dim}")
    for _ in range(opq_iters):
        M = torch.bmm(
            y_hat.to(torch.float64).reshape(-1, nb, block).permute(1, 2, 0),
            wt.to(torch.float64).reshape(-1, nb, block).transpose(0, 1),
        )  # [nb, b, b] = Y_hat_blk^T W_blk
        U, _, Vh = torch.linalg.svd(M)
        new_rot = (U @ Vh).to(torch.float32)
        if imp is None or weighted_err(wt, y_hat, new_rot) < cur:
            rot = new_rot
        fit, cents = pq_step(wt, rot, cents, pq_iters, None)
        y_hat = decode(fit)
        cur = weighted_err(wt, y_hat, rot)
        if history is not None:
            history.append(cur)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{cur:.4g}")
    if bar is not None:
        bar.close()
    fit, _ = pq_step(w32, rot, cents, iters, max_points_per_centroid)
    return CodebookFit(fit.codes, fit.codebooks, None, rot.contiguous())
