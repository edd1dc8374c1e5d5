"""SmoothQuant-style migration (Xiao et al., 2022): move activation outliers into the weights.

A few input channels of transformer Linears carry values 10-100x larger than the rest; a per-token
(or per-tensor) int8 activation scale is then set by those channels and the others lose most of
their precision. Since ``x W^T = (x / s) (W * s)^T`` for any per-input-channel ``s > 0``, dividing
the activation by

    s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)        (alpha in [0, 1])

flattens it, at the price of rougher weight columns; alpha = 0.5 balances the two.

The division by ``s`` costs nothing at run time when the Linear's input comes straight out of a
normalization layer (LayerNorm or RMSNorm with an elementwise weight) that feeds nothing else: it
is folded into the norm's weight and bias. :func:`find_norm_linears` finds candidate pairs by
running one batch and matching each Linear's input tensor with a norm's output tensor (no
model-specific code). A norm whose output also feeds something else (the residual stream of a
post-LN model such as BERT) cannot absorb ``1/s``: each fold is checked by re-running the batch
(the model's output must not move by more than float rounding) and undone otherwise. Those
groups, with ``wrap=True``, get an explicit per-channel multiply instead
(:class:`SmoothedLinear`, one elementwise op before the quantized GEMM; the Linear becomes its
child ``linear``, so build the same wrappers before :func:`lowbit.load`). Quantize afterwards
with :func:`lowbit.quantize` or :func:`lowbit.calibrate`. Norms of the form ``x * (1 + w)``
(Gemma) are not recognized as foldable and fail the check.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("LayerNorm", "RMSNorm")):
        w = getattr(m, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() == 1
    return False


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


@torch.no_grad()
def find_norm_linears(model: nn.Module, batch: Any) -> dict[str, list[str]]:
    """``{norm name: [names of the Linears whose input is exactly that norm's output]}`` on one batch."""
    from ..calibrate import linear_layers, run_model

    outputs: dict[tuple, str] = {}
    keep = []  # hold the outputs so that no address is reused while the batch runs
    pairs: dict[str, list[str]] = {}
    handles = []
    for name, m in model.named_modules():
        if _is_norm(m):
            def norm_hook(mod, args, out, name=name):
                if isinstance(out, torch.Tensor):
                    outputs[_key(out)] = name
                    keep.append(out)
            handles.append(m.register_forward_hook(norm_hook))
    for name, _, _, lin in linear_layers(model):
        def lin_hook(mod, args, name=name):
            norm = outputs.get(_key(args[0]))
            if norm is not None and name not in pairs.setdefault(norm, []):
                pairs[norm].append(name)
        handles.append(lin.register_forward_pre_hook(lin_hook))
    was_training = model.training
    model.eval()
    try:
        run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: v for k, v in pairs.items() if v}


@torch.no_grad()
def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """``s_j = act_absmax_j^alpha / max_over_weights |W[:, j]|^(1-alpha)`` (float32 [K]; 1 where undefined)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"lowbit.smooth_quant: alpha must be in [0, 1], got {alpha}")
    w_max = torch.stack([w.detach().abs().to(torch.float32).amax(0) for w in weights]).amax(0)
    a = act_absmax.to(torch.float32)
    s = a.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    # A channel that never fired or has no weight is left as is.
    return torch.where((a > 0) & (w_max > 0) & torch.isfinite(s), s, torch.ones_like(s))


class SmoothedLinear(nn.Module):
    """``linear(x * inv_scale)``: the SmoothQuant division where no norm can absorb it."""

    def __init__(self, linear: nn.Linear, inv_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale.to(x.dtype))


def _output_tensor(out):
    from ..report import _hidden

    return _hidden(out).detach().to(torch.float64)


def _first_rows(batch, n: int):
    """The first `n` rows (dim 0) of every tensor in a batch (a tensor, tuple/list or dict)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: _first_rows(v, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_first_rows(v, n) for v in batch)
    return batch


def _scale_group(norm: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))


@torch.no_grad()
def smooth_quant(model: nn.Module, data: Iterable, alpha: float = 0.5, *, wrap: bool = False,
                 num_batches: int | None = None, tolerance: float = 1e-4,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Migrate activation outliers into the weights of every norm-fed Linear group (in place).

    Returns ``{norm name or wrapped Linear name: s}``. Uses the first batch of `data` to find
    the norm->Linear pairs and (its first 4 rows) to check each fold (relative change of the model output at most
    `tolerance`), all batches (up to `num_batches`) for the activation maxima.
    """
    from ..calibrate import activation_absmax, linear_layers, run_model

    data = list(data) if not isinstance(data, (list, tuple)) else data
    if not data:
        raise ValueError("lowbit.smooth_quant: data yielded no batches")
    pairs = find_norm_linears(model, _first_rows(data[0], 2))  # the graph, not the data: two rows find it
    names = [n for group in pairs.values() for n in group]
    stats = activation_absmax(model, data, names, num_batches=num_batches, progress=progress)
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    probe = _first_rows(data[0], 4)  # a wrong fold shows in any row; a few keep the checks cheap
    ref = _output_tensor(run_model(model, probe))
    factors = {}
    unfoldable = []
    for norm_name, group in pairs.items():
        norm = modules[norm_name]
        linears = [modules[n] for n in group]
        act = torch.stack([stats[n] for n in group]).amax(0)  # one tensor feeds them all: equal anyway
        s = smoothing_factors(act, [lin.weight for lin in linears], alpha)
        params = [norm.weight, getattr(norm, "bias", None), *(lin.weight for lin in linears)]
        saved = [None if p is None else p.detach().clone() for p in params]
        _scale_group(norm, linears, s)
        out = _output_tensor(run_model(model, probe))
        if float((out - ref).norm() / ref.norm().clamp(min=1e-30)) <= tolerance:
            factors[norm_name] = s
        else:  # restore bit for bit (dividing back would leave rounding behind)
            for p, old in zip(params, saved):
                if p is not None:
                    p.copy_(old)
            unfoldable += [(n, s) for n in group]
    if wrap:
        parents = {name: (p, c) for name, p, c, _ in linear_layers(model)}
        for name, s in unfoldable:
            parent, child = parents[name]
            lin = getattr(parent, child)
            lin.weight.mul_(s.to(lin.weight.dtype))
            setattr(parent, child, SmoothedLinear(lin, 1.0 / s))
            factors[name] = s
    model.train(was_training)
    return factors
