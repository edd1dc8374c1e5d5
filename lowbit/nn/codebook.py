"""Codebook-quantized linear (weight format: :mod:`lowbit.formats.codebook`).

:class:`CodebookLinear` keeps packed codes, codebooks ``[R, G, C, 2**bits, d]``, an optional
per-output-channel scale and, for OPQ, a block-diagonal rotation applied to the activations,
and runs :func:`lowbit.ops.codebook_mm`, which decodes the weight inside the kernel. The
codebooks are learned by :mod:`lowbit.quant.codebook` (k-means, PQ, OPQ, RQ, AQ, lattice).
Presets ``"kmeans4"``, ``"kmeans3"``, ``"pq2"``, ``"aq2"``, ``"lattice"``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..configs import CodebookConfig, Unsupported, register_handler
from ..formats import codebook as fmt
from .base import QuantizedLinear, check_float_linear

METHODS = ("kmeans", "pq", "opq", "rq", "aq", "lattice")
_CODEBOOK_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Per method: (dim, bits, num_codebooks) when not given. kmeans: 4-bit scalar; pq/opq: 256
# entries of 4 weights (2 bits/weight); rq/aq: two 256-entry codebooks of 8 weights (AQLM's
# 2x8, 2 bits/weight); lattice: the 256 D4 points nearest the origin (2 bits/weight).
_DEFAULTS = {"kmeans": (1, 4, 1), "pq": (4, 8, 1), "opq": (4, 8, 1), "rq": (8, 8, 2), "aq": (8, 8, 2),
             "lattice": (4, 8, 1)}


def _largest_divisor(n: int, candidates) -> int:
    return next(c for c in candidates if n % c == 0)


class CodebookLinear(QuantizedLinear):
    """Weight-only codebook linear: float activations x codebook-decoded weights, float32 accumulation."""

    scheme = "codebook"
    # The learned codebooks/scales/rotation keep their precision under model.half(): rounding them
    # would add error on top of the quantization's, and the rotation must stay float32.
    float32_buffers = ("codebooks", "scale", "rotation")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dim: int = 1, bits: int = 4,
                 num_codebooks: int = 1, groups: int = 1, row_groups: int = 1, has_scale: bool = False,
                 rotation_block: int = 0, codebook_dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(in_features, out_features, dtype)
        if dim not in fmt.DIMS or in_features % dim:
            raise ValueError(f"lowbit CodebookLinear: dim must be one of {fmt.DIMS} and divide "
                             f"in_features={in_features}, got {dim}")
        J = in_features // dim
        if not 1 <= bits <= fmt.MAX_BITS or num_codebooks < 1 or groups < 1 or J % groups or row_groups < 1 \
                or out_features % row_groups:
            raise ValueError(f"lowbit CodebookLinear: invalid bits={bits}, num_codebooks={num_codebooks}, "
                             f"groups={groups} (must divide {J}) or row_groups={row_groups} (must divide "
                             f"{out_features})")
        if rotation_block and (in_features % rotation_block or rotation_block % dim):
            raise ValueError(f"lowbit CodebookLinear: rotation_block={rotation_block} must divide "
                             f"in_features={in_features} and be a multiple of dim={dim}")
        self.dim, self.bits, self.num_codebooks = dim, bits, num_codebooks
        self.groups, self.row_groups, self.rotation_block = groups, row_groups, rotation_block
        self.register_buffer("codes", torch.zeros(out_features, fmt.row_bytes(J * num_codebooks, bits),
                                                  dtype=torch.uint8, device=device))
        self.register_buffer("codebooks", torch.zeros(row_groups, groups, num_codebooks, 2**bits, dim,
                                                      dtype=codebook_dtype, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device)
                             if has_scale else None)
        self.register_buffer("rotation", torch.eye(rotation_block, device=device).expand(
            in_features // rotation_block, rotation_block, rotation_block).contiguous() if rotation_block else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, method: str = "kmeans", bits: int | None = None, dim: int | None = None,
                   *, num_codebooks: int | None = None, groups: int | None = None, row_groups: int = 1,
                   codebook_dtype: torch.dtype = torch.float16, importance: torch.Tensor | None = None,
                   seed: int = 0, progress: bool = False, **learner_options):
        """Learn codebooks for `linear`'s weight with `method` and pack them.

        `bits` is bits per code (2**bits entries per codebook), `dim` the sub-vector length, so a
        weight costs ``bits * num_codebooks / dim`` bits plus the codebooks. `groups` column groups
        along K each get their own codebooks (default: up to 8 for pq/opq, else 1); `importance`
        [in_features] weights the error per input column (e.g. E[x_k^2] from calibration data).
        Extra keyword arguments go to the learner (iters, beam, block, ...).
        """
        from ..quant import codebook as learn  # the learners are heavy; import on use

        check_float_linear(linear)
        if method not in METHODS:
            raise Unsupported(f"method {method!r} is not one of {METHODS}")
        d0, b0, c0 = _DEFAULTS[method]
        dim = d0 if dim is None else dim
        bits = b0 if bits is None else bits
        C = c0 if num_codebooks is None else num_codebooks
        K, N = linear.in_features, linear.out_features
        if dim not in fmt.DIMS or K % dim:
            raise Unsupported(f"dim {dim} is not one of {fmt.DIMS} or does not divide in_features={K}")
        J = K // dim
        if groups is None:
            groups = _largest_divisor(J, (8, 4, 2, 1)) if method in ("pq", "opq") else 1
        if N % row_groups:
            raise Unsupported(f"row_groups={row_groups} does not divide out_features={N}")
        common = dict(importance=importance, seed=seed, progress=progress)
        w = linear.weight.detach()
        with torch.no_grad():
            if method == "kmeans":
                if dim != 1:
                    raise Unsupported(f"method 'kmeans' is scalar (dim 1), got dim={dim}")
                fit = learn.scalar_kmeans_quantize(w, bits, row_groups=row_groups, **common, **learner_options)
            elif method == "pq":
                fit = learn.product_quantize(w, bits, dim, groups=groups, row_groups=row_groups, **common,
                                             **learner_options)
            elif method == "opq":
                block = learner_options.pop("block", _largest_divisor(K, [b for b in (128, 64, 32, 16, 8, dim)
                                                                         if b % dim == 0]))
                fit = learn.optimized_product_quantize(w, bits, dim, groups=groups, row_groups=row_groups,
                                                       block=block, **common, **learner_options)
            elif method == "rq":
                fit = learn.residual_quantize(w, bits, dim, C, groups=groups, row_groups=row_groups, **common,
                                              **learner_options)
            elif method == "aq":
                fit = learn.additive_quantize(w, bits, dim, C, groups=groups, row_groups=row_groups, **common,
                                              **learner_options)
            else:
                from ..quant.codebook.lattice import lattice_quantize
                if dim not in (4, 8):
                    raise Unsupported(f"method 'lattice' needs dim 4 (D4) or 8 (E8), got {dim}")
                fit = lattice_quantize(w, bits, dim, seed=seed, **learner_options)
            packed = fmt.from_codes(fit.codes, fit.codebooks, fit.scale, fit.rotation, codebook_dtype=codebook_dtype)
            R, G, Cf, _, _ = packed.codebooks.shape
            rot = packed.rotation
            m = cls(K, N, linear.bias is not None, dim=dim, bits=bits, num_codebooks=Cf, groups=G, row_groups=R,
                    has_scale=packed.scale is not None, rotation_block=0 if rot is None else rot.shape[1],
                    codebook_dtype=codebook_dtype, device="meta", dtype=linear.weight.dtype)
            m.codes, m.codebooks = packed.packed, packed.codebooks
            m.scale = None if packed.scale is None else packed.scale.to(torch.float32).contiguous()
            m.rotation = None if rot is None else rot.to(torch.float32).contiguous()
            if linear.bias is not None:
                m.bias = linear.bias.detach().clone()
        m.train(linear.training)
        return m

    def quantized_weight(self) -> fmt.CodebookWeight:
        return fmt.CodebookWeight(self.codes, self.codebooks, self.scale, self.rotation, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float [N, K] weight this layer computes with (for inspection and debugging)."""
        return fmt.dequantize(self.quantized_weight()).to(dtype or self.orig_dtype)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", dim={self.dim}, bits={self.bits}, num_codebooks={self.num_codebooks}, "
                f"groups={self.groups}, row_groups={self.row_groups}, rotation_block={self.rotation_block}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map_rows(x, self._matmul)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            # x @ W.T = (x @ blockdiag(R).T) @ W_codes.T; the rotated activations stay float32.
            return ops.codebook_mm(fmt.apply_rotation(x2, self.rotation), self.codes, self.codebooks, self.scale,
                                   self.bias).to(x2.dtype)
        return ops.codebook_mm(x2, self.codes, self.codebooks, self.scale, self.bias)


@register_handler(CodebookConfig)
def _convert(linear: nn.Linear, config: CodebookConfig) -> nn.Module:
    if config.codebook_dtype not in _CODEBOOK_DTYPES:
        raise Unsupported(f"codebook_dtype {config.codebook_dtype!r} is not one of {sorted(_CODEBOOK_DTYPES)}")
    K = linear.in_features if isinstance(linear, nn.Linear) else None
    dim = config.dim
    if K is not None and dim is not None and K % dim:
        raise Unsupported(f"in_features={K} is not a multiple of dim={dim}")
    return CodebookLinear.from_float(linear, config.method, config.bits, dim, num_codebooks=config.num_codebooks,
                                     groups=config.groups, codebook_dtype=_CODEBOOK_DTYPES[config.codebook_dtype])
