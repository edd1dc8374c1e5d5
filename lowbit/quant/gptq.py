"""GPTQ: error-compensating weight quantization (Frantar et al., 2022), into the int8 and int4 formats.

Round-to-nearest (RTN) quantizes each weight on its own. GPTQ quantizes the columns of an [N, K]
weight one at a time and, after each, updates the columns not yet quantized so that the layer's
*output* on calibration inputs X stays close: it minimizes ``||X W^T - X Q^T||^2`` greedily, with
the Hessian ``H = X^T X / n`` of that objective:

    Hinv = upper Cholesky factor of (H + damp * mean(diag H) * I)^-1
    for each column j:  q_j = quant(w_j);  e_j = (w_j - q_j) / Hinv[j, j]
                        W[:, j+1:] -= e_j Hinv[j, j+1:]

Columns are processed in blocks of ``block_size``: inside a block the update is applied column by
column, to the rest of the weight once per block ("lazy batch updates": one GEMM instead of K
rank-1 updates, same result). ``act_order=True`` quantizes columns in decreasing ``diag(H)``
order (the most active inputs first, while the most columns remain to absorb their error).

Quantization grids are those of :mod:`lowbit.quant.affine` and the outputs are the lowbit
formats: int8 symmetric per output channel (:class:`lowbit.formats.int8.Int8Weight`; its scales
are chosen once, from the whole weight) and int4 group-wise, symmetric or asymmetric
(:class:`lowbit.formats.int4.Int4Weight`). A group's scale is chosen when GPTQ reaches the
group's first column, from the weights as updated so far; with ``act_order`` the columns of a
group are no longer quantized together, so every group's scale is chosen up front from the
original weight ("static groups": the format has no per-column group index).

Codebook codes (:func:`gptq_codebook`, GPTVQ-style, van Baalen et al., 2024): the codebooks are
learned first (any :mod:`lowbit.quant.codebook` learner, weighted by ``diag(H)``) and held fixed;
GPTQ then walks the weight ``d`` columns (one sub-vector column) at a time. With ``U`` the upper
Cholesky factor of ``H^-1`` and ``U_B`` its d x d diagonal block at the current sub-vectors, the
trailing rows of ``U`` factor the inverse Hessian of the columns not yet quantized, so fixing the
sub-vectors ``v`` (one per row) to ``q`` costs ``||(v - q) U_B^-1||^2`` once the later columns have
compensated: each sub-vector goes to the codebook entry nearest in that metric (codebooks whitened
by ``U_B^-1``, a beam search over the summed codebooks for RQ/AQ), and the error
``(v - q) U_B^-1`` is spread over later columns through ``U_B``'s rows of ``U`` (the same lazy
block update). d = 1 is exactly GPTQ with a non-uniform grid. Afterwards the codebooks may be
refit to the layer output by least squares with the codes fixed
(:func:`lowbit.quant.codebook.finetune_codebooks`, CG on ``||X (W - W_hat)^T||^2`` via ``H``).
OPQ's rotation is handled by running GPTQ on the rotated weight ``W R^T`` with ``R H R^T``; a
per-row scale (lattice) scales the candidates of its row. Every method of
:mod:`lowbit.nn.codebook` is supported.

Model level: :func:`gptq` collects every Linear's Hessian from the float model in one pass over
the calibration data (all layers see float inputs: simple and parallel, slightly less accurate
than re-running each layer on its quantized predecessors) and swaps in the kernel-backed modules.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..configs import CodebookConfig, Config, Int4Config, Int8Config, Unsupported
from ..formats import codebook as codebook_fmt
from ..formats import int4 as int4_fmt
from ..formats import int8 as int8_fmt
from . import affine
from . import observers as obs

log = logging.getLogger("lowbit")

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Hessian:
    """Running ``X^T X / n`` (float64) of a layer's inputs X [..., K]."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        rows = x.shape[0]
        if rows == 0:
            return
        # Running mean, so the scale of H does not depend on how many rows came in.
        self.H.mul_(self.n / (self.n + rows)).addmm_(x.T, x, alpha=1.0 / (self.n + rows))
        self.n += rows


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # affine codes [N, K] (lowbit.quant.affine.quantize's dtype)
    params: affine.AffineParams  # the grid: channel scales [N] or group scales [N, K / group_size]

    def dequantize(self) -> torch.Tensor:
        return affine.dequantize(self.codes, self.params)

    def int8_weight(self) -> int8_fmt.Int8Weight:
        return int8_fmt.Int8Weight(self.codes.to(torch.int8).contiguous(), self.params.scale.contiguous())

    def int4_weight(self) -> int4_fmt.Int4Weight:
        return obs.int4_from_codes(self.codes, self.params)


def _group_params(w: torch.Tensor, bits: int, symmetric: bool, observer: str, scale_dtype: torch.dtype):
    """Per-row params for the columns `w` [N, g] (one group), scales rounded to `scale_dtype`."""
    if observer == "minmax":
        p = affine.choose_qparams(w, bits, symmetric=symmetric, granularity="channel")
    else:
        o = obs.make_observer(observer, bits, symmetric=symmetric, granularity="channel")
        o.observe(w)
        p = o.qparams()
    if scale_dtype != torch.float32:  # the stored scale is what the kernels will multiply by
        p = affine.AffineParams(p.scale.to(scale_dtype).to(torch.float32), p.zero_point, bits, symmetric, "channel")
    return p


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop runs thousands of tiny ops; on CPU, waking intra-op threads for each costs
    more than it saves (measured 10x slower with 2 threads on a loaded 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, *, bits: int = 4, symmetric: bool = False,
                  group_size: int | None = None, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128, observer: str = "minmax",
                  scale_dtype: torch.dtype = torch.float32) -> GPTQResult:
    """GPTQ of `w` [N, K] against the input Hessian `H` [K, K] (see the module doc).

    ``group_size=None``: one scale per output channel; else per `group_size` columns (a divisor
    of K). `observer` picks each group's range: ``"minmax"`` or ``"mse"`` (any name of
    :data:`lowbit.quant.observers.OBSERVERS`). ``damp`` is relative to the mean of diag(H).
    """
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"lowbit.gptq: w must be [N, K] and H [K, K], got {list(w.shape)} and {list(H.shape)}")
    N, K = w.shape
    if group_size is not None and (group_size <= 0 or K % group_size):
        raise ValueError(f"lowbit.gptq: group_size must be a positive divisor of K={K}, got {group_size}")
    if not damp > 0:
        raise ValueError(f"lowbit.gptq: damp must be > 0, got {damp}")
    with _one_cpu_thread(w.device):
        return _gptq(w, H, bits, symmetric, group_size, act_order, damp, block_size, observer, scale_dtype)


def _gptq(w, H, bits, symmetric, group_size, act_order, damp, block_size, observer, scale_dtype) -> GPTQResult:
    N, K = w.shape
    gs = K if group_size is None else group_size
    W = w.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()
    if not bool(torch.isfinite(W).all()) or not bool(torch.isfinite(H).all()):
        raise ValueError("lowbit.gptq: w and H must be finite")

    dead = torch.diag(H) == 0  # inputs that were always zero: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Static groups: with act_order, or with one group per row (identical either way).
    static = act_order or gs == K
    groups: list[affine.AffineParams | None] = [None] * (K // gs)
    if static:
        for g in range(K // gs):
            groups[g] = _group_params(W[:, g * gs:(g + 1) * gs], bits, symmetric, observer, scale_dtype)

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(K, device=H.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)

    order = perm.tolist()
    codes = torch.empty(N, K, dtype=affine.code_dtype(bits, symmetric), device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // gs
            if groups[g] is None:  # first column of the group (columns run in order without act_order)
                # Quantized columns of this block are still stale in W; take the live ones from W1.
                live = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : gs]
                groups[g] = _group_params(live, bits, symmetric, observer, scale_dtype)
            p = groups[g]
            wcol = W1[:, i:i + 1]
            q = affine.quantize(wcol, p)
            codes[:, col] = q[:, 0]
            err = (wcol - affine.dequantize(q, p)) / Hinv1[i, i]
            W1[:, i:] -= err * Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    scale = torch.stack([p.scale for p in groups], dim=1)
    zero = None if symmetric else torch.stack([p.zero_point for p in groups], dim=1)
    if group_size is None:
        params = affine.AffineParams(scale[:, 0].contiguous(), None if zero is None else zero[:, 0].contiguous(),
                                     bits, symmetric, "channel")
    else:
        params = affine.AffineParams(scale.contiguous(), zero, bits, symmetric, "group", group_size)
    return GPTQResult(codes, params)


def rtn_quantize(w: torch.Tensor, *, bits: int = 4, symmetric: bool = False, group_size: int | None = None,
                 observer: str = "minmax") -> GPTQResult:
    """Round-to-nearest with the same grids: the baseline GPTQ is measured against."""
    K = w.shape[1]
    gs = K if group_size is None else group_size
    parts = [_group_params(w[:, g:g + gs].detach().to(torch.float32), bits, symmetric, observer, torch.float32)
             for g in range(0, K, gs)]
    scale = torch.stack([p.scale for p in parts], 1)
    zero = None if symmetric else torch.stack([p.zero_point for p in parts], 1)
    if group_size is None:
        params = affine.AffineParams(scale[:, 0], None if zero is None else zero[:, 0], bits, symmetric, "channel")
    else:
        params = affine.AffineParams(scale, zero, bits, symmetric, "group", group_size)
    return GPTQResult(affine.quantize(w.detach().to(torch.float32), params), params)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative layer output error ``||X (W - W_hat)^T||^2 / ||X W^T||^2`` computed through ``H = X^T X / n``."""
    w, d, H = w.to(torch.float64), (w - w_hat).to(torch.float64), H.to(torch.float64)
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum())


# ----------------------------------------------------------------------------- codebook codes
def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32)."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)


def _block_diag(rotation: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*rotation.to(torch.float64).unbind(0))


def gptq_codebook(w: torch.Tensor, H: torch.Tensor, fit, *, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128, beam: int = 8):
    """New codes for the codebooks of `fit` (a :class:`lowbit.quant.codebook.CodebookFit` of `w` [N, K]),
    chosen by GPTQ against the input Hessian `H` [K, K] (see the module doc); codebooks, scale and
    rotation are returned unchanged. ``act_order`` orders whole sub-vector columns by their summed
    ``diag(H)``; `beam` is the search width when several codebooks are summed (RQ/AQ).
    """
    codes0, codebooks, scale, rotation = fit
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"lowbit.gptq: w must be [N, K] and H [K, K], got {list(w.shape)} and {list(H.shape)}")
    if codebooks.dim() != 5:
        raise ValueError(f"lowbit.gptq: codebooks must be [R, G, C, E, d], got {list(codebooks.shape)}")
    N, K = w.shape
    R, G, C, E, d = codebooks.shape
    if K % d or (K // d) % G or N % R or tuple(codes0.shape) != (N, K // d, C):
        raise ValueError(f"lowbit.gptq: fit does not match w {list(w.shape)}: codes {list(codes0.shape)}, "
                         f"codebooks {list(codebooks.shape)}")
    if not damp > 0:
        raise ValueError(f"lowbit.gptq: damp must be > 0, got {damp}")
    if beam < 1:
        raise ValueError(f"lowbit.gptq: beam must be >= 1, got {beam}")
    with _one_cpu_thread(w.device):
        codes = _gptq_codebook(w, H, codebooks, scale, rotation, act_order, damp, block_size, beam)
    return fit._replace(codes=codes)


def _gptq_codebook(w, H, codebooks, scale, rotation, act_order, damp, block_size, beam):
    from .codebook.learners import beam_encode

    N, K = w.shape
    R, G, C, E, d = codebooks.shape
    J = K // d
    W = w.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float64).clone()
    if not bool(torch.isfinite(W).all()) or not bool(torch.isfinite(H).all()):
        raise ValueError("lowbit.gptq: w and H must be finite")
    if rotation is not None:
        # W = W_codes @ Rbd and x @ W^T = (x @ Rbd^T) @ W_codes^T: quantize W_codes against the
        # Hessian of the rotated activations.
        Rbd = _block_diag(rotation).to(H.device)
        W = (W.to(torch.float64) @ Rbd.T).to(torch.float32)
        H = Rbd @ H @ Rbd.T
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    order = (torch.argsort(torch.diag(H).reshape(J, d).sum(1), descending=True, stable=True) if act_order
             else torch.arange(J, device=H.device))
    perm = (order.unsqueeze(1) * d + torch.arange(d, device=H.device)).reshape(-1)
    W = W[:, perm]
    Hinv = _inverse_hessian_factor(H[perm][:, perm], damp)

    cb = codebooks.detach().to(torch.float32).to(W.device)
    s = torch.ones(N, device=W.device) if scale is None else scale.detach().to(torch.float32).to(W.device)
    s_safe = torch.where(s != 0, s, torch.ones_like(s))  # a zero-scale row decodes to 0 whatever its code
    rows = N // R
    row_group = torch.arange(N, device=W.device) // rows
    eye = torch.eye(d, device=W.device)
    codes = torch.empty(N, J, C, dtype=torch.int64, device=W.device)
    block_size = max(d, block_size // d * d)
    sub_order = order.tolist()
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(0, i2 - i1, d):
            j = sub_order[(i1 + i) // d]
            g = j // (J // G)
            v = W1[:, i:i + d]
            if d == 1:  # a division, as int GPTQ does: the same float ops give the same codes
                def whiten(t, u=Hinv1[i, i]):
                    return t / u
            else:
                def whiten(t, u_inv=torch.linalg.solve_triangular(Hinv1[i:i + d, i:i + d], eye, upper=True)):
                    return t @ u_inv
            x = whiten(v / s_safe.unsqueeze(1)).reshape(R, rows, d)  # whitened: nearest = least added loss
            cbw = whiten(cb[:, g])  # [R, C, E, d]
            if C == 1:
                c0 = cbw[:, 0]
                score = torch.baddbmm(c0.square().sum(-1).unsqueeze(1), x, c0.transpose(1, 2), alpha=-2.0)
                cj = score.argmin(-1).reshape(N, 1)
            else:
                cj = beam_encode(x, None, cbw, beam)[0].reshape(N, C)
            codes[:, j] = cj
            q = cb[row_group.unsqueeze(1), g, torch.arange(C, device=W.device).unsqueeze(0), cj].sum(1)
            err = whiten(v - q * s.unsqueeze(1))
            W1[:, i + d:] -= err @ Hinv1[i:i + d, i + d:]
            Err1[:, i:i + d] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes


def refit_codebooks(fit, w: torch.Tensor, H: torch.Tensor, *, steps: int = 25, damp: float = 1e-6):
    """`fit` with its codebooks refit (codes fixed) to minimize ``||X (W - W_hat)^T||^2`` for ``H = X^T X / n``.

    :func:`lowbit.quant.codebook.finetune_codebooks` on a square root of H (``X = L^T`` with
    ``L L^T = H``, damped by `damp` * mean(diag H) so the factor exists); never worse than `fit`.
    """
    from .codebook import finetune_codebooks

    Hd = H.detach().to(torch.float64).clone()
    Hd.diagonal().add_(damp * float(Hd.diagonal().mean()) + 1e-30)
    X = torch.linalg.cholesky(Hd).T.to(torch.float32)
    return finetune_codebooks(fit, w.detach().to(torch.float32), X, steps=steps)


def _codebook_fit_of(module):
    """The CodebookFit a :class:`lowbit.nn.CodebookLinear` holds (codes unpacked, codebooks float32)."""
    from .codebook import CodebookFit

    J = module.in_features // module.dim
    codes = codebook_fmt.unpack(module.codes, module.bits, J, module.num_codebooks)
    return CodebookFit(codes, module.codebooks.to(torch.float32), None if module.scale is None else module.scale,
                       None if module.rotation is None else module.rotation)


def _codebook_module(linear: nn.Linear, config: CodebookConfig, importance: torch.Tensor | None):
    from ..nn.codebook import _CODEBOOK_DTYPES, CodebookLinear

    if config.codebook_dtype not in _CODEBOOK_DTYPES:
        raise Unsupported(f"codebook_dtype {config.codebook_dtype!r} is not one of {sorted(_CODEBOOK_DTYPES)}")
    if config.dim is not None and linear.in_features % config.dim:
        raise Unsupported(f"in_features={linear.in_features} is not a multiple of dim={config.dim}")
    kw = {} if importance is None or config.method == "lattice" else {"importance": importance.to(torch.float32)}
    return CodebookLinear.from_float(linear, config.method, config.bits, config.dim,
                                     num_codebooks=config.num_codebooks, groups=config.groups,
                                     codebook_dtype=_CODEBOOK_DTYPES[config.codebook_dtype], **kw)


def codebook_gptq_module(linear: nn.Linear, config: CodebookConfig | str, H: torch.Tensor, *,
                         act_order: bool = False, damp: float = 0.01, block_size: int = 128, beam: int = 8,
                         refit_steps: int = 25, weighted_init: bool = True):
    """``(GPTQ'd CodebookLinear, nearest-code CodebookLinear)`` for `linear` under `config` (a codebook
    config or preset) and input Hessian `H`.

    The codebooks are learned by the config's method (``weighted_init``: importance ``diag(H)``);
    the second module is that fit as the learner leaves it (the baseline), the first has GPTQ's
    codes and, if ``refit_steps`` > 0, codebooks refit to the layer output (stored in the config's
    codebook dtype, like the baseline).
    """
    from ..configs import resolve

    config = resolve(config)
    if not isinstance(config, CodebookConfig):
        raise Unsupported(f"codebook GPTQ needs a CodebookConfig, not {type(config).__name__}")
    Hd = H.detach().to(torch.float64)
    base = _codebook_module(linear, config, torch.diag(Hd) if weighted_init else None)
    w = linear.weight.detach().to(torch.float32)
    fit = gptq_codebook(w, Hd.to(w.device), _codebook_fit_of(base), act_order=act_order, damp=damp,
                        block_size=block_size, beam=beam)
    if refit_steps > 0:
        fit = refit_codebooks(fit, w, Hd.to(w.device), steps=refit_steps)
    new = _codebook_module_like(base, fit)
    return new, base


def _codebook_module_like(base, fit):
    import copy

    new = copy.deepcopy(base)
    new.codes = codebook_fmt.pack(fit.codes, new.bits)
    new.codebooks = fit.codebooks.to(base.codebooks.dtype).contiguous()
    return new


# ----------------------------------------------------------------------------- modules
def _scheme_args(config: Config) -> dict:
    if isinstance(config, Int8Config):
        return {"bits": 8, "symmetric": True, "group_size": None, "scale_dtype": torch.float32}
    if isinstance(config, Int4Config):
        if config.clip_search:
            raise Unsupported("Int4Config(clip_search=True) is a round-to-nearest option; GPTQ takes "
                              "observer='mse' instead")
        if config.scale_dtype is not None and config.scale_dtype not in _SCALE_DTYPES:
            raise Unsupported(f"scale_dtype {config.scale_dtype!r} is not one of {sorted(_SCALE_DTYPES)}")
        return {"bits": 4, "symmetric": config.symmetric, "group_size": config.group_size,
                "scale_dtype": _SCALE_DTYPES[config.scale_dtype or "float32"]}
    raise Unsupported(f"GPTQ makes int8, int4 and codebook weights, not {type(config).__name__}")


def quantized_module(linear: nn.Linear, config: Config, result: GPTQResult) -> nn.Module:
    """The kernel-backed module for `linear` with the GPTQ weight `result` (config: Int8Config / Int4Config)."""
    from ..nn.base import check_float_linear
    from ..nn.int4 import Int4Linear
    from ..nn.int8 import Int8Linear, Int8WeightOnlyLinear

    if isinstance(config, Int8Config):
        cls = Int8WeightOnlyLinear if config.weight_only else Int8Linear
        check_float_linear(linear, max_in_features=cls.max_in_features)
        w = result.int8_weight()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                dtype=linear.weight.dtype)
        m.qweight, m.scale = w.qweight.to(linear.weight.device), w.scale.to(linear.weight.device)
    else:
        check_float_linear(linear)
        w = result.int4_weight()
        sd = _scheme_args(config)["scale_dtype"]
        m = Int4Linear(linear.in_features, linear.out_features, linear.bias is not None, group_size=w.group_size,
                       symmetric=w.symmetric, scale_dtype=sd, device="meta", dtype=linear.weight.dtype)
        dev = linear.weight.device
        m.packed, m.scale = w.packed.to(dev), w.scale.to(sd).to(dev)
        m.zero = None if w.zero is None else w.zero.to(sd).to(dev)
    if linear.bias is not None:
        m.bias = linear.bias.detach().clone()
    m.train(linear.training)
    return m


def gptq(model: nn.Module, config, data: Iterable, *, act_order: bool = False, damp: float = 0.01,
         block_size: int = 128, observer: str = "minmax", num_batches: int | None = None,
         progress: bool = True, codebook_options: dict | None = None) -> nn.Module:
    """Quantize `model`'s Linear layers (in place) with GPTQ on calibration `data`; returns `model`.

    `config`: an int8, int4 or codebook config or preset (``"int4"``, ``"kmeans4"``, ``"pq2"``, ...),
    or a layer-pattern mapping (as :func:`lowbit.quantize`); layers whose config is none of those
    are handed to :func:`lowbit.quantize` unchanged. Batches are fed as by :func:`lowbit.calibrate`.
    `codebook_options` go to :func:`codebook_gptq_module` (``beam``, ``refit_steps``,
    ``weighted_init``). ``model._lowbit_gptq`` gets, per layer, the relative output error on the
    calibration data of GPTQ and of round-to-nearest (for codebooks: the learner's nearest-entry
    codes with the same initial codebooks).
    """
    from ..api import layer_config_resolver, quantize
    from ..calibrate import linear_layers, run_batches
    from ..nn.base import check_parent

    from tqdm.auto import tqdm

    config_for = layer_config_resolver(config)
    targets = {}
    for name, parent, child_name, linear in linear_layers(model):
        cfg = config_for(name)
        if isinstance(cfg, (Int8Config, Int4Config, CodebookConfig)) and \
                id(linear) not in {id(t[2]) for t in targets.values()}:
            targets[name] = (parent, child_name, linear, cfg)
    hessians = {name: Hessian(t[2].in_features, t[2].weight.device) for name, t in targets.items()}
    handles = [t[2].register_forward_pre_hook(lambda m, args, h=hessians[name]: h.add(args[0]))
               for name, t in targets.items()]
    was_training = model.training
    model.eval()
    try:
        run_batches(model, data, num_batches, progress, desc="lowbit gptq: hessians")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    errors = {}
    for name, (parent, child_name, linear, cfg) in tqdm(targets.items(), desc="lowbit gptq", disable=not progress,
                                                         leave=False):
        h = hessians[name]
        if h.n == 0:
            log.warning("lowbit.gptq: %s saw no calibration data; leaving it to round-to-nearest", name)
            continue
        if isinstance(cfg, CodebookConfig):
            try:
                check_parent(parent, child_name)
                new, base = codebook_gptq_module(linear, cfg, h.H, act_order=act_order, damp=damp,
                                                 block_size=block_size, **(codebook_options or {}))
            except Unsupported as e:
                log.warning("lowbit.gptq: %s left to lowbit.quantize: %s", name, e)
                continue
            w32 = linear.weight.detach().to(torch.float32)
            errors[name] = {"gptq": output_error(w32, new.dequantize(torch.float32), h.H),
                            "rtn": output_error(w32, base.dequantize(torch.float32), h.H)}
            for _, p, c, lin in linear_layers(model):
                if lin is linear:
                    setattr(p, c, new)
            continue
        try:
            check_parent(parent, child_name)
            args = _scheme_args(cfg)
            if args["group_size"] is not None and not int4_fmt.valid_group_size(args["group_size"], linear.in_features):
                raise Unsupported(f"group_size {args['group_size']} is not one of {int4_fmt.GROUP_SIZES} or "
                                  f"in_features={linear.in_features}")
            if args["group_size"] is not None and linear.in_features % args["group_size"]:
                raise Unsupported(f"GPTQ needs group_size to divide in_features={linear.in_features}")
            w = linear.weight.detach()
            res = gptq_quantize(w.to(torch.float32), h.H, act_order=act_order, damp=damp, block_size=block_size,
                                observer=observer, **args)
            new = quantized_module(linear, cfg, res)
        except Unsupported as e:
            log.warning("lowbit.gptq: %s left to lowbit.quantize: %s", name, e)
            continue
        rtn = rtn_quantize(w.to(torch.float32), bits=args["bits"], symmetric=args["symmetric"],
                           group_size=args["group_size"], observer=observer)
        w32 = w.to(torch.float32)
        errors[name] = {"gptq": output_error(w32, new.dequantize(torch.float32), h.H),
                        "rtn": output_error(w32, rtn.dequantize(), h.H)}
        for _, p, c, lin in linear_layers(model):
            if lin is linear:
                setattr(p, c, new)
    result = quantize(model, config)
    result._lowbit_gptq = errors
    return result
