"""Model-level API: swap nn.Linear layers for quantized ones, and account for what that saved.

    lowbit.quantize(model, "int8")                       # or a config: Int8Config(weight_only=True)
    lowbit.quantize(model, "int8", filter_fn=lambda m, name: "lm_head" not in name)
    print(lowbit.summary(model))

A layer that cannot be converted (e.g. float64 weights, weights on the meta device, K too large
for exact int32 accumulation) stays float: :func:`quantize` logs why on the ``"lowbit"`` logger
and records it in a :class:`QuantizeReport` (``model._lowbit_report`` and :func:`last_report`).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from . import nn as _lowbit_nn  # noqa: F401  (registers every family's config handler)
from .configs import Config, Unsupported, conv_handler_for, handler_for, resolve
from .nn.base import QuantizedLinear, check_parent
from .nn.conv import QuantizedConv2d
from .nn.binary import BinaryConv2d

log = logging.getLogger("lowbit")

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass
class QuantizeReport:
    """What one :func:`quantize` call did."""

    config: Config
    converted: list[tuple[str, str]] = field(default_factory=list)  # (name, scheme)
    skipped: list[Skipped] = field(default_factory=list)  # could not be converted
    excluded: list[str] = field(default_factory=list)  # filter_fn said no

    def __str__(self) -> str:
        lines = [f"lowbit.quantize({self.config}): {len(self.converted)} converted, "
                 f"{len(self.skipped)} skipped, {len(self.excluded)} excluded by filter_fn"]
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


_last_report: QuantizeReport | None = None


def last_report() -> QuantizeReport | None:
    """The report of the most recent :func:`quantize` call in this process."""
    return _last_report


LayerConfigs = Mapping[str, "Config | str | None"]


def layer_config_resolver(config: Config | str | LayerConfigs) -> Callable[[str], Config | None]:
    """`name -> Config or None` for a config, a preset name, or a mapping of module-name patterns.

    A mapping such as ``{"*.attention.*": "int8", "*.intermediate.*": "int4", "lm_head": None}``
    gives each layer the value of the first pattern (in the mapping's order) that its full
    module name matches (:func:`fnmatch.fnmatchcase`: ``*`` also crosses dots); ``None`` or no
    matching pattern keeps the layer float. Every value is resolved up front, so a bad preset
    name fails before any layer is touched.
    """
    if isinstance(config, Mapping):
        rules = [(pattern, None if c is None else resolve(c)) for pattern, c in config.items()]
        for pattern, _ in rules:
            if not isinstance(pattern, str):
                raise TypeError(f"lowbit: layer patterns must be strings, got {type(pattern).__name__}")
        for _, c in rules:
            if c is not None:
                handler_for(c)  # an unknown config type fails here, not halfway through the model

        def pick(name: str) -> Config | None:
            for pattern, c in rules:
                if fnmatch.fnmatchcase(name, pattern):
                    return c
            return None

        return pick
    cfg = resolve(config)
    handler_for(cfg)
    return lambda name: cfg


def quantize(model: nn.Module, config: Config | str | LayerConfigs, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace every eligible nn.Linear in `model` (in place) by its quantized counterpart.

    nn.Conv2d layers (groups=1) are replaced by :class:`lowbit.nn.QuantizedConv2d`, the same
    quantized linear module run on unfolded patches.

    `config` is a :class:`lowbit.configs.Config`, a preset name (:data:`lowbit.configs.PRESETS`),
    or a mapping from module-name patterns to those (or None), one config per layer: see
    :func:`layer_config_resolver`; layers it leaves float are listed as excluded.
    `filter_fn(module, name)` returning False keeps that layer float. A Linear shared by several
    parents is converted once and the same quantized module is put at each place (the decision
    made for the first name seen applies to all of them).

    Returns `model`; when `model` is itself an nn.Linear it cannot be replaced in place, so the
    quantized module is returned instead (use the return value).
    """
    global _last_report
    config_for = layer_config_resolver(config)
    cfg = dict(config) if isinstance(config, Mapping) else resolve(config)
    report = QuantizeReport(cfg)
    memo: dict[int, nn.Module | None] = {}
    # Layers a config keeps float by itself (e.g. BinaryConfig: the first and last layer).
    kept = cfg.excluded_layers(model) if hasattr(cfg, "excluded_layers") else set()

    def convert(linear: nn.Linear, name: str, parent: nn.Module | None, child_name: str) -> nn.Module | None:
        if id(linear) in memo:
            return memo[id(linear)]
        new = None
        layer_cfg = config_for(name)
        if layer_cfg is None or name in kept or (filter_fn is not None and not filter_fn(linear, name)):
            report.excluded.append(name)
            log.debug("lowbit.quantize: %s excluded by filter_fn or the layer patterns", name)
        else:
            try:
                if parent is not None:
                    check_parent(parent, child_name)
                if isinstance(linear, nn.Linear):
                    new = handler_for(layer_cfg)(linear, layer_cfg)
                elif conv_handler_for(layer_cfg) is not None:
                    new = conv_handler_for(layer_cfg)(linear, layer_cfg)
                else:
                    new = QuantizedConv2d.from_float(linear, layer_cfg)
            except Unsupported as e:
                report.skipped.append(Skipped(name, str(e)))
                log.warning("lowbit.quantize: kept %s as float: %s", name or "<root>", e)
            else:
                report.converted.append((name, getattr(new, "scheme", type(new).__name__)))
        memo[id(linear)] = new
        return new

    if isinstance(model, nn.Linear):
        new = convert(model, "", None, "")
        result = new if new is not None else model
    else:
        # Snapshot first: the loop below mutates the tree it walks.
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent._modules.items()):
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    name = f"{parent_name}.{child_name}" if parent_name else child_name
                    new = convert(child, name, parent, child_name)
                    if new is not None:
                        setattr(parent, child_name, new)
        result = model

    log.info("lowbit.quantize(%s): converted %d Linear layers, kept %d as float, %d excluded by filter_fn",
             cfg, len(report.converted), len(report.skipped), len(report.excluded))
    result._lowbit_report = report
    _last_report = report
    return result


# ----------------------------------------------------------------------------- summary
COLUMNS = ("name", "scheme", "shape", "bits_per_weight", "bytes_before", "bytes_after")
_HEADERS = ("layer", "scheme", "shape [N, K]", "bits/w", "before", "after")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Summary:
    """Per-layer storage of a model's linear layers, quantized or not.

    ``rows``: one dict per layer with ``name``, ``scheme`` ("float" for an unconverted Linear),
    ``shape`` (N, K), ``bits_per_weight`` (scale overhead included, bias excluded),
    ``bytes_before`` (the float layer in its original dtype, bias included) and ``bytes_after``.
    """

    rows: list[dict]

    @property
    def bytes_before(self) -> int:
        return sum(r["bytes_before"] for r in self.rows)

    @property
    def bytes_after(self) -> int:
        return sum(r["bytes_after"] for r in self.rows)

    @property
    def num_weights(self) -> int:
        return sum(r["shape"][0] * r["shape"][1] for r in self.rows)

    @property
    def bits_per_weight(self) -> float:
        n = self.num_weights
        return sum(r["bits_per_weight"] * r["shape"][0] * r["shape"][1] for r in self.rows) / n if n else 0.0

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    def _cells(self) -> list[tuple[str, ...]]:
        cells = [(r["name"], r["scheme"], f"{r['shape'][0]} x {r['shape'][1]}", f"{r['bits_per_weight']:.2f}",
                  _fmt_bytes(r["bytes_before"]), _fmt_bytes(r["bytes_after"])) for r in self.rows]
        cells.append((f"total ({len(self.rows)} layers)", "", f"{self.num_weights} weights",
                      f"{self.bits_per_weight:.2f}", _fmt_bytes(self.bytes_before), _fmt_bytes(self.bytes_after)))
        return cells

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(c[i]) for c in [_HEADERS, *cells]) for i in range(len(_HEADERS))]
        right = (False, False, True, True, True, True)

        def line(c):
            return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(c, widths, right)).rstrip()

        rule = "  ".join("-" * w for w in widths)
        out = [line(_HEADERS), rule, *(line(c) for c in cells[:-1]), rule, line(cells[-1])]
        out.append(f"compression {self.compression:.2f}x")
        return "\n".join(out)

    def to_markdown(self) -> str:
        cells = self._cells()
        out = ["| " + " | ".join(_HEADERS) + " |", "|" + "|".join(["---", "---", "---:", "---:", "---:", "---:"]) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in cells[:-1]]
        out.append("| " + " | ".join(f"**{v}**" if v else "" for v in cells[-1]) + " |")
        return "\n".join(out)


def _bias_nbytes(module: nn.Module) -> int:
    b = getattr(module, "bias", None)
    return b.numel() * b.element_size() if b is not None else 0


def summary(model: nn.Module) -> Summary:
    """Storage of every nn.Linear, nn.Conv2d and quantized layer in `model` (each shared module once).

    A convolution is counted as its GEMM: shape (out_channels, in_channels/groups * kh * kw).
    QuantizedConv2d appears through its inner quantized linear (``<name>.linear``).
    """
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            N, K = m.out_features, m.in_features
            bias = _bias_nbytes(m)
            rows.append({"name": name, "scheme": m.scheme, "shape": (N, K),
                         "bits_per_weight": float(m.bits_per_weight()),
                         "bytes_before": N * K * m.orig_dtype.itemsize + bias,
                         "bytes_after": m.weight_nbytes() + bias})
        elif isinstance(m, BinaryConv2d):
            N, K = m.out_channels, m.in_features
            bias = _bias_nbytes(m)
            rows.append({"name": name, "scheme": "binary", "shape": (N, K),
                         "bits_per_weight": float(m.bits_per_weight()),
                         "bytes_before": N * K * m.orig_dtype.itemsize + bias,
                         "bytes_after": m.weight_nbytes() + bias})
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            N, K = m.weight.shape[0], m.weight[0].numel()
            nbytes = N * K * m.weight.element_size() + _bias_nbytes(m)
            rows.append({"name": name, "scheme": "float", "shape": (N, K),
                         "bits_per_weight": 8.0 * m.weight.element_size(),
                         "bytes_before": nbytes, "bytes_after": nbytes})
    return Summary(rows)
