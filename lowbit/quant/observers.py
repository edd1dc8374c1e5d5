"""Observers: choose a quantization range from data, and hand it over in the lowbit formats' forms.

An observer is fed tensors (calibration activations, or a weight once) with :meth:`Observer.observe`
and then gives

* :meth:`Observer.qparams` -- :class:`lowbit.quant.affine.AffineParams` (int grids; the scale and
  zero-point rule is :func:`lowbit.quant.affine.params_from_range`, not repeated here);
* :meth:`Observer.fp8_scale` -- the float32 fp8 scale ``amax / fmax`` that
  :func:`lowbit.ops.fp8_quantize_static` and :class:`lowbit.nn.FP8Linear` take.

:func:`int8_weight`, :func:`int4_weight` and :func:`int8_act_scale` turn parameters into exactly
what :mod:`lowbit.formats.int8`, :mod:`lowbit.formats.int4` and the int8 ops take.

Granularity follows :mod:`lowbit.quant.affine` (scales along the last dimension): ``"tensor"``
(static activations), ``"channel"`` (a row of an [N, K] weight), ``"group"`` (``group_size``
consecutive elements of a row). Each call to ``observe`` adds samples to the *same* groups, so
for ``"channel"``/``"group"`` every call must have the same leading shape.

How each observer picks the range [lo, hi] of a group:

* :class:`MinMaxObserver`: the running min and max of everything seen.
* :class:`MovingAverageMinMaxObserver`: an exponential moving average of each call's min and max
  (``lo <- lo + c * (min - lo)``), which forgets rare outlier batches.
* :class:`PercentileObserver`: the ``percentile``-th largest value (and ``100 - percentile``-th
  smallest; for symmetric grids the percentile of ``|x|``) of the retained samples.
* :class:`MSEObserver`: the min-max range shrunk by the ratio (from ``ratios``, 1.0 always
  included) that minimizes the squared quantize-dequantize error of the retained samples; it is
  never worse than min-max on them.

Percentile and MSE keep samples: all of them for ``"channel"``/``"group"`` (weights, observed
once), and for ``"tensor"`` a uniform random subsample of at most ``max_samples`` values (seeded, so
calibration is reproducible; each call is subsampled to ``max_samples``, and the union again).
"""

from __future__ import annotations

import torch

from ..backends.reference import fp8 as fp8_ref
from ..formats import int4 as int4_fmt
from ..formats import int8 as int8_fmt
from . import affine

FP8_FORMATS = tuple(fp8_ref.FMAX)


class Observer:
    """Base: granularity handling and the conversions; subclasses decide the range."""

    def __init__(self, bits: int = 8, *, symmetric: bool = True, granularity: str = "tensor",
                 group_size: int | None = None):
        affine.qrange(bits, symmetric)  # validates bits
        if granularity not in affine.GRANULARITIES:
            raise ValueError(f"lowbit observer: granularity must be one of {affine.GRANULARITIES}, got {granularity!r}")
        if granularity == "group" and (group_size is None or group_size <= 0):
            raise ValueError(f"lowbit observer: granularity='group' needs a positive group_size, got {group_size}")
        self.bits, self.symmetric, self.granularity, self.group_size = bits, symmetric, granularity, group_size
        self.lo: torch.Tensor | None = None  # float32, shaped like the scale
        self.hi: torch.Tensor | None = None
        self.num_observed = 0

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bits={self.bits}, symmetric={self.symmetric}, "
                f"granularity={self.granularity!r}, group_size={self.group_size}, calls={self.num_observed})")

    # -- the data, grouped so that each scale covers the last dimension
    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"lowbit observer: x must be a floating-point tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        g = affine._grouped(x.detach(), self.granularity, self.group_size).to(torch.float32)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("lowbit observer: x has inf or NaN values, which no quantization range can cover")
        if self.lo is not None and g.shape[:-1] != self.lo.shape:
            raise ValueError(f"lowbit observer: x groups as {list(g.shape[:-1])} but earlier calls grouped as "
                             f"{list(self.lo.shape)} (granularity {self.granularity!r} needs the same leading shape)")
        return g

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """Record `x`; returns `x` unchanged (so an observer can sit in a forward hook)."""
        g = self._groups(x)
        self._update(g)
        self.num_observed += 1
        return x

    __call__ = observe

    def _update(self, g: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) per scale, float32."""
        if self.lo is None:
            raise RuntimeError(f"lowbit {type(self).__name__}: nothing observed yet; call observe() first")
        return self.lo, self.hi

    # -- outputs
    def _scale_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        if self.granularity == "tensor":  # grouped as one row internally; the scale is a scalar
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def qparams(self) -> affine.AffineParams:
        lo, hi = self._scale_range()
        return affine.params_from_range(lo, hi, self.bits, symmetric=self.symmetric,
                                        granularity=self.granularity, group_size=self.group_size)

    def fp8_scale(self, format: str = "e4m3") -> torch.Tensor:
        """float32 ``amax / fmax`` per scale (1.0 where the range is all zero): fp8's scale rule."""
        if format not in FP8_FORMATS:
            raise ValueError(f"lowbit observer: format must be one of {FP8_FORMATS}, got {format!r}")
        lo, hi = self._scale_range()
        amax = torch.maximum(lo.abs(), hi.abs())
        return torch.where(amax > 0, amax / torch.full_like(amax, fp8_ref.FMAX[format]), torch.ones_like(amax))


class MinMaxObserver(Observer):
    def _update(self, g):
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)


class MovingAverageMinMaxObserver(Observer):
    def __init__(self, bits: int = 8, *, averaging_constant: float = 0.01, **kwargs):
        super().__init__(bits, **kwargs)
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"lowbit observer: averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def _update(self, g):
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.averaging_constant
            self.lo, self.hi = self.lo + c * (lo - self.lo), self.hi + c * (hi - self.hi)


class _SamplingObserver(Observer):
    """Keeps the samples (subsampled for per-tensor) and the exact running min/max."""

    def __init__(self, bits: int = 8, *, max_samples: int = 2**16, seed: int = 0, **kwargs):
        super().__init__(bits, **kwargs)
        if max_samples <= 0:
            raise ValueError(f"lowbit observer: max_samples must be positive, got {max_samples}")
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._samples: list[torch.Tensor] = []
        self._range: tuple[torch.Tensor, torch.Tensor] | None = None

    def _update(self, g):
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.granularity == "tensor" and g.shape[-1] > self.max_samples:
            idx = torch.randperm(g.shape[-1], generator=self._gen)[: self.max_samples].to(g.device)
            g = g[..., idx]
        self._samples.append(g)
        self._range = None

    def samples(self) -> torch.Tensor:
        s = torch.cat(self._samples, dim=-1)
        if self.granularity == "tensor" and s.shape[-1] > self.max_samples:
            # Calls were thinned to max_samples each, so one large batch weighs no more than that.
            idx = torch.randperm(s.shape[-1], generator=self._gen)[: self.max_samples].to(s.device)
            s = s[..., idx]
            self._samples = [s]
        return s

    def range(self):
        super().range()
        if self._range is None:
            self._range = self._choose(self.samples())
        return self._range

    def _choose(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PercentileObserver(_SamplingObserver):
    def __init__(self, bits: int = 8, *, percentile: float = 99.99, **kwargs):
        super().__init__(bits, **kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"lowbit observer: percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _kth(self, s: torch.Tensor, largest: bool) -> torch.Tensor:
        # kthvalue instead of torch.quantile: no size limit, and the result is a sample value.
        n = s.shape[-1]
        k = min(n, max(1, int(round(n * self.percentile / 100.0))))
        return torch.kthvalue(s if largest else -s, k, dim=-1).values * (1 if largest else -1)

    def _choose(self, s):
        if self.symmetric:
            amax = self._kth(s.abs(), True)
            return -amax, amax
        return self._kth(s, False), self._kth(s, True)


class MSEObserver(_SamplingObserver):
    """Searches clipping ratios; ``fp8_format`` set: the error is measured on the fp8 grid instead."""

    def __init__(self, bits: int = 8, *, ratios: tuple[float, ...] = tuple(1.0 - 0.02 * i for i in range(40)),
                 fp8_format: str | None = None, **kwargs):
        super().__init__(bits, **kwargs)
        if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"lowbit observer: ratios must be non-empty and in (0, 1], got {ratios}")
        if fp8_format is not None and fp8_format not in FP8_FORMATS:
            raise ValueError(f"lowbit observer: fp8_format must be one of {FP8_FORMATS}, got {fp8_format!r}")
        self.ratios = tuple(sorted(set(ratios) | {1.0}, reverse=True))
        self.fp8_format = fp8_format

    def _roundtrip(self, s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if self.fp8_format is not None:
            amax = torch.maximum(lo.abs(), hi.abs())
            fmax = fp8_ref.FMAX[self.fp8_format]
            scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).unsqueeze(-1)
            q = (s / scale).clamp(-fmax, fmax).to(fp8_ref.FP8_FORMATS[self.fp8_format])
            return q.to(torch.float32) * scale
        p = affine.params_from_range(lo, hi, self.bits, symmetric=self.symmetric, granularity="channel")
        return affine.dequantize(affine.quantize(s, p), p)

    def _choose(self, s):
        lo0, hi0 = s.amin(dim=-1), s.amax(dim=-1)
        best = None
        for r in self.ratios:
            lo, hi = lo0 * r, hi0 * r
            err = (self._roundtrip(s, lo, hi) - s).pow(2).sum(dim=-1)
            if best is None:
                best = [err, lo, hi]
            else:
                better = err < best[0]
                best = [torch.where(better, err, best[0]), torch.where(better, lo, best[1]),
                        torch.where(better, hi, best[2])]
        return best[1], best[2]


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
             "percentile": PercentileObserver, "mse": MSEObserver}


def make_observer(kind: str | Observer, bits: int = 8, **kwargs) -> Observer:
    """An observer by name (:data:`OBSERVERS`), or `kind` itself when it is already one."""
    if isinstance(kind, Observer):
        return kind
    if kind not in OBSERVERS:
        raise ValueError(f"lowbit observer: kind must be one of {sorted(OBSERVERS)}, got {kind!r}")
    return OBSERVERS[kind](bits, **kwargs)


# ----------------------------------------------------------------------------- into the formats
def int8_act_scale(p: affine.AffineParams) -> torch.Tensor:
    """The float32 scalar scale :func:`lowbit.ops.int8_quantize_static` and ``int8_scaled_mm`` take."""
    if p.bits != 8 or not p.symmetric or p.granularity != "tensor":
        raise ValueError(f"lowbit observer: a static int8 activation scale is 8-bit symmetric per-tensor, "
                         f"got bits={p.bits} symmetric={p.symmetric} granularity={p.granularity!r}")
    return p.scale.to(torch.float32).reshape(())


def int8_weight(w: torch.Tensor, p: affine.AffineParams) -> int8_fmt.Int8Weight:
    """`w` [N, K] quantized with `p` (8-bit symmetric, per channel or per tensor) as an Int8Weight."""
    if w.dim() != 2 or p.bits != 8 or not p.symmetric or p.granularity not in ("channel", "tensor"):
        raise ValueError(f"lowbit observer: int8 weights are 2-D, 8-bit symmetric, per channel (or per tensor), "
                         f"got shape {list(w.shape)} bits={p.bits} symmetric={p.symmetric} "
                         f"granularity={p.granularity!r}")
    q = affine.quantize(w, p)
    scale = p.scale.to(torch.float32).expand(w.shape[0]) if p.granularity == "tensor" else p.scale
    return int8_fmt.Int8Weight(q.contiguous(), scale.to(torch.float32).contiguous())


def int4_group_size(p: affine.AffineParams, K: int) -> int:
    """The int4 format's group size for `p` over a K-wide weight (checks that `p` fits the format)."""
    if p.bits != 4 or p.granularity not in ("channel", "group"):
        raise ValueError(f"lowbit observer: int4 weights are 4-bit per group or per channel, got bits={p.bits} "
                         f"granularity={p.granularity!r}")
    group_size = K if p.granularity == "channel" else p.group_size
    if not int4_fmt.valid_group_size(group_size, K):
        raise ValueError(f"lowbit observer: int4 group_size must be one of {int4_fmt.GROUP_SIZES} or K={K}, "
                         f"got {group_size}")
    return group_size


def int4_from_codes(q: torch.Tensor, p: affine.AffineParams) -> int4_fmt.Int4Weight:
    """Affine codes `q` [N, K] (from :func:`lowbit.quant.affine.quantize` with 4-bit `p`) as an Int4Weight."""
    N, K = q.shape
    group_size = int4_group_size(p, K)
    scale = p.scale.reshape(N, -1).to(torch.float32)
    if p.symmetric:  # signed codes in [-7, 7] are stored offset by the format's implicit zero 8
        u, zero = (q.to(torch.int16) + int4_fmt.SYMMETRIC_ZERO).to(torch.uint8), None
    else:
        u, zero = q.to(torch.uint8), p.zero_point.reshape(N, -1).to(torch.float32).contiguous()
    return int4_fmt.Int4Weight(int4_fmt.pack(u), scale.contiguous(), zero, K, group_size)


def int4_weight(w: torch.Tensor, p: affine.AffineParams) -> int4_fmt.Int4Weight:
    """`w` [N, K] quantized with `p` (4-bit, per group or per channel) as an Int4Weight."""
    if w.dim() != 2:
        raise ValueError(f"lowbit observer: int4 weights are 2-D [N, K], got shape {list(w.shape)}")
    int4_group_size(p, w.shape[1])
    return int4_from_codes(affine.quantize(w, p), p)
