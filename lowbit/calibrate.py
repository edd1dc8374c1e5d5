"""Post-training calibration: run data through a float model, then quantize with static scales.

    model = lowbit.calibrate(model, "int8", batches)                 # static W8A8
    model = lowbit.calibrate(model, "fp8", batches, observer="mse")  # static fp8 (e4m3)
    model = lowbit.calibrate(model, {"*.attention.*": "int8", "*": "int4"}, batches)

Every nn.Linear whose scheme quantizes activations (:class:`~lowbit.configs.Int8Config` and
:class:`~lowbit.configs.FP8Config` without ``weight_only``) gets an observer on its input; after
the calibration batches it becomes the kernel-backed module with ``activation="static"`` and
the observed per-tensor scale (:class:`lowbit.nn.Int8Linear`: ``amax / 127``;
:class:`lowbit.nn.FP8Linear`: ``amax / fmax``). Static scales save the per-call amax reduction
and are what integer-only pipelines need (:mod:`lowbit.quant.requant`); inputs beyond the
calibrated range saturate. Weight-only schemes have no activation scale: those layers are
converted exactly as by :func:`lowbit.quantize`. Conv2d layers are left to :func:`lowbit.quantize`.

`data` is an iterable of batches; each batch is passed to the model as ``model(batch)`` for a
tensor, ``model(*batch)`` for a tuple or list, and ``model(**batch)`` for a dict.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .api import FilterFn, LayerConfigs, Skipped, layer_config_resolver, quantize
from .configs import Config, FP8Config, Int8Config, Unsupported
from .nn.base import check_parent
from .nn.fp8 import FP8Linear
from .nn.int8 import Int8Linear
from .quant import observers as obs

log = logging.getLogger("lowbit")


def run_model(model: nn.Module, batch: Any):
    """Call `model` on one batch: a tensor, a tuple/list of positional arguments, or a dict of keywords."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batches(model: nn.Module, data: Iterable, num_batches: int | None = None, progress: bool = True,
                desc: str = "lowbit calibrate") -> int:
    """Feed up to `num_batches` batches of `data` through `model` without gradients; returns how many ran."""
    from tqdm.auto import tqdm

    total = num_batches
    if total is None:
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            total = None
    n = 0
    with torch.no_grad():
        for batch in tqdm(data, total=total, desc=desc, disable=not progress, leave=False):
            if num_batches is not None and n >= num_batches:
                break
            run_model(model, batch)
            n += 1
    if n == 0:
        raise ValueError("lowbit.calibrate: data yielded no batches")
    return n


def uses_static_activations(config: Config | None) -> bool:
    return isinstance(config, (Int8Config, FP8Config)) and not config.weight_only


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(name, parent, child name, linear) for every nn.Linear child, in module order."""
    out = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent._modules.items():
            if isinstance(child, nn.Linear):
                out.append((f"{parent_name}.{child_name}" if parent_name else child_name, parent, child_name, child))
    return out


def _observer_for(config: Config, observer: str | Callable[[], obs.Observer], observer_kwargs: dict) -> obs.Observer:
    if callable(observer) and not isinstance(observer, str):
        return observer()
    kwargs = dict(observer_kwargs)
    if isinstance(config, FP8Config) and observer == "mse":
        kwargs.setdefault("fp8_format", config.format)  # judge clipping on the fp8 grid, not an int one
    return obs.make_observer(observer, 8, symmetric=True, granularity="tensor", **kwargs)


def observe_inputs(model: nn.Module, names_to_observers: dict[str, obs.Observer]) -> list:
    """Forward pre-hooks that feed each named Linear's input to its observer; returns the handles."""
    handles = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, o in names_to_observers.items():
        def hook(module, args, o=o):
            o.observe(args[0])

        handles.append(modules[name].register_forward_pre_hook(hook))
    return handles


def calibrate(model: nn.Module, config: Config | str | LayerConfigs, data: Iterable, *,
              observer: str | Callable[[], obs.Observer] = "minmax", num_batches: int | None = None,
              filter_fn: FilterFn | None = None, progress: bool = True, **observer_kwargs) -> nn.Module:
    """Calibrate static activation scales on `data`, then quantize `model` in place (see the module doc).

    `observer`: ``"minmax"`` (default), ``"moving_average"``, ``"percentile"``, ``"mse"`` or a
    factory returning an :class:`lowbit.quant.observers.Observer` (8-bit symmetric per-tensor);
    `observer_kwargs` go to the observer (e.g. ``percentile=99.9``). The scales found are in
    ``model._lowbit_calibration`` (name -> float32 scalar). Returns `model`.
    """
    config_for = layer_config_resolver(config)
    layers = linear_layers(model)
    static: dict[str, tuple[nn.Module, str, nn.Linear, Config]] = {}
    observers: dict[str, obs.Observer] = {}
    seen: set[int] = set()
    for name, parent, child_name, linear in layers:
        cfg = config_for(name)
        if id(linear) in seen or not uses_static_activations(cfg):
            continue
        if filter_fn is not None and not filter_fn(linear, name):
            continue
        seen.add(id(linear))
        static[name] = (parent, child_name, linear, cfg)
        observers[name] = _observer_for(cfg, observer, observer_kwargs)

    if observers:
        was_training = model.training
        model.eval()
        handles = observe_inputs(model, observers)
        try:
            run_batches(model, data, num_batches, progress)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)

    scales: dict[str, torch.Tensor] = {}
    skipped: list[Skipped] = []
    converted: list[tuple[str, str]] = []
    for name, (parent, child_name, linear, cfg) in static.items():
        o = observers[name]
        if o.num_observed == 0:
            skipped.append(Skipped(name, "never called during calibration"))
            log.warning("lowbit.calibrate: %s saw no calibration data; leaving it to lowbit.quantize (dynamic)", name)
            continue
        try:
            check_parent(parent, child_name)
            if isinstance(cfg, Int8Config):
                scale = obs.int8_act_scale(o.qparams())
                new = Int8Linear.from_float(linear, "static", scale)
            else:
                scale = o.fp8_scale(cfg.format).reshape(())
                new = FP8Linear.from_float(linear, cfg.format, cfg.granularity, "static", act_scale=scale)
        except Unsupported as e:
            skipped.append(Skipped(name, str(e)))
            log.warning("lowbit.calibrate: kept %s for lowbit.quantize: %s", name, e)
            continue
        scales[name] = scale
        converted.append((name, new.scheme + "-static"))
        for _, p, c, lin in layers:  # a Linear shared by several parents: swap it everywhere
            if lin is linear:
                setattr(p, c, new)

    result = quantize(model, config, filter_fn)
    report = result._lowbit_report
    report.converted[:0] = converted
    report.skipped[:0] = skipped
    result._lowbit_calibration = scales
    return result


@torch.no_grad()
def activation_absmax(model: nn.Module, data: Iterable, names: Iterable[str] | None = None, *,
                      num_batches: int | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| (float32 [K]) of each named Linear's input over `data` (all Linears by default)."""
    layers = {name: lin for name, _, _, lin in linear_layers(model)}
    names = list(layers) if names is None else list(names)
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(m, args, name=name):
            a = args[0].detach().to(torch.float32).reshape(-1, args[0].shape[-1]).abs().amax(0)
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)
        handles.append(layers[name].register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        run_batches(model, data, num_batches, progress, desc="lowbit activation stats")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
