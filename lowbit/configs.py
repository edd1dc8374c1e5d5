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


_CONFIG_TYPES: dict[str, type[Config]] = {c.__name__: c for c in (Int8Config, Int4Config, FP8Config)}
# ---- codebook
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
    # ---- codebook
    "kmeans4": CodebookConfig(method="kmeans", bits=4, dim=1),
    "kmeans3": CodebookConfig(method="kmeans", bits=3, dim=1),
    "pq2": CodebookConfig(method="pq", bits=8, dim=4),
    "aq2": CodebookConfig(method="aq", bits=8, dim=8, num_codebooks=2),
    "lattice": CodebookConfig(method="lattice", bits=8, dim=4),
}


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
