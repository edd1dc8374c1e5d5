"""Fake quantizers for the binary, 2:4 sparse and codebook families (QAT -> their kernel modules).

Registered with :func:`lowbit.qat.register_fake_quant` next to int8 / int4 / fp8, so
``lowbit.prepare_qat(model, config)`` -> any training loop -> ``lowbit.convert(model)`` works for
:class:`~lowbit.configs.BinaryConfig`, :class:`~lowbit.configs.Sparse24Config` and
:class:`~lowbit.configs.CodebookConfig` (every method).

Binary (:class:`BinaryWeightFakeQuant`)
    The layer computes what :class:`lowbit.nn.BinaryLinear` / :class:`~lowbit.nn.BinaryConv2d`
    compute, in their order: ``(sign(x) @ sign(w).T) * alpha * beta + bias`` with ``beta`` = mean
    |w| per output channel (carries gradient, as in :class:`lowbit.nn.binary.BinarizedLinear`) and
    ``alpha`` = mean |x| per row from :func:`lowbit.ops.binary_quantize` (a constant to autograd).
    ``sign`` is :func:`lowbit.nn.binary.sign_ste` (clipped STE: gradient 1 where |v| <= 1). The ±1
    products are integers, exact in float32 for K < 2**24, so the converted module's outputs
    equal the fake-quantized layer's **bit for bit** on CPU. With the batch-norm-fused QAT modules
    the sign and beta apply to the folded weight, which is what the converted layer packs.
    ``keep_first_last`` is honoured by :func:`lowbit.prepare_qat` via ``config.excluded_layers``.

2:4 sparse (:class:`Sparse24WeightFakeQuant`)
    Every forward (and :func:`lowbit.convert`) recomputes the magnitude 2:4 mask of the latent
    weight (:func:`lowbit.quant.nm_prune.nm_prune_mask`) until ``freeze_mask_step`` training
    forwards have run (None: never frozen); after that the last mask is kept. The value is the converted layer's weight
    bit for bit (:func:`lowbit.formats.sparse24.from_dense` then ``dense_weight``: float values
    rounded to ``values_dtype``, or int8 values with their per-row scale over the kept entries).
    Gradient: straight through the mask and the rounding to *every* latent weight, plus the
    SR-STE term ``srste_decay * w`` on the pruned ones (Zhou et al., 2021; 0 = plain STE).
    ``values_dtype="int8"`` also fake-quantizes activations per token (W8A8), as the kernel does.
    Set the options with :func:`configure_sparse24`.

Codebook (:class:`CodebookWeightFakeQuant`)
    The codebooks are learned once, at :func:`lowbit.prepare_qat`, by the real learner
    (:func:`lowbit.quant.codebook.scalar_kmeans_quantize` / :func:`~lowbit.quant.codebook.product_quantize`,
    the defaults of :class:`lowbit.nn.CodebookLinear`) and become an ``nn.Parameter`` (float32).
    Every ``reassign_every``-th training forward (default 1) reassigns each latent sub-vector to
    its nearest centroid (Euclidean, within its column group). The value is
    ``centroids[codes]`` with the centroids rounded to ``codebook_dtype`` (as stored by the
    converted layer); gradients: straight through to the latent weights, and to each centroid
    the sum of the gradients of the weights that use it (autograd of the gather). Options:
    :func:`configure_codebook`.

Codebook, OPQ / RQ / AQ / lattice (:class:`GeneralCodebookWeightFakeQuant`)
    The whole format: codebooks ``[R, G, C, E, d]`` learned once at prepare time by the method's
    learner exactly as :meth:`lowbit.nn.CodebookLinear.from_float` runs it (a trainable parameter),
    the per-row scale (lattice) and the OPQ rotation kept fixed. Reassignment (same schedule) maps
    the latent weight into the codebooks' frame (``W @ blockdiag(R)^T``, divided by the row
    scale; both preserve which entry is nearest) and takes the nearest entry (C = 1) or the
    beam search of the learners over the C summed codebooks (beam 5 for RQ, 8 for AQ). The value
    is computed with :func:`lowbit.formats.codebook.dequantize`'s own operations, so the converted
    layer's weight equals it bit for bit; with a rotation the converted layer rotates the
    activations instead, so outputs agree within the rounding of the two association orders.
"""

from __future__ import annotations

import torch
from torch import nn

from ..configs import BinaryConfig, CodebookConfig, Sparse24Config, Unsupported
from ..formats import codebook as cb_fmt
from ..formats import sparse24 as sp_fmt
from ..nn import binary as bin_nn
from ..nn import codebook as cb_nn
from ..nn.sparse24 import _VALUES_DTYPES as _SPARSE_VALUE_DTYPES
from ..nn.sparse24 import Sparse24Linear
from ..quant import nm_prune
from .fake_quant import DynamicActivationFakeQuant, FakeQuantScheme, int8_values, register_fake_quant, ste


# ----------------------------------------------------------------------------- binary
class BinaryWeightFakeQuant(nn.Module):
    """Binarized weights (and activations): see the module docstring.

    :meth:`fake_linear` is the layer's whole computation (QATLinear / QATConv2d call it instead of
    ``F.linear(act(x), fake(w))``, whose different rounding order would not be bit-exact);
    :meth:`forward` gives the fake-quantized weight ``beta * sign(w)`` for inspection.
    """

    def __init__(self, binary_activations: bool):
        super().__init__()
        self.binary_activations = binary_activations

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w32 = w.to(torch.float32)
        return (bin_nn.sign_ste(w32) * w32.abs().mean(dim=1, keepdim=True)).to(w.dtype)

    def fake_linear(self, x: torch.Tensor, w2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, w2d.shape[1])
        w = w2d.to(torch.float32)
        beta = w.abs().mean(dim=1)
        sw = bin_nn.sign_ste(w)
        if self.binary_activations:
            y = bin_nn._scaled(bin_nn.sign_ste(x2.to(torch.float32)) @ sw.T, bin_nn._alpha(x2), beta, bias, x.dtype)
        else:
            y = bin_nn._scaled(x2.to(torch.float32) @ sw.T, None, beta, bias, x.dtype)
        return y.reshape(*x.shape[:-1], w2d.shape[0])

    def quantize_linear(self, linear: nn.Linear, config: BinaryConfig) -> nn.Module:
        return bin_nn.BinaryLinear.from_float(linear, binary_activations=self.binary_activations)

    @torch.no_grad()
    def quantize_conv(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                      config: BinaryConfig) -> nn.Module:
        """A :class:`lowbit.nn.BinaryConv2d` (alpha per output position, like the fake conv) for
        `conv`'s geometry with the given (possibly batch-norm-folded) weight and bias."""
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, bias=bias is not None, device="meta", dtype=weight.dtype)
        plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            plain.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
        return bin_nn.BinaryConv2d.from_float(plain, binary_activations=self.binary_activations)

    def extra_repr(self) -> str:
        return f"binary, binary_activations={self.binary_activations}"


@register_fake_quant(BinaryConfig)
def _binary(config: BinaryConfig, weight: torch.Tensor, learnable: bool) -> FakeQuantScheme:
    if learnable:
        raise ValueError("lowbit.qat: binary weights use beta = mean |w| (the format's scale); learnable "
                         "(LSQ) scales are for int8 and int4")
    if weight.shape[1] >= 2**24:
        raise Unsupported(f"in_features={weight.shape[1]} >= 2**24: ±1 dot products are no longer exact in float32")
    return FakeQuantScheme(BinaryWeightFakeQuant(config.binary_activations))


# ----------------------------------------------------------------------------- 2:4 sparse
class _MaskedSTE(torch.autograd.Function):
    """`value` forward; backward ``grad + decay * pruned * w`` to w (SR-STE; decay 0 = plain STE)."""

    @staticmethod
    def forward(ctx, w, value, pruned, decay):
        ctx.save_for_backward(w, pruned)
        ctx.decay = decay
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        w, pruned = ctx.saved_tensors
        if ctx.decay:
            grad = grad + ctx.decay * pruned.to(grad.dtype) * w.detach()
        return grad, None, None, None


class Sparse24WeightFakeQuant(nn.Module):
    """2:4 mask from the latent weight (recomputed or frozen), values as stored; see the module docstring."""

    def __init__(self, weight: torch.Tensor, values_dtype: torch.dtype | None, n: int = 2, m: int = 4,
                 freeze_mask_step: int | None = None, srste_decay: float = 0.0):
        super().__init__()
        self.values_dtype, self.n, self.m = values_dtype, n, m
        self.freeze_mask_step, self.srste_decay = freeze_mask_step, srste_decay
        self.register_buffer("mask", nm_prune.nm_prune_mask(weight.detach(), n, m))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def frozen(self) -> bool:
        return self.freeze_mask_step is not None and int(self.steps) >= self.freeze_mask_step

    def _values_dtype(self, w: torch.Tensor) -> torch.dtype:
        return self.values_dtype or w.dtype

    @torch.no_grad()
    def current_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The magnitude 2:4 mask of `w`, or the frozen one; kept in the ``mask`` buffer."""
        if not self.frozen:
            self.mask = nm_prune.nm_prune_mask(w.detach(), self.n, self.m)
        return self.mask

    def values(self, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The weight :class:`lowbit.nn.Sparse24Linear` would multiply by, for this mask."""
        q = sp_fmt.from_dense(w.detach(), mask, self._values_dtype(w))
        return sp_fmt.dense_weight(q, torch.float32).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # Recomputed in eval mode too (unless frozen): the mask is a function of the latent weights,
        # so the fake model in eval and the converted one always prune the same entries.
        mask = self.current_mask(w)
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        return _MaskedSTE.apply(w, self.values(w, mask), ~mask, float(self.srste_decay))

    @torch.no_grad()
    def quantize_linear(self, linear: nn.Linear, config: Sparse24Config) -> nn.Module:
        vd = self._values_dtype(linear.weight)
        q = sp_fmt.from_dense(linear.weight.detach(), self.current_mask(linear.weight), vd)
        mod = Sparse24Linear(linear.in_features, linear.out_features, linear.bias is not None, values_dtype=vd,
                             device="meta", dtype=linear.weight.dtype)
        mod.values, mod.meta, mod.scale = q.values, q.meta, q.scale
        if linear.bias is not None:
            mod.bias = linear.bias.detach().clone()
        return mod.train(linear.training)

    def extra_repr(self) -> str:
        return (f"{self.n}:{self.m}, values_dtype={self.values_dtype}, freeze_mask_step={self.freeze_mask_step}, "
                f"srste_decay={self.srste_decay}")


@register_fake_quant(Sparse24Config)
def _sparse24(config: Sparse24Config, weight: torch.Tensor, learnable: bool) -> FakeQuantScheme:
    if learnable:
        raise ValueError("lowbit.qat: 2:4 sparse weights have no learnable scales (int8 values use min-max)")
    if config.m != sp_fmt.GROUP or not 0 < config.n <= sp_fmt.KEEP:
        raise Unsupported(f"{config.n}:{config.m} sparsity does not fit the 2:4 kernels (need m=4, n<=2)")
    vd = None
    if config.values_dtype is not None:
        if config.values_dtype not in _SPARSE_VALUE_DTYPES:
            raise ValueError(f"lowbit.qat: values_dtype {config.values_dtype!r} is not one of "
                             f"{sorted(_SPARSE_VALUE_DTYPES)}")
        vd = _SPARSE_VALUE_DTYPES[config.values_dtype]
    act = None
    if vd == torch.int8:
        act = DynamicActivationFakeQuant(lambda t: int8_values(t, "token"), "int8, per token")
    return FakeQuantScheme(Sparse24WeightFakeQuant(weight, vd, config.n, config.m), act)


# ----------------------------------------------------------------------------- codebook
_QAT_CODEBOOK_METHODS = ("kmeans", "pq")


class _CodebookFakeQuantBase(nn.Module):
    """What both codebook fake quantizers share: every `reassign_every` training steps the codes
    are reassigned to the current float weight (`_reassign`), and the forward returns the
    codebook weight (`values`) with a straight-through gradient to w."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            if int(self.steps) % self.reassign_every == 0 and int(self.steps) > 0:
                self._reassign(w)
            self.steps += 1
        w32 = w.to(torch.float32)
        # value + (w - w) is the value bit for bit; the second term carries the STE gradient to w.
        return (self.values() + (w32 - w32.detach())).to(w.dtype)


class CodebookWeightFakeQuant(_CodebookFakeQuantBase):
    """Trainable centroids + codes reassigned to the nearest centroid; see the module docstring."""

    def __init__(self, weight: torch.Tensor, config: CodebookConfig, reassign_every: int = 1):
        super().__init__()
        from ..quant import codebook as learn  # heavy; import on use, like CodebookLinear

        if config.method not in _QAT_CODEBOOK_METHODS:
            raise ValueError(f"lowbit.qat: CodebookWeightFakeQuant is for {_QAT_CODEBOOK_METHODS}, got "
                             f"{config.method!r} (GeneralCodebookWeightFakeQuant takes the others)")
        if config.codebook_dtype not in cb_nn._CODEBOOK_DTYPES:
            raise ValueError(f"lowbit.qat: codebook_dtype {config.codebook_dtype!r} is not one of "
                             f"{sorted(cb_nn._CODEBOOK_DTYPES)}")
        if config.num_codebooks not in (None, 1):
            raise ValueError(f"lowbit.qat: kmeans / pq use one codebook, got num_codebooks={config.num_codebooks}")
        d0, b0, _ = cb_nn._DEFAULTS[config.method]
        dim = d0 if config.dim is None else config.dim
        bits = b0 if config.bits is None else config.bits
        N, K = weight.shape
        if dim not in cb_fmt.DIMS or K % dim:
            raise Unsupported(f"dim {dim} is not one of {cb_fmt.DIMS} or does not divide in_features={K}")
        J = K // dim
        w = weight.detach().to(torch.float32)
        if config.method == "kmeans":
            if dim != 1 or config.groups not in (None, 1):
                raise Unsupported(f"method 'kmeans' is scalar (dim 1, one group), got dim={dim}, "
                                  f"groups={config.groups}")
            fit = learn.scalar_kmeans_quantize(w, bits)
        else:
            groups = cb_nn._largest_divisor(J, (8, 4, 2, 1)) if config.groups is None else config.groups
            if J % groups:
                raise Unsupported(f"groups={groups} does not divide the {J} sub-vectors per row")
            fit = learn.product_quantize(w, bits, dim, groups=groups)
        self.codebook_dtype = cb_nn._CODEBOOK_DTYPES[config.codebook_dtype]
        self.bits, self.dim, self.in_features = bits, dim, K
        self.reassign_every = reassign_every
        cb = fit.codebooks[0, :, 0]                                     # [G, E, d]
        self.centroids = nn.Parameter(cb.to(torch.float32).clone())
        self.register_buffer("codes", fit.codes[..., 0].clone())        # int64 [N, J]
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        G = cb.shape[0]
        self.register_buffer("group_of", torch.arange(J) // (J // G), persistent=False)
        self._reassign(w)  # codes of the stored (rounded) centroids, as every later step

    def stored_centroids(self) -> torch.Tensor:
        """The centroids as the converted layer stores them (rounded to codebook_dtype), STE to the parameter."""
        c = self.centroids
        return ste(c, c.detach().to(self.codebook_dtype).to(torch.float32))

    @torch.no_grad()
    def _reassign(self, w: torch.Tensor) -> None:
        cb = self.stored_centroids().detach()                                   # [G, E, d]
        N = w.shape[0]
        v = w.detach().to(torch.float32).reshape(N, -1, self.dim)              # [N, J, d]
        J = v.shape[1]
        G = cb.shape[0]
        v = v.reshape(N, G, J // G, self.dim).permute(1, 0, 2, 3).reshape(G, -1, self.dim)  # [G, N*J/G, d]
        codes = torch.empty(v.shape[:2], dtype=torch.int64, device=v.device)
        # Bounded temporaries: about 2**22 distances at a time.
        chunk = max(1, (1 << 22) // (cb.shape[1] * G))
        cb_sq = (cb * cb).sum(-1)                                               # [G, E]
        for i in range(0, v.shape[1], chunk):
            part = v[:, i:i + chunk]
            dist = cb_sq.unsqueeze(1) - 2 * part @ cb.transpose(1, 2)          # |v|^2 omitted: same argmin
            codes[:, i:i + chunk] = dist.argmin(-1)
        self.codes = codes.reshape(G, N, J // G).permute(1, 0, 2).reshape(N, J).contiguous()

    def values(self) -> torch.Tensor:
        """centroids[codes] (with gradient to the centroids), [N, K] float32."""
        cb = self.stored_centroids()
        return cb[self.group_of.unsqueeze(0), self.codes].reshape(self.codes.shape[0], self.in_features)

    @torch.no_grad()
    def quantize_linear(self, linear: nn.Linear, config: CodebookConfig) -> nn.Module:
        G, E, d = self.centroids.shape
        packed = cb_fmt.from_codes(self.codes.unsqueeze(-1), self.centroids.detach().reshape(1, G, 1, E, d),
                                   codebook_dtype=self.codebook_dtype)
        m = cb_nn.CodebookLinear(linear.in_features, linear.out_features, linear.bias is not None, dim=d,
                                 bits=self.bits, num_codebooks=1, groups=G, row_groups=1,
                                 codebook_dtype=self.codebook_dtype, device="meta", dtype=linear.weight.dtype)
        m.codes, m.codebooks, m.scale, m.rotation = packed.packed, packed.codebooks, None, None
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m.train(linear.training)

    def extra_repr(self) -> str:
        G, E, d = self.centroids.shape
        return f"{E} centroids of dim {d} x {G} groups, reassign_every={self.reassign_every}"


_QAT_GENERAL_CODEBOOK_METHODS = ("opq", "rq", "aq", "lattice")
_BEAM = {"rq": 5, "aq": 8}  # the learners' own defaults


class GeneralCodebookWeightFakeQuant(_CodebookFakeQuantBase):
    """OPQ / RQ / AQ / lattice: the whole codebook format, ``[R, G, C, E, d]`` codebooks (trained),
    per-row scale and OPQ rotation (fixed), learned once by the method's learner."""

    def __init__(self, weight: torch.Tensor, config: CodebookConfig, reassign_every: int = 1):
        super().__init__()
        if config.method not in _QAT_GENERAL_CODEBOOK_METHODS:
            raise ValueError(f"lowbit.qat: GeneralCodebookWeightFakeQuant is for {_QAT_GENERAL_CODEBOOK_METHODS}, "
                             f"got {config.method!r}")
        if config.codebook_dtype not in cb_nn._CODEBOOK_DTYPES:
            raise ValueError(f"lowbit.qat: codebook_dtype {config.codebook_dtype!r} is not one of "
                             f"{sorted(cb_nn._CODEBOOK_DTYPES)}")
        N, K = weight.shape
        dim = cb_nn._DEFAULTS[config.method][0] if config.dim is None else config.dim
        if dim not in cb_fmt.DIMS or K % dim:
            raise Unsupported(f"dim {dim} is not one of {cb_fmt.DIMS} or does not divide in_features={K}")
        self.codebook_dtype = cb_nn._CODEBOOK_DTYPES[config.codebook_dtype]
        # The learner, its defaults and checks exactly as lowbit.quantize would run them.
        tmp = nn.Linear(K, N, bias=False, device=weight.device)
        with torch.no_grad():
            tmp.weight.copy_(weight.detach().to(torch.float32))
        m = cb_nn.CodebookLinear.from_float(tmp, config.method, config.bits, config.dim,
                                            num_codebooks=config.num_codebooks, groups=config.groups,
                                            codebook_dtype=self.codebook_dtype)
        self.bits, self.dim, self.in_features = m.bits, m.dim, K
        self.beam = _BEAM.get(config.method, 1)
        self.reassign_every = reassign_every
        self.codebooks = nn.Parameter(m.codebooks.to(torch.float32).clone())          # [R, G, C, E, d]
        self.register_buffer("codes", cb_fmt.unpack(m.codes, m.bits, K // m.dim, m.num_codebooks))  # [N, J, C]
        self.register_buffer("scale", None if m.scale is None else m.scale.to(torch.float32).clone())
        self.register_buffer("rotation", None if m.rotation is None else m.rotation.clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._reassign(weight)

    def stored_codebooks(self) -> torch.Tensor:
        c = self.codebooks
        return ste(c, c.detach().to(self.codebook_dtype).to(torch.float32))

    @torch.no_grad()
    def _reassign(self, w: torch.Tensor) -> None:
        from ..quant.codebook.learners import beam_encode, from_problems, to_problems

        cb = self.stored_codebooks().detach()
        R, G, C, E, d = cb.shape
        N = w.shape[0]
        v = w.detach().to(torch.float32)
        if self.rotation is not None:  # into the codebooks' frame: W_codes = W @ blockdiag(R)^T
            B, b, _ = self.rotation.shape
            v = torch.einsum("nbj,bij->nbi", v.reshape(N, B, b), self.rotation).reshape(N, -1)
        if self.scale is not None:
            v = v / torch.where(self.scale != 0, self.scale, torch.ones_like(self.scale)).unsqueeze(1)
        J = v.shape[1] // d
        x = to_problems(v.reshape(N, J, d), R, G)                       # [R*G, n, d]
        books = cb.reshape(R * G, C, E, d)
        if C == 1:
            codes = torch.empty(x.shape[:2], dtype=torch.int64, device=x.device)
            chunk = max(1, (1 << 22) // (E * R * G))
            sq = books[:, 0].square().sum(-1).unsqueeze(1)              # [B, 1, E]
            for i in range(0, x.shape[1], chunk):
                part = x[:, i:i + chunk]
                codes[:, i:i + chunk] = (sq - 2 * part @ books[:, 0].transpose(1, 2)).argmin(-1)
            codes = codes.unsqueeze(-1)
        else:
            codes = beam_encode(x, None, books, self.beam)[0]
        self.codes = from_problems(codes, N, J, R, G).contiguous()

    def values(self) -> torch.Tensor:
        """The weight in :func:`lowbit.formats.codebook.dequantize`'s own operations (float32 [N, K])."""
        cb = self.stored_codebooks()
        R, G, C, E, d = cb.shape
        N, J, _ = self.codes.shape
        r = (torch.arange(N, device=cb.device) // (N // R)).view(N, 1)
        g = (torch.arange(J, device=cb.device) // (J // G)).view(1, J)
        w = torch.zeros((N, J, d), dtype=torch.float32, device=cb.device)
        for c in range(C):
            w = w + cb[r, g, c, self.codes[:, :, c]]
        w = w.reshape(N, J * d)
        if self.scale is not None:
            w = w * self.scale.unsqueeze(1)
        if self.rotation is not None:
            B, b, _ = self.rotation.shape
            w = torch.einsum("nbi,bij->nbj", w.reshape(-1, B, b), self.rotation).reshape(w.shape)
        return w

    @torch.no_grad()
    def quantize_linear(self, linear: nn.Linear, config: CodebookConfig) -> nn.Module:
        R, G, C, E, d = self.codebooks.shape
        packed = cb_fmt.from_codes(self.codes, self.codebooks.detach(), self.scale, self.rotation,
                                   codebook_dtype=self.codebook_dtype)
        m = cb_nn.CodebookLinear(linear.in_features, linear.out_features, linear.bias is not None, dim=d,
                                 bits=self.bits, num_codebooks=C, groups=G, row_groups=R,
                                 has_scale=self.scale is not None,
                                 rotation_block=0 if self.rotation is None else self.rotation.shape[1],
                                 codebook_dtype=self.codebook_dtype, device="meta", dtype=linear.weight.dtype)
        m.codes, m.codebooks = packed.packed, packed.codebooks
        m.scale = None if self.scale is None else self.scale.clone()
        m.rotation = None if self.rotation is None else self.rotation.clone()
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m.train(linear.training)

    def extra_repr(self) -> str:
        R, G, C, E, d = self.codebooks.shape
        return (f"{C} x {E} entries of dim {d}, {G} groups x {R} row groups, scale={self.scale is not None}, "
                f"rotation={self.rotation is not None}, reassign_every={self.reassign_every}")


@register_fake_quant(CodebookConfig)
def _codebook(config: CodebookConfig, weight: torch.Tensor, learnable: bool) -> FakeQuantScheme:
    # The centroids are always trained; learnable_scales has nothing more to add.
    if config.method in _QAT_GENERAL_CODEBOOK_METHODS:
        return FakeQuantScheme(GeneralCodebookWeightFakeQuant(weight, config))
    return FakeQuantScheme(CodebookWeightFakeQuant(weight, config))


# ----------------------------------------------------------------------------- options
def _quantizers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def configure_sparse24(model: nn.Module, freeze_mask_step: int | None = None, srste_decay: float = 0.0) -> int:
    """Set the 2:4 QAT options of every sparse fake quantizer in `model` (after prepare_qat):
    `freeze_mask_step` training forwards recompute the mask, later ones keep it (None: always
    recomputed); `srste_decay` adds ``decay * w`` to the gradient of pruned weights. Returns how many."""
    qs = _quantizers(model, Sparse24WeightFakeQuant)
    for q in qs:
        q.freeze_mask_step, q.srste_decay = freeze_mask_step, float(srste_decay)
    return len(qs)


def configure_codebook(model: nn.Module, reassign_every: int = 1) -> int:
    """Reassign codes every `reassign_every` training forwards (1: each step). Returns how many quantizers."""
    if reassign_every < 1:
        raise ValueError(f"lowbit.qat.configure_codebook: reassign_every must be >= 1, got {reassign_every}")
    qs = _quantizers(model, CodebookWeightFakeQuant) + _quantizers(model, GeneralCodebookWeightFakeQuant)
    for q in qs:
        q.reassign_every = reassign_every
    return len(qs)
