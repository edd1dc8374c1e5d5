"""AWQ: activation-aware weight quantization (Lin et al., 2023), into the int4 and int8 weight-only formats.

A few input channels carry much larger activations than the rest, and the weights that multiply
them matter most for the layer's output. Round-to-nearest treats every weight alike. Since
``x W^T = (x / s) (W * s)^T`` for any per-input-channel ``s > 0``, AWQ quantizes ``W * s`` instead
of ``W``: a column scaled up gets finer steps relative to its size (the group's scale grows by less
than ``s`` when the column is not the group's maximum), at the price of coarser steps elsewhere.
The scales are

    s = mean|x|^alpha,  normalized by sqrt(max s * min s),   alpha in {0, 1/n_grid, ..., 1}

with alpha chosen per group of Linears that share an input by a grid search minimizing the
group's output error on the calibration data, ``sum ||X (W - Q(W s) / s)^T||^2``, computed through
the input Hessian ``H = X^T X / n`` with the format's own quantizer. alpha = 0 is plain
round-to-nearest, so the chosen scales never do worse than RTN on the calibration data.

Where the division by ``s`` goes (exactly the SmoothQuant machinery of :mod:`lowbit.quant.smooth`):

* into the preceding norm (LayerNorm/RMSNorm weight and bias) when the Linears' input is exactly
  that norm's output (:func:`lowbit.quant.smooth.find_norm_linears`);
* into the preceding Linear's output rows (weight and bias) when the activation between the two is
  linear per channel (e.g. V -> attention -> O: the attention mixes tokens, not channels); the
  candidate is one of the few Linears just before in module order whose out_features match;
* every fold is checked by re-running a probe batch (the model output must not move by more than
  `tolerance`, relative) and undone bit for bit otherwise; what cannot be folded gets, with
  ``wrap=True``, an explicit per-channel multiply (:class:`lowbit.quant.smooth.SmoothedLinear`),
  else keeps s = 1 (clip search only).

Optional weight clipping search (AWQ's auto-clip): after scaling, each (row, group) of the scaled
weight is clamped to ``ratio * max|w|`` with the ratio in {1, 0.95, ..., 0.5} that minimizes that
group's output error ``d H_gg d^T`` (the group's diagonal block of the scaled input's Hessian);
ratio 1 is a candidate, so clipping never raises that error. The clamp is applied to the float
weight, which the quantizer then sees.

:func:`awq_scale` does the search and the folding (the model stays float); :func:`awq` then
quantizes with :func:`lowbit.quantize`.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ..configs import Config, Int4Config, Int8Config, Unsupported
from ..formats import int4 as int4_fmt
from ..formats import int8 as int8_fmt
from .gptq import Hessian, _one_cpu_thread

log = logging.getLogger("lowbit")

_SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weight_quantizer(config: Config, in_features: int):
    """``w [N, K] -> dequantized w`` with exactly the rule the config's module will apply (float32)."""
    if isinstance(config, Int4Config):
        gs = in_features if config.group_size is None else config.group_size
        if not int4_fmt.valid_group_size(gs, in_features):
            raise Unsupported(f"group_size {gs} is not one of {int4_fmt.GROUP_SIZES} or in_features={in_features}")
        if config.scale_dtype is not None and config.scale_dtype not in _SCALE_DTYPES:
            raise Unsupported(f"scale_dtype {config.scale_dtype!r} is not one of {sorted(_SCALE_DTYPES)}")
        sd = None if config.scale_dtype is None else _SCALE_DTYPES[config.scale_dtype]

        def q4(w):
            return int4_fmt.dequantize(int4_fmt.quantize_weight(w, gs, config.symmetric, sd, config.clip_search))
        return q4
    if isinstance(config, Int8Config) and config.weight_only:
        return lambda w: int8_fmt.dequantize(int8_fmt.quantize_weight(w.to(torch.float32)))
    raise Unsupported(f"AWQ makes int4 and int8 weight-only layers, not {config}")


def _clip_group_size(config: Config, K: int) -> int:
    if isinstance(config, Int4Config) and config.group_size is not None:
        return config.group_size
    return K


def _sq_out_err(d: torch.Tensor, H: torch.Tensor) -> float:
    """``sum_n d_n H d_n^T`` (d [N, K]; float32 products, float64 sum: the search compares errors
    that differ by percents, far above float32's rounding)."""
    return float(((d @ H) * d).sum(dtype=torch.float64))


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], quantizers: list, act_mean: torch.Tensor, H: torch.Tensor,
                 n_grid: int = 20) -> tuple[torch.Tensor, float, dict]:
    """``(s, alpha, {"rtn": e0, "awq": e})``: the grid search of the module doc for Linears sharing one input.

    `weights` [N_i, K] float, `quantizers` their ``w -> dequantized w``, `act_mean` [K] mean |x|,
    `H` [K, K] the input Hessian. Errors are ``sum_i ||X (W_i - W_hat_i)^T||^2 / ||X W_i^T||^2``.
    """
    with _one_cpu_thread(H.device):
        return _search_scale(weights, quantizers, act_mean, H, n_grid)


def _search_scale(weights, quantizers, act_mean, H, n_grid):
    H32 = H.to(torch.float32)
    Ws = [w.detach().to(torch.float32) for w in weights]
    norms = [max(_sq_out_err(w, H32), 1e-300) for w in Ws]
    a = act_mean.detach().to(torch.float32)
    live = a > 0
    best = None
    errs = {}
    for i in range(n_grid + 1):
        alpha = i / n_grid
        if bool(live.any()):
            s = torch.where(live, a.clamp_min(1e-12).pow(alpha), torch.ones_like(a))
            s = s / (s[live].max() * s[live].min()).sqrt()
        else:
            s = torch.ones_like(a)
        err = 0.0
        for w, q, nrm in zip(Ws, quantizers, norms):
            err += _sq_out_err(w - q(w * s) / s, H32) / nrm
        if i == 0:
            errs["rtn"] = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    errs["awq"] = best[2]
    return best[0], best[1], errs


@torch.no_grad()
def clip_weight(w: torch.Tensor, quantizer, H: torch.Tensor, group_size: int,
                ratios: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(11))) -> torch.Tensor:
    """`w` [N, K] with each (row, group) clamped to ``±ratio * max|w|``, the ratio per (row, group)
    minimizing ``d H_gg d^T`` of its quantization error ``d`` (1.0 is always a candidate)."""
    if 1.0 not in ratios:
        ratios = (1.0, *ratios)
    with _one_cpu_thread(w.device):
        return _clip_weight(w, quantizer, H, group_size, ratios)


def _clip_weight(w, quantizer, H, group_size, ratios):
    N, K = w.shape
    G = K // group_size
    w32 = w.detach().to(torch.float32)
    blocks = H.to(torch.float32).reshape(G, group_size, G, group_size)
    blocks = blocks[torch.arange(G), :, torch.arange(G), :]  # [G, gs, gs]
    amax = w32.reshape(N, G, group_size).abs().amax(-1, keepdim=True)
    best_err = best_w = None
    for r in ratios:
        lim = amax * r
        wc = torch.maximum(torch.minimum(w32.reshape(N, G, group_size), lim), -lim)
        d = (w32 - quantizer(wc.reshape(N, K))).reshape(N, G, group_size)
        e = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
        if best_err is None:
            best_err, best_w = e, wc
        else:
            better = (e < best_err).unsqueeze(-1)
            best_err = torch.minimum(e, best_err)
            best_w = torch.where(better, wc, best_w)
    return best_w.reshape(N, K).to(w.dtype)


def _layer_stats(model: nn.Module, names: list[str], data, num_batches, progress):
    """Per named Linear: (Hessian of its input, mean |x| per input channel)."""
    from ..calibrate import linear_layers, run_batches

    layers = {name: lin for name, _, _, lin in linear_layers(model)}
    hess = {n: Hessian(layers[n].in_features, layers[n].weight.device) for n in names}
    sums = {n: torch.zeros(layers[n].in_features, dtype=torch.float64, device=layers[n].weight.device) for n in names}
    handles = []
    for n in names:
        def hook(m, args, n=n):
            x = args[0].detach()
            hess[n].add(x)
            sums[n] += x.reshape(-1, x.shape[-1]).abs().to(torch.float64).sum(0)
        handles.append(layers[n].register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        run_batches(model, data, num_batches, progress, desc="lowbit awq: activation statistics")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (hess[n].H, (sums[n] / max(hess[n].n, 1)).to(torch.float32)) for n in names}


def _previous_linear_candidates(order: list[str], layers: dict, name: str, lookback: int = 3) -> list[str]:
    i = order.index(name)
    K = layers[name].in_features
    return [p for p in reversed(order[max(0, i - lookback):i]) if layers[p].out_features == K]


@torch.no_grad()
def awq_scale(model: nn.Module, config, data: Iterable, *, n_grid: int = 20, clip: bool = True, wrap: bool = True,
              num_batches: int | None = None, tolerance: float = 1e-4, progress: bool = True) -> dict:
    """Search AWQ scales (and clipping) for every Linear whose config is int4 or int8 weight-only,
    and fold them into the model (in place; the model stays float). Returns, per group (named by
    its norm, or its Linear), ``{"alpha", "s", "fold" ("norm" | "linear:<name>" | "wrap" | "none"),
    "members", "error_rtn", "error_awq"}`` (relative output errors on the calibration data, before
    clipping). `config` as for :func:`lowbit.quantize`. Only the scaling is exact in float;
    clipping changes the weights (``clip=False`` keeps the model's outputs).
    """
    from ..api import layer_config_resolver
    from ..calibrate import linear_layers, run_model
    from .smooth import SmoothedLinear, _first_rows, _output_tensor, _scale_group, find_norm_linears

    data = list(data) if not isinstance(data, (list, tuple)) else data
    if not data:
        raise ValueError("lowbit.awq: data yielded no batches")
    if n_grid < 1:
        raise ValueError(f"lowbit.awq: n_grid must be >= 1, got {n_grid}")
    config_for = layer_config_resolver(config)
    entries = linear_layers(model)
    layers = {name: lin for name, _, _, lin in entries}
    parents = {name: (p, c) for name, p, c, _ in entries}
    order = [name for name, _, _, _ in entries]
    quantizers = {}
    for name in order:
        cfg = config_for(name)
        if cfg is None:
            continue
        try:
            quantizers[name] = (weight_quantizer(cfg, layers[name].in_features), cfg)
        except Unsupported as e:
            log.info("lowbit.awq: %s not scaled: %s", name, e)
    if not quantizers:
        return {}
    stats = _layer_stats(model, list(quantizers), data, num_batches, progress)

    # Groups: a norm and every Linear it feeds, then each remaining target on its own.
    groups: list[tuple[str, list[str], str | None]] = []
    grouped = set()
    # Which Linear reads which norm is a property of the graph, not of the data: two rows find it.
    for norm_name, members in find_norm_linears(model, _first_rows(data[0], 2)).items():
        if any(m in quantizers for m in members):
            groups.append((norm_name, members, norm_name))
            grouped.update(members)
    groups += [(n, [n], None) for n in quantizers if n not in grouped]

    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    probe = _first_rows(data[0], 2)  # a wrong fold shows in any row
    device = next(iter(layers.values())).weight.device

    def probe_output():
        with _one_cpu_thread(device):  # dozens of small forward passes: threads cost more than they give
            return _output_tensor(run_model(model, probe))

    ref = probe_output()

    def output_kept() -> bool:
        out = probe_output()
        return float((out - ref).norm() / ref.norm().clamp(min=1e-30)) <= tolerance

    def try_fold(params: list, apply) -> bool:
        saved = [None if p is None else p.detach().clone() for p in params]
        apply()
        if output_kept():
            return True
        for p, old in zip(params, saved):  # restore bit for bit
            if p is not None:
                p.copy_(old)
        return False

    result = {}
    for group_name, members, norm_name in groups:
        targets = [m for m in members if m in quantizers]
        H, act = stats[targets[0]]  # one tensor feeds the whole group
        s, alpha, errs = search_scale([layers[t].weight for t in targets], [quantizers[t][0] for t in targets],
                                      act, H, n_grid)
        fold = "none"
        if alpha > 0:
            if norm_name is not None:
                norm = modules[norm_name]
                lins = [layers[m] for m in members]
                if try_fold([norm.weight, getattr(norm, "bias", None), *(lin.weight for lin in lins)],
                            lambda: _scale_group(norm, lins, s)):
                    fold = "norm"
            else:
                lin = layers[group_name]
                for prev_name in _previous_linear_candidates(order, layers, group_name):
                    prev = layers[prev_name]

                    def apply(prev=prev, lin=lin):
                        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
                        if prev.bias is not None:
                            prev.bias.div_(s.to(prev.bias.dtype))
                        lin.weight.mul_(s.to(lin.weight.dtype))
                    if try_fold([prev.weight, prev.bias, lin.weight], apply):
                        fold = f"linear:{prev_name}"
                        break
            if fold == "none" and wrap:
                for t in targets:
                    parent, child = parents[t]
                    lin = layers[t]
                    lin.weight.mul_(s.to(lin.weight.dtype))
                    setattr(parent, child, SmoothedLinear(lin, 1.0 / s))
                fold = "wrap"
            if fold == "none":
                s = torch.ones_like(s)
        result[group_name] = {"alpha": alpha if fold != "none" else 0.0, "s": s, "fold": fold, "members": targets,
                              "error_rtn": errs["rtn"], "error_awq": errs["awq"] if fold != "none" else errs["rtn"]}
        if clip:
            # The scaled layer sees x / s: its Hessian is H / (s s^T).
            Hs = H / (s.to(torch.float64).unsqueeze(1) * s.to(torch.float64).unsqueeze(0))
            for t in targets:
                q, cfg = quantizers[t]
                lin = layers[t]
                lin.weight.copy_(clip_weight(lin.weight, q, Hs, _clip_group_size(cfg, lin.in_features)))
    model.train(was_training)
    return result


def awq(model: nn.Module, config, data: Iterable, *, n_grid: int = 20, clip: bool = True, wrap: bool = True,
        num_batches: int | None = None, tolerance: float = 1e-4, progress: bool = True) -> nn.Module:
    """AWQ-scale `model` (:func:`awq_scale`) then quantize it with `config` (:func:`lowbit.quantize`); returns it.

    `config`: ``"int4"``-style configs/presets, int8 weight-only, or a layer-pattern mapping;
    layers with other configs are only quantized. Wrapped Linears (``SmoothedLinear.linear``) get
    the config of the name they had. ``model._lowbit_awq`` holds :func:`awq_scale`'s result.
    """
    from ..api import layer_config_resolver, quantize
    from ..calibrate import linear_layers

    config_for = layer_config_resolver(config)
    original = {id(lin): name for name, _, _, lin in linear_layers(model)}
    info = awq_scale(model, config, data, n_grid=n_grid, clip=clip, wrap=wrap, num_batches=num_batches,
                     tolerance=tolerance, progress=progress)
    # Exact names (no wildcard characters in module names), each with its pre-AWQ name's config
    # (Conv2d layers are never wrapped: their names are unchanged).
    per_layer = {name: config_for(original.get(id(m), name)) for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d))}
    result = quantize(model, per_layer)
    result._lowbit_awq = info
    return result
