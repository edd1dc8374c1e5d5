"""prepare_qat -> any training loop -> convert.

    model = lowbit.prepare_qat(model, lowbit.qat.QATConfig("int4", learnable_scales=True))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward()
        lowbit.qat.clip_gradients(model)          # optional, per QATConfig
        opt.step()
        schedule.step(model)                      # optional, a ProgressiveSchedule
    model = lowbit.convert(model.eval())          # Int4Linear / QuantizedConv2d, same outputs
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..api import QuantizeReport, Skipped
from ..configs import Config, Unsupported, resolve
from ..nn.base import check_float_linear, check_parent
from ..nn.conv import check_float_conv2d
from .bn_fold import find_bn_pairs
from .modules import QATConv2d, QATConvBn2d, QATLinear, QATLinearBn1d

log = logging.getLogger("lowbit")

ORDERS = ("forward", "backward")


@dataclass
class ProgressiveSchedule:
    """Stepped quantization over training, applied by :meth:`step` once per optimizer step.

    ``stages``: ``[(first_step, config), ...]`` in increasing steps, the first at step 0; e.g.
    ``[(0, "int8"), (300, "int4")]`` trains at 8 bits, then lowers to 4. Every stage's fake
    quantizers are built by :func:`prepare_qat` (learnable scales included), so the optimizer
    sees them all from the start; :func:`convert` uses the stage active at the end.

    ``ramp=(start, end)``: the fraction of quantized layers rises linearly from
    ``start_fraction`` at step ``start`` to 1 at step ``end``; layers are switched on in
    ``order`` ("forward": first layers first, "backward": last first). None: all quantized.
    """

    stages: Sequence[tuple[int, Config | str]] = ()
    ramp: tuple[int, int] | None = None
    start_fraction: float = 0.0
    order: str = "forward"
    steps: int = field(default=0, init=False)

    def __post_init__(self):
        self.stages = [(int(s), resolve(c)) for s, c in self.stages]
        if self.stages and (self.stages[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(self.stages, self.stages[1:]))):
            raise ValueError(f"lowbit.qat.ProgressiveSchedule: stages must start at step 0 and increase, "
                             f"got {[s for s, _ in self.stages]}")
        if self.ramp is not None and not (0 <= self.ramp[0] < self.ramp[1]):
            raise ValueError(f"lowbit.qat.ProgressiveSchedule: ramp must be (start, end) with 0 <= start < end, "
                             f"got {self.ramp}")
        if not 0.0 <= self.start_fraction <= 1.0:
            raise ValueError(f"lowbit.qat.ProgressiveSchedule: start_fraction must be in [0, 1], "
                             f"got {self.start_fraction}")
        if self.order not in ORDERS:
            raise ValueError(f"lowbit.qat.ProgressiveSchedule: order must be one of {ORDERS}, got {self.order!r}")

    def stage_at(self, step: int) -> int:
        return max((i for i, (s, _) in enumerate(self.stages) if s <= step), default=0)

    def fraction_at(self, step: int) -> float:
        if self.ramp is None:
            return 1.0
        start, end = self.ramp
        t = min(max((step - start) / (end - start), 0.0), 1.0)
        return self.start_fraction + (1.0 - self.start_fraction) * t

    def apply(self, model: nn.Module, step: int) -> None:
        """Set every QAT layer of `model` to the state of training step `step`."""
        layers = qat_layers(model)
        if self.order == "backward":
            layers = layers[::-1]
        stage = self.stage_at(step)
        n_on = math.floor(self.fraction_at(step) * len(layers) + 1e-9)
        for i, m in enumerate(layers):
            m.stage = min(stage, len(m.configs) - 1)
            m.quant_enabled = i < n_on

    def step(self, model: nn.Module) -> None:
        """Advance one training step and apply the new state."""
        self.steps += 1
        self.apply(model, self.steps)


@dataclass
class QATConfig:
    """How :func:`prepare_qat` sets a model up.

    ``target``: the scheme to train for (a :class:`lowbit.configs.Config` or preset name);
    ignored when ``schedule`` has stages (its stages are the schemes).
    ``learnable_scales``: LSQ steps (int8, int4) instead of min-max weight scales.
    ``static_activations``: W8A8 int8 only: one learned (LSQ) activation step per layer instead of
    dynamic per-token scales; converts to :class:`lowbit.nn.Int8Linear` with ``activation="static"``.
    ``fold_bn``: fuse each Conv2d->BatchNorm2d / Linear->BatchNorm1d of an nn.Sequential
    (:func:`lowbit.qat.find_bn_pairs`, or ``bn_pairs`` given to :func:`prepare_qat`).
    ``freeze_bn_step``: after this many training batches the fused batch norms stop updating
    and use their running statistics (None: only in eval mode).
    ``grad_clip_norm`` / ``scale_grad_clip_norm``: max gradient norm for the weights and for the
    learnable scales, applied by :func:`clip_gradients` (None: not clipped). Separate groups, because
    LSQ step gradients have their own magnitude and one group would otherwise starve the other.
    """

    target: Config | str = "int8"
    learnable_scales: bool = False
    static_activations: bool = False
    fold_bn: bool = True
    freeze_bn_step: int | None = None
    grad_clip_norm: float | None = None
    scale_grad_clip_norm: float | None = None
    schedule: ProgressiveSchedule | None = None

    def configs(self) -> list[Config]:
        if self.schedule is not None and self.schedule.stages:
            return [c for _, c in self.schedule.stages]
        return [resolve(self.target)]


def qat_layers(model: nn.Module) -> list[nn.Module]:
    """The QAT layers of `model` in definition order (each once)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, (QATLinear, QATConv2d)) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare_qat(model: nn.Module, config: QATConfig | Config | str = "int8",
                filter_fn: Callable[[nn.Module, str], bool] | None = None,
                bn_pairs: list[tuple[str, str]] | None = None) -> nn.Module:
    """Swap Linear and Conv2d layers (in place) for QAT modules that fake-quantize like `config`.

    Layers that cannot be converted (e.g. grouped convolutions) or that `filter_fn(module, name)`
    rejects stay float; the report is ``model._lowbit_report``. Returns `model` (or the QAT
    module when `model` is itself a Linear / Conv2d).
    """
    qcfg = config if isinstance(config, QATConfig) else QATConfig(target=config)
    configs = qcfg.configs()
    report = QuantizeReport(configs[-1])
    # Layers a config keeps float by itself (BinaryConfig.keep_first_last), as lowbit.quantize does.
    kept = set().union(*(c.excluded_layers(model) for c in configs if hasattr(c, "excluded_layers")))

    def wanted(module: nn.Module, name: str) -> bool:
        if name in kept:
            report.excluded.append(name)
            return False
        if filter_fn is not None and not filter_fn(module, name):
            report.excluded.append(name)
            return False
        return True

    def build(make, name: str) -> nn.Module | None:
        try:
            new = make()
        except Unsupported as e:
            report.skipped.append(Skipped(name, str(e)))
            log.warning("lowbit.prepare_qat: kept %s as float: %s", name or "<root>", e)
            return None
        report.converted.append((name, f"qat-{type(configs[-1]).__name__}"))
        return new

    def make_plain(layer: nn.Module):
        if isinstance(layer, nn.Linear):
            check_float_linear(layer)
            return QATLinear.from_float(layer, configs, qcfg.learnable_scales, qcfg.static_activations)
        check_float_conv2d(layer)
        return QATConv2d.from_float(layer, configs, qcfg.learnable_scales, qcfg.static_activations)

    if isinstance(model, (nn.Linear, nn.Conv2d)):
        new = build(lambda: make_plain(model), "") if wanted(model, "") else None
        result = new if new is not None else model
        result._lowbit_report = report
        result._lowbit_qat_config = qcfg
        return result

    if qcfg.fold_bn:
        for layer_name, bn_name in (find_bn_pairs(model) if bn_pairs is None else bn_pairs):
            layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
            if not wanted(layer, layer_name):
                continue

            def make_fused(layer=layer, bn=bn):
                if isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    check_float_conv2d(layer)
                    return QATConvBn2d.from_modules(layer, bn, configs, qcfg.learnable_scales, qcfg.freeze_bn_step,
                                                     qcfg.static_activations)
                if isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d):
                    check_float_linear(layer)
                    return QATLinearBn1d.from_modules(layer, bn, configs, qcfg.learnable_scales,
                                                      qcfg.freeze_bn_step, qcfg.static_activations)
                raise Unsupported(f"cannot fuse {type(bn).__name__} into {type(layer).__name__}")

            new = build(make_fused, layer_name)
            if new is not None:
                _set(model, layer_name, new)
                _set(model, bn_name, nn.Identity())

    memo: dict[int, nn.Module | None] = {}  # a layer shared by several parents gets one QAT module
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, (QATLinear, QATConv2d)):
            continue
        for child_name, child in list(parent._modules.items()):
            if type(child) not in (nn.Linear, nn.Conv2d):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) not in memo:

                def make(child=child, parent=parent, child_name=child_name):
                    check_parent(parent, child_name)
                    return make_plain(child)

                memo[id(child)] = build(make, name) if wanted(child, name) else None
            if memo[id(child)] is not None:
                setattr(parent, child_name, memo[id(child)])

    model._lowbit_report = report
    model._lowbit_qat_config = qcfg
    if qcfg.schedule is not None:
        qcfg.schedule.apply(model, qcfg.schedule.steps)
    log.info("lowbit.prepare_qat: %d layers prepared, %d kept float, %d excluded", len(report.converted),
             len(report.skipped), len(report.excluded))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every QAT layer (in place) by its kernel-backed module (:class:`lowbit.nn.Int8Linear`,
    :class:`~lowbit.nn.Int4Linear`, :class:`~lowbit.nn.FP8Linear`, :class:`~lowbit.nn.QuantizedConv2d`,
    ...) whose outputs equal the fake-quantized layer's in eval mode up to float rounding.
    Fused batch norms are folded with their running statistics. Returns `model` (or the new
    module when `model` is itself a QAT layer)."""
    if isinstance(model, (QATLinear, QATConv2d)):
        return model.to_quantized()
    memo: dict[int, nn.Module] = {}
    for _, parent in list(model.named_modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, (QATLinear, QATConv2d)):
                if id(child) not in memo:
                    memo[id(child)] = child.to_quantized()
                setattr(parent, child_name, memo[id(child)])
    return model


def _scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    out = []
    for m in qat_layers(model):
        out += list(m.weight_fake_quants.parameters()) + list(m.act_fake_quants.parameters())
    return out


def clip_gradients(model: nn.Module, max_norm: float | None = None,
                   scale_max_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the gradient norm of the model's weights and, separately, of its learnable scales.

    Limits default to the model's :class:`QATConfig` (``grad_clip_norm``, ``scale_grad_clip_norm``);
    a group without a limit is measured, not clipped. Returns the two total norms before clipping.
    """
    qcfg = getattr(model, "_lowbit_qat_config", None)
    if max_norm is None and qcfg is not None:
        max_norm = qcfg.grad_clip_norm
    if scale_max_norm is None and qcfg is not None:
        scale_max_norm = qcfg.scale_grad_clip_norm
    scales = _scale_parameters(model)
    scale_ids = {id(p) for p in scales}
    weights = [p for p in model.parameters() if id(p) not in scale_ids]

    def clip(params, limit):
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, float("inf") if limit is None else limit)

    return clip(weights, max_norm), clip(scales, scale_max_norm)
