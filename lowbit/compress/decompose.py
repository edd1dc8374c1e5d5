"""Tensor decompositions of Conv2d weights: Tucker-2 (HOOI) and CP (ALS).

A Conv2d weight is a 4-way tensor W [O, I, kh, kw].

Tucker-2 on the two channel modes (Kim et al. 2016)::

    W ~= G x_0 U_out x_1 U_in       G [r_out, r_in, kh, kw], U_out [O, r_out], U_in [I, r_in]
    conv(W)  ->  1x1 (I -> r_in, U_in^T)  ->  kh x kw core (r_in -> r_out, G)  ->  1x1 (r_out -> O, U_out)

Initialized by HOSVD (leading left singular vectors of each unfolding) and refined by HOOI
(higher-order orthogonal iteration), whose error never increases.

CP of rank R (Lebedev et al. 2015)::

    W[o, i, h, w] ~= sum_r A[o, r] B[i, r] C[h, r] D[w, r]
    conv(W)  ->  1x1 (I -> R, B^T)  ->  depthwise kh x 1 (C)  ->  depthwise 1 x kw (D)  ->  1x1 (R -> O, A)

fitted by alternating least squares from an SVD initialization.

Both sequences compute exactly the convolution with the reconstructed weight (same stride,
padding and dilation; zero padding commutes with the channel mixes, which have no bias), so
the only error is the decomposition's, reported as the relative Frobenius error. The 1x1
convolutions are :class:`PointwiseConv` modules holding an ordinary ``nn.Linear``, which
:func:`lowbit.quantize` converts like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseConv(nn.Module):
    """A 1x1, stride-1 convolution as an ``nn.Linear`` over the channel dimension (so it can be quantized)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)


@dataclass(frozen=True)
class DecompositionResult:
    method: str
    ranks: tuple[int, ...]
    relative_error: float  # ||W - W_hat||_F / ||W||_F
    params_before: int
    params_after: int
    iterations: int


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    U, _, _ = torch.linalg.svd(m, full_matrices=False)
    return U[:, :r]


# ----------------------------------------------------------------------------- Tucker-2
def tucker2_ranks(shape: tuple[int, ...], *, ranks: tuple[int, int] | None = None, size_ratio: float | None = None,
                  energy: float | None = None, weight: torch.Tensor | None = None) -> tuple[int, int]:
    """(r_out, r_in) from explicit `ranks`, a `size_ratio` of the weight's parameters (same
    fraction of each channel mode kept), or an `energy` kept in each mode's unfolding."""
    if sum(x is not None for x in (ranks, size_ratio, energy)) != 1:
        raise ValueError("lowbit.compress.tucker2: give exactly one of ranks, size_ratio, energy")
    O, I, kh, kw = shape
    if ranks is not None:
        r0, r1 = ranks
    elif size_ratio is not None:
        # r_out = a O, r_in = a I:  a^2 O I k + a (O^2 + I^2) = size_ratio * O I k
        k = kh * kw
        qa, qb, qc = O * I * k, O * O + I * I, -size_ratio * O * I * k
        a = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
        r0, r1 = math.floor(a * O), math.floor(a * I)
    else:
        if not 0 < energy <= 1:
            raise ValueError(f"lowbit.compress.tucker2: energy must be in (0, 1], got {energy}")
        rs = []
        for mode in (0, 1):
            s = torch.linalg.svdvals(_unfold(weight.double(), mode)) ** 2
            cum = torch.cumsum(s, 0)
            rs.append(int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12))) + 1)
        r0, r1 = rs
    r0, r1 = min(max(int(r0), 1), O), min(max(int(r1), 1), I)
    return r0, r1


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], n_iter: int = 50, tol: float = 1e-10):
    """Tucker-2 of a [O, I, kh, kw] weight: (core [r_out, r_in, kh, kw], U_out [O, r_out],
    U_in [I, r_in], iterations run), in float64. HOSVD start, then HOOI."""
    w = weight.detach().double()
    r0, r1 = ranks
    u0, u1 = _leading(_unfold(w, 0), r0), _leading(_unfold(w, 1), r1)
    norm2 = float((w ** 2).sum())
    prev = None
    it = 0
    for it in range(1, n_iter + 1):
        y = torch.einsum("oihw,ib->obhw", w, u1)
        u0 = _leading(_unfold(y, 0), r0)
        y = torch.einsum("oihw,oa->aihw", w, u0)
        u1 = _leading(_unfold(y, 1), r1)
        core = torch.einsum("aihw,ib->abhw", y, u1)
        err = norm2 - float((core ** 2).sum())  # orthonormal factors: ||W - W_hat||^2 = ||W||^2 - ||G||^2
        if prev is not None and prev - err <= tol * norm2:
            break
        prev = err
    core = torch.einsum("oihw,oa,ib->abhw", w, u0, u1)
    return core, u0, u1, it


def tucker2_reconstruct(core, u_out, u_in) -> torch.Tensor:
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


# ----------------------------------------------------------------------------- CP
def cp_rank(shape: tuple[int, ...], *, rank: int | None = None, size_ratio: float | None = None) -> int:
    if (rank is None) == (size_ratio is None):
        raise ValueError("lowbit.compress.cp: give exactly one of rank, size_ratio")
    if rank is None:
        rank = math.floor(size_ratio * math.prod(shape) / sum(shape))
    return max(1, int(rank))


def _khatri_rao_gram(factors, skip):
    g = None
    for n, f in enumerate(factors):
        if n != skip:
            g = f.T @ f if g is None else g * (f.T @ f)
    return g


def _khatri_rao(factors) -> torch.Tensor:
    """Row-major Khatri-Rao product: row (j, k, l) of the result is B[j] * C[k] * D[l]."""
    out = factors[0]
    for f in factors[1:]:
        out = (out.unsqueeze(1) * f.unsqueeze(0)).reshape(-1, f.shape[1])
    return out


def cp_init(weight: torch.Tensor, rank: int, seed: int = 0) -> list[torch.Tensor]:
    """TensorLy's ``init="svd"``: the leading left singular vectors of each unfolding, columns
    beyond that mode's size drawn from a seeded normal."""
    x = weight.detach().double()
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for mode in range(4):
        u = _leading(_unfold(x, mode), min(rank, x.shape[mode]))
        if u.shape[1] < rank:
            extra = torch.randn(x.shape[mode], rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra.to(x.device)], 1)
        factors.append(u)
    return factors


def cp_als(weight: torch.Tensor, rank: int, n_iter: int = 500, tol: float = 1e-10, seed: int = 0,
           restarts: int = 1, init: list[torch.Tensor] | None = None):
    """Rank-`rank` CP of a 4-way tensor by ALS: (weights [R], [A, B, C, D], iterations run), float64.

    Starts from `init` or :func:`cp_init` (seeds ``seed .. seed + restarts - 1``; the best fit
    is kept: ALS finds a local minimum, and which one depends on the random columns), then
    updates each factor in turn by its least-squares solution; the error never increases.
    """
    if init is None and restarts > 1:
        runs = [cp_als(weight, rank, n_iter, tol, seed + i) for i in range(restarts)]
        x = weight.detach().double()
        return min(runs, key=lambda r: float((cp_reconstruct(r[0], r[1]) - x).norm()))
    x = weight.detach().double()
    factors = [f.detach().double().clone() for f in init] if init is not None else cp_init(x, rank, seed)
    unfolded = [_unfold(x, mode) for mode in range(4)]
    norm2 = float((x ** 2).sum())
    prev = None
    it = 0
    for it in range(1, n_iter + 1):
        for n in range(4):
            mttkrp = unfolded[n] @ _khatri_rao([f for m, f in enumerate(factors) if m != n])
            # pinv, not solve: the Gram matrix is singular when R exceeds a mode's size
            factors[n] = mttkrp @ torch.linalg.pinv(_khatri_rao_gram(factors, n), hermitian=True)
        # ||X - X_hat||^2 from the last MTTKRP: no reconstruction of the full tensor per iteration
        inner = float((mttkrp * factors[3]).sum())
        rec2 = float((_khatri_rao_gram(factors, -1)).sum())
        err = max(norm2 - 2 * inner + rec2, 0.0)
        if prev is not None and abs(prev - err) <= tol * norm2:
            break
        prev = err
    norms = torch.stack([f.norm(dim=0) for f in factors]).prod(0)
    factors = [f / f.norm(dim=0).clamp_min(1e-300) for f in factors]
    return norms, factors, it


def cp_reconstruct(weights, factors) -> torch.Tensor:
    a, b, c, d = factors
    return torch.einsum("r,or,ir,hr,wr->oihw", weights, a, b, c, d)


# ----------------------------------------------------------------------------- modules
def _check_conv(conv: nn.Module) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"lowbit.compress: expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"lowbit.compress: only groups=1 convolutions are decomposed, got groups={conv.groups}")
    if isinstance(conv.padding, str):
        raise ValueError(f"lowbit.compress: padding={conv.padding!r}; give numeric padding")


class TuckerConv2d(nn.Sequential):
    """Tucker-2 of a Conv2d: ``last(core(first(x)))`` (1x1 -> kh x kw -> 1x1)."""

    def __init__(self, conv: nn.Conv2d, ranks: tuple[int, int]):
        super().__init__()
        r0, r1 = ranks
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.first = PointwiseConv(conv.in_channels, r1, bias=False, **kw)
        self.core = nn.Conv2d(r1, r0, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                              bias=False, padding_mode=conv.padding_mode, **kw)
        self.last = PointwiseConv(r0, conv.out_channels, bias=conv.bias is not None, **kw)
        self.result: DecompositionResult | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, n_iter: int = 50, **target) -> TuckerConv2d:
        _check_conv(conv)
        ranks = tucker2_ranks(tuple(conv.weight.shape), weight=conv.weight, **target)
        core, u0, u1, its = tucker2(conv.weight, ranks, n_iter)
        m = cls(conv, ranks)
        with torch.no_grad():
            m.first.linear.weight.copy_(u1.T)
            m.core.weight.copy_(core)
            m.last.linear.weight.copy_(u0)
            if conv.bias is not None:
                m.last.linear.bias.copy_(conv.bias)
        w = conv.weight.detach().double()
        err = float((w - tucker2_reconstruct(core, u0, u1)).norm() / w.norm())
        m.result = DecompositionResult("tucker2", ranks, err, w.numel(), m.num_weights(), its)
        m.train(conv.training)
        return m

    def num_weights(self) -> int:
        return self.first.linear.weight.numel() + self.core.weight.numel() + self.last.linear.weight.numel()

    def weight(self) -> torch.Tensor:
        """The reconstructed [O, I, kh, kw] weight."""
        return tucker2_reconstruct(self.core.weight, self.last.linear.weight, self.first.linear.weight.T)


class CPConv2d(nn.Sequential):
    """CP of a Conv2d: 1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        (kh, kwid), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        self.first = PointwiseConv(conv.in_channels, rank, bias=False, **kw)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False, **kw)
        self.horizontal = nn.Conv2d(rank, rank, (1, kwid), (1, sw), (0, pw), (1, dw), groups=rank, bias=False, **kw)
        self.last = PointwiseConv(rank, conv.out_channels, bias=conv.bias is not None, **kw)
        self.rank = rank
        self.result: DecompositionResult | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, n_iter: int = 500, restarts: int = 3, **target) -> CPConv2d:
        _check_conv(conv)
        if conv.padding_mode != "zeros":
            raise ValueError(f"lowbit.compress: CP needs padding_mode='zeros', got {conv.padding_mode!r}")
        rank = cp_rank(tuple(conv.weight.shape), **target)
        lam, (a, b, c, d), its = cp_als(conv.weight, rank, n_iter, restarts=restarts)
        m = cls(conv, rank)
        # lambda split evenly over the four factors keeps their scales alike (better for quantizing)
        s = lam.clamp_min(0).pow(0.25)
        with torch.no_grad():
            m.first.linear.weight.copy_((b * s).T)
            m.vertical.weight.copy_((c * s).T.reshape(rank, 1, -1, 1))
            m.horizontal.weight.copy_((d * s).T.reshape(rank, 1, 1, -1))
            m.last.linear.weight.copy_(a * s)
            if conv.bias is not None:
                m.last.linear.bias.copy_(conv.bias)
        w = conv.weight.detach().double()
        err = float((w - cp_reconstruct(lam, [a, b, c, d])).norm() / w.norm())
        m.result = DecompositionResult("cp", (rank,), err, w.numel(), m.num_weights(), its)
        m.train(conv.training)
        return m

    def num_weights(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.dim() > 1)

    def weight(self) -> torch.Tensor:
        a = self.last.linear.weight
        b = self.first.linear.weight.T
        c = self.vertical.weight.reshape(self.rank, -1).T
        d = self.horizontal.weight.reshape(self.rank, -1).T
        return torch.einsum("or,ir,hr,wr->oihw", a, b, c, d)


def decompose_convs(model: nn.Module, method: str = "tucker", filter_fn: Callable[[nn.Module, str], bool] | None = None,
                    **target) -> dict[str, DecompositionResult]:
    """Replace every groups=1 Conv2d with a kernel larger than 1x1 (that `filter_fn` accepts) by its
    Tucker-2 (``method="tucker"``) or CP (``"cp"``) sequence, in place; `target` is passed to
    :meth:`TuckerConv2d.from_conv` / :meth:`CPConv2d.from_conv` (ranks/rank, size_ratio, energy).
    A layer whose decomposition would not have fewer weights is left alone."""
    if method not in ("tucker", "cp"):
        raise ValueError(f"lowbit.compress.decompose_convs: method must be 'tucker' or 'cp', got {method!r}")
    cls = TuckerConv2d if method == "tucker" else CPConv2d
    done = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if type(child) is not nn.Conv2d or child.groups != 1 or child.kernel_size == (1, 1):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if filter_fn is not None and not filter_fn(child, name):
                continue
            new = cls.from_conv(child, **target)
            if new.result.params_after >= new.result.params_before:
                continue
            setattr(parent, child_name, new)
            done[name] = new.result
    return done


def conv_reference(conv_like: nn.Module, x: torch.Tensor, like: nn.Conv2d) -> torch.Tensor:
    """``like``'s convolution of `x` with `conv_like`'s reconstructed weight (for checking exactness)."""
    return F.conv2d(x, conv_like.weight(), like.bias, like.stride, like.padding, like.dilation)
