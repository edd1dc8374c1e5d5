"""Quantization configs: one versioned dataclass per scheme, a handler per config type, presets.

A config says *what* to do to a layer; its handler (registered by the family's module file,
e.g. :mod:`lowbit.nn.int8`) does it::

    @register_handler(Int8Config)
    def _int8(linear: nn.Linear, config: Int8Config) -> nn.Module: ...

A handler returns the replacement module, or raises :class:`Unsupported` with a reason that
:func:`lowbit.quantize` logs and records. Adding a family = a config class here, its presets in
:data:`PRESETS`, and a handler next to its module.

``VERSION`` is bumped whenever a field changes meaning, so a saved config (:meth:`Config.to_dict`)
can be recognised and migrated instead of silently reinterpreted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import nn


class Unsupported(ValueError):
    """This layer cannot be converted by this config; the message says why."""


@dataclass(frozen=True)
class Config:
    """Base of every quantization config."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "version": self.VERSION, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> Config:
        d = dict(d)
        name, version = d.pop("type"), d.pop("version")
        cls = _CONFIG_TYPES.get(name)
        if cls is None:
            raise ValueError(f"lowbit.configs: unknown config type {name!r}; known: {sorted(_CONFIG_TYPES)}")
        if version != cls.VERSION:
            raise ValueError(f"lowbit.configs: {name} version {version} cannot be read by this lowbit "
                             f"(which writes version {cls.VERSION})")
        return cls(**d)


@dataclass(frozen=True)
class Int8Config(Config):
    """Symmetric int8 weights, one scale per output channel (:mod:`lowbit.formats.int8`).

    ``weight_only=False``: W8A8, activations quantized per token at run time, int8 x int8 GEMM
    (compute-bound layers, large batches). ``weight_only=True``: float activations times int8
    weights dequantized in the kernel (memory-bound decoding; no activation error).
    """

    VERSION: ClassVar[int] = 1
    weight_only: bool = False


@dataclass(frozen=True)
class Int4Config(Config):
    """Group-wise int4 weights, float activations (W4A16; :mod:`lowbit.formats.int4`).

    ``group_size``: 32, 64, 128, or ``None`` for one group per output channel (group = K).
    ``symmetric=False`` stores a zero point per group (better for skewed groups).
    ``clip_search=True`` picks each group's clipping ratio to minimize its reconstruction error.
    ``scale_dtype``: float32/float16/bfloat16 for scales and zeros; None = the layer's dtype.
    """

    VERSION: ClassVar[int] = 1
    group_size: int | None = 128
    symmetric: bool = False
    clip_search: bool = False
    scale_dtype: str | None = None


@dataclass(frozen=True)
class FP8Config(Config):
    """FP8 weights (:mod:`lowbit.formats.fp8`), activations quantized to fp8 at run time.

    ``format``: ``"e4m3"`` (precision, max 448) or ``"e5m2"`` (range, max 57344).
    ``granularity``: ``"row"`` (per output channel; activations per token), ``"tensor"``, or
    ``"block"`` (128x128 weight tiles, 1x128 activation blocks; DeepSeek-V3 style).
    ``weight_only=True``: float activations times fp8 weights decoded in the kernel.
    Activation scales are dynamic (amax per token / block / tensor); static calibrated scales
    are set per layer on :class:`lowbit.nn.FP8Linear`.
    """

    VERSION: ClassVar[int] = 1
    format: str = "e4m3"
    granularity: str = "row"
    weight_only: bool = False


# ---- binary
@dataclass(frozen=True)
class BinaryConfig(Config):
    """±1 weights packed 32 per word, one float32 scale (mean |w|) per channel (:mod:`lowbit.formats.binary`).

    ``binary_activations=True``: XNOR-Net layers, activations binarized per row at run time
    (scale mean |x|) and an XNOR-popcount GEMM. ``False``: float activations times ±1 weights.
    ``keep_first_last=True``: the first and last nn.Linear of the model (in module order) stay
    float, as binarized networks conventionally keep them (:func:`lowbit.quantize` asks
    :meth:`excluded_layers`).
    """

    VERSION: ClassVar[int] = 1
    binary_activations: bool = True
    keep_first_last: bool = True

    def excluded_layers(self, model: nn.Module) -> set[str]:
        """Names of the layers this config keeps float whatever `filter_fn` says."""
        if not self.keep_first_last:
            return set()
        # The layers lowbit.quantize converts, in definition order: a CNN's first layer is a conv.
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        return {names[0], names[-1]} if names else set()



# ---- sparse24
@dataclass(frozen=True)
class Sparse24Config(Config):
    """2:4 structured sparsity (:mod:`lowbit.formats.sparse24`): magnitude N:M pruning along K,
    compressed values + 2-bit metadata, sparse kernels.

    ``values_dtype``: None = the layer's dtype (float activations, :func:`lowbit.ops.sparse24_mm`);
    ``"int8"`` = 2:4 + INT8, W8A8 with per-token activations and exact int32 accumulation
    (:func:`lowbit.ops.sparse24_int8_scaled_mm`); or ``"float16"``/``"bfloat16"``/``"float32"``.
    ``n``/``m``: kept per group (n <= 2 of m = 4: the kernels' 2:4 pattern; 1:4 is stored as 2:4).
    Calibration-based pruning and least-squares recovery need activations: use
    :meth:`lowbit.nn.Sparse24Linear.from_float` per layer.
    """

    VERSION: ClassVar[int] = 1
    values_dtype: str | None = None
    n: int = 2
    m: int = 4


_CONFIG_TYPES: dict[str, type[Config]] = {c.__name__: c for c in (Int8Config, Int4Config, FP8Config,
                                                                  Sparse24Config)}
_CONFIG_TYPES[BinaryConfig.__name__] = BinaryConfig


# ---- codebook
@dataclass(frozen=True)
class CodebookConfig(Config):
    """Codebook-quantized weights, float activations (:mod:`lowbit.formats.codebook`).

    ``method``: ``"kmeans"`` (scalar k-means weight sharing), ``"pq"`` (product quantization),
    ``"opq"`` (PQ after a learned block-diagonal rotation), ``"rq"`` (residual), ``"aq"`` (additive,
    codes chosen jointly) or ``"lattice"`` (training-free D4/E8 points). ``bits`` per code (2**bits
    entries per codebook), ``dim`` weights per code, ``num_codebooks`` summed codebooks (rq/aq):
    ``bits * num_codebooks / dim`` bits per weight plus the codebooks. None = the method's default
    (lowbit.nn.codebook). ``groups``: column groups with their own codebooks (None = default).
    """

    VERSION: ClassVar[int] = 1
    method: str = "kmeans"
    bits: int | None = None
    dim: int | None = None
    num_codebooks: int | None = None
    groups: int | None = None
    codebook_dtype: str = "float16"


_CONFIG_TYPES[CodebookConfig.__name__] = CodebookConfig

Handler = Callable[[nn.Linear, Config], nn.Module]
_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type[Config]):
    """Decorator: `fn(linear, config) -> module` converts layers for configs of `config_type`."""

    def decorate(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        _CONFIG_TYPES.setdefault(config_type.__name__, config_type)
        return fn

    return decorate


# Families with a convolution module of their own (e.g. BinaryConv2d, whose scale is per output
# position) register it here; other families' Conv2d layers go through QuantizedConv2d, which
# lowers the convolution to the family's quantized Linear.
_CONV_HANDLERS: dict[type, Callable[[nn.Module, Config], nn.Module]] = {}


def register_conv_handler(config_type: type[Config]):
    """Decorator: `fn(conv2d, config) -> module` converts Conv2d layers for configs of `config_type`."""

    def decorate(fn):
        _CONV_HANDLERS[config_type] = fn
        return fn

    return decorate


def conv_handler_for(config: Config):
    """The family's own Conv2d converter, or None (then QuantizedConv2d lowers it to the GEMM)."""
    for cls in type(config).__mro__:
        if cls in _CONV_HANDLERS:
            return _CONV_HANDLERS[cls]
    return None


def handler_for(config: Config) -> Handler:
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise TypeError(f"lowbit: no handler registered for {type(config).__name__} "
                    f"(registered: {sorted(c.__name__ for c in _HANDLERS)}); import lowbit.nn first")


PRESETS: dict[str, Config] = {
    "int8": Int8Config(),
    "int8-weight": Int8Config(weight_only=True),
    "int4": Int4Config(group_size=128, symmetric=False),
    "int4-g64": Int4Config(group_size=64, symmetric=False),
    "int4-g32": Int4Config(group_size=32, symmetric=False),
    "fp8": FP8Config(format="e4m3", granularity="row"),
    "fp8-e5m2": FP8Config(format="e5m2", granularity="row"),
    "fp8-block": FP8Config(format="e4m3", granularity="block"),
    "fp8-weight": FP8Config(format="e4m3", granularity="row", weight_only=True),
    # ---- sparse24
    "sparse24": Sparse24Config(),
    "sparse24-int8": Sparse24Config(values_dtype="int8"),
    # ---- codebook
    "kmeans4": CodebookConfig(method="kmeans", bits=4, dim=1),
    "kmeans3": CodebookConfig(method="kmeans", bits=3, dim=1),
    "pq2": CodebookConfig(method="pq", bits=8, dim=4),
    "aq2": CodebookConfig(method="aq", bits=8, dim=8, num_codebooks=2),
    "lattice": CodebookConfig(method="lattice", bits=8, dim=4),
}
# ---- binary
PRESETS["binary"] = BinaryConfig()
PRESETS["binary-weight"] = BinaryConfig(binary_activations=False)


def resolve(config_or_name: Config | str) -> Config:
    """A config object as is, or the preset of that name."""
    if isinstance(config_or_name, Config):
        return config_or_name
    if isinstance(config_or_name, str):
        try:
            return PRESETS[config_or_name]
        except KeyError:
            raise ValueError(f"lowbit: unknown preset {config_or_name!r}; available presets: "
                             f"{', '.join(sorted(PRESETS))}") from None
    raise TypeError(f"lowbit: config must be a lowbit.configs.Config or a preset name, "
                    f"got {type(config_or_name).__name__}")
