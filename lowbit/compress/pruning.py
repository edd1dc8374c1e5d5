"""Pruning: unstructured magnitude masks and structured removal of channels, neurons and heads.

Unstructured (the weights keep their shape; zeros are masked)::

    masks = magnitude_prune(model, 0.8)                   # global: one threshold over all layers
    magnitude_prune(model, 0.5, scope="layer")            # every layer to 50 %
    pruner = GradualPruner(model, 0.9, steps=1000)        # cubic schedule over fine-tuning
    for batch in loader: ...; optimizer.step(); pruner.step()
    remove(model)                                         # bake: weight = weight * mask, no hooks left

A mask is a :mod:`torch.nn.utils.parametrize` parametrization, so it survives training: the
optimizer updates the dense ``original`` tensor while the forward (and the gradient the layer
sees) always goes through ``original * mask``, and ``state_dict`` carries the mask. Pruned
weights therefore stay exactly zero however long the model is fine-tuned.

Structured (the model really gets smaller, and faster)::

    scores = channel_importance(model.fc1, "l1")          # or taylor_importance(model, ["fc1"], ...)
    prune_channels(model, "fc1", ["fc2"], keep=64, scores=scores)
    prune_channels(model, "conv1", ["conv2"], norm="bn1", amount=0.5)
    prune_attention_heads(bert, {0: [1, 5], 3: [0]})

:func:`prune_channels` removes output channels of a producer (Linear or Conv2d), the matching
entries of the BatchNorm that follows it, and the matching input columns of every consumer
(Linear, Conv2d, or a Linear after ``flatten`` of a conv's output). N:M masks go through
:func:`nm_prune`, which hands off to :mod:`lowbit.quant.nm_prune` (the 2:4 sparse kernels).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from ..quant.nm_prune import nm_prune_mask

PRUNABLE = (nn.Linear, nn.Conv2d)


# ----------------------------------------------------------------------------- unstructured
class WeightMask(nn.Module):
    """Parametrization ``weight -> weight * mask``; the mask is a buffer (saved in ``state_dict``)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def _mask_of(module: nn.Module) -> WeightMask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, WeightMask):
            return p
    return None


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight the optimizer updates (under any mask), without the mask applied."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Mask `module.weight` (True = keep); replaces a mask set before."""
    w = _dense_weight(module)
    if mask.shape != w.shape:
        raise ValueError(f"lowbit.compress.set_mask: mask has shape {list(mask.shape)}, weight {list(w.shape)}")
    existing = _mask_of(module)
    if existing is not None:
        existing.mask.copy_(mask.to(device=existing.mask.device, dtype=torch.bool))
    else:
        parametrize.register_parametrization(module, "weight", WeightMask(mask.to(w.device)))


def prunable_layers(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None,
                    types: tuple[type, ...] = PRUNABLE) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv2d in `model` that `filter_fn` accepts, each once."""
    out, seen = [], set()
    for name, m in model.named_modules():
        if isinstance(m, types) and id(m) not in seen and (filter_fn is None or filter_fn(m, name)):
            seen.add(id(m))
            out.append((name, m))
    return out


def _keep_largest(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Bool mask keeping all but the `n_prune` smallest scores (exactly that many, ties by index)."""
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        # stable sort: equal scores are pruned in index order, so the count is exact and repeatable
        idx = torch.sort(flat, stable=True).indices[:n_prune]
        mask[idx] = False
    return mask.view(scores.shape)


def _scores(module: nn.Module) -> torch.Tensor:
    # Already-pruned weights score -1 so that a growing sparsity never revives one (masks only shrink).
    w = _dense_weight(module).detach().abs().float()
    m = _mask_of(module)
    return w if m is None else torch.where(m.mask, w, torch.full_like(w, -1.0))


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "global",
                    filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Mask the smallest-magnitude weights of every Linear / Conv2d so that `sparsity` of them are zero.

    ``scope="global"``: one ranking over all selected layers (layers with small weights lose
    more). ``scope="layer"``: each layer pruned to `sparsity` on its own. Exactly
    ``round(sparsity * numel)`` weights are masked (per layer, or in total). Biases are kept.
    Returns ``{layer name: mask}``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"lowbit.compress.magnitude_prune: sparsity must be in [0, 1], got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"lowbit.compress.magnitude_prune: scope must be 'global' or 'layer', got {scope!r}")
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError("lowbit.compress.magnitude_prune: the model has no Linear or Conv2d layer to prune")
    masks = {}
    with torch.no_grad():
        if scope == "layer":
            for name, m in layers:
                s = _scores(m)
                masks[name] = _keep_largest(s, round(sparsity * s.numel()))
        else:
            scores = [_scores(m) for _, m in layers]
            flat = torch.cat([s.reshape(-1).cpu() for s in scores])
            keep = _keep_largest(flat, round(sparsity * flat.numel()))
            start = 0
            for (name, m), s in zip(layers, scores):
                masks[name] = keep[start:start + s.numel()].view(s.shape).to(s.device)
                start += s.numel()
        for name, m in layers:
            set_mask(m, masks[name])
    return masks


def cubic_sparsity(step: int, final: float, steps: int, initial: float = 0.0, begin: int = 0) -> float:
    """Zhu & Gupta's schedule: fast early pruning while the network can still recover, slow late."""
    if step <= begin:
        return initial
    t = min(1.0, (step - begin) / max(1, steps))
    return final + (initial - final) * (1.0 - t) ** 3


class GradualPruner:
    """Raise sparsity from `initial` to `final` over `steps` calls of :meth:`step` (every `every` calls).

    Call :meth:`step` after each ``optimizer.step()``. Masks only grow: a weight pruned once
    stays pruned (its score is below every live weight's).
    """

    def __init__(self, model: nn.Module, final: float, steps: int, initial: float = 0.0, begin: int = 0,
                 every: int = 1, scope: str = "global", filter_fn=None):
        self.model, self.final, self.steps, self.initial = model, final, steps, initial
        self.begin, self.every, self.scope, self.filter_fn = begin, every, scope, filter_fn
        self.count = 0
        self.sparsity = initial
        magnitude_prune(model, initial, scope, filter_fn)

    def step(self) -> float:
        self.count += 1
        if self.count % self.every == 0 or self.count >= self.begin + self.steps:
            target = cubic_sparsity(self.count, self.final, self.steps, self.initial, self.begin)
            if target != self.sparsity:
                magnitude_prune(self.model, target, self.scope, self.filter_fn)
                self.sparsity = target
        return self.sparsity


def remove(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight (``weight = original * mask``) and drop the parametrization,
    leaving plain modules that :func:`lowbit.quantize` can convert."""
    for _, m in list(model.named_modules()):
        if _mask_of(m) is not None:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def sparsity(model: nn.Module, filter_fn=None) -> float:
    """Fraction of exactly-zero weights over the model's Linear / Conv2d layers."""
    zeros = total = 0
    for _, m in prunable_layers(model, filter_fn):
        w = m.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def masked_nbytes(weight_numel: int, nnz: int, value_bytes: float = 4.0) -> float:
    """Bytes of a masked weight stored as a bitmap plus its nonzero values."""
    return math.ceil(weight_numel / 8) + nnz * value_bytes


# ----------------------------------------------------------------------------- N:M hand-off
def nm_prune(model: nn.Module, n: int = 2, m: int = 4, filter_fn=None,
             saliency: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mask every Linear to N:M sparsity (at most `n` nonzeros in each run of `m` along K).

    The selection is :func:`lowbit.quant.nm_prune.nm_prune_mask` (the pruner behind the 2:4
    sparse kernels, optionally by a per-layer saliency such as ``|w| * ||x||``); the mask is
    installed with :func:`set_mask`, so it survives fine-tuning exactly like a magnitude mask.
    After :func:`remove`, ``lowbit.quantize(model, "sparse24")`` compresses the layers into the
    2:4 kernels' format without changing a weight (the pattern is already N:M).
    """
    masks = {}
    with torch.no_grad():
        for name, layer in prunable_layers(model, filter_fn, types=(nn.Linear,)):
            weight = _dense_weight(layer).detach()
            layer_saliency = None if saliency is None else saliency.get(name)
            mask = nm_prune_mask(weight, n, m, saliency=layer_saliency).to(torch.bool)
            set_mask(layer, mask)
            masks[name] = mask
    return masks


# ----------------------------------------------------------------------------- structured: importance
def channel_importance(module: nn.Module, norm: str = "l1") -> torch.Tensor:
    """Per-output-channel norm of a Linear / Conv2d weight (``"l1"`` or ``"l2"``)."""
    w = _dense_weight(module).detach().float().reshape(_dense_weight(module).shape[0], -1)
    if norm == "l1":
        return w.abs().sum(1)
    if norm == "l2":
        return w.norm(dim=1)
    raise ValueError(f"lowbit.compress.channel_importance: norm must be 'l1' or 'l2', got {norm!r}")


def taylor_importance(model: nn.Module, names: Sequence[str], batches: Iterable,
                      loss_fn: Callable[[nn.Module, object], torch.Tensor],
                      channel_dim: int = 1) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of each output channel of the modules `names` (Molchanov et al.).

    Zeroing channel c of an activation ``a`` changes the loss by about ``-sum(a_c * dL/da_c)``;
    the score is the mean over `batches` of ``|sum over batch and positions of a * dL/da|``.
    ``loss_fn(model, batch)`` runs the model and returns a scalar loss. For Linear outputs
    [..., C] use ``channel_dim=-1``; Conv2d outputs [B, C, H, W] use ``channel_dim=1``.
    """
    named = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {n: None for n in names}
    hooks = []

    def make_hook(name):
        def hook(_, __, out):
            out.retain_grad()
            acts[name] = out
        return hook

    for n in names:
        hooks.append(named[n].register_forward_hook(make_hook(n)))
    count = 0
    try:
        was_training = model.training
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            for n in names:
                a = acts[n]
                prod = (a.detach() * a.grad).float()
                dim = channel_dim % prod.dim()
                s = prod.transpose(0, dim).reshape(prod.shape[dim], -1).sum(1).abs()
                scores[n] = s if scores[n] is None else scores[n] + s
            count += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    if count == 0:
        raise ValueError("lowbit.compress.taylor_importance: batches is empty")
    return {n: s / count for n, s in scores.items()}


# ----------------------------------------------------------------------------- structured: surgery
def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child, getattr(parent, child)


def _new_like(module: nn.Module, **shape) -> nn.Module:
    w = module.weight
    kw = {"device": w.device, "dtype": w.dtype}
    if isinstance(module, nn.Linear):
        return nn.Linear(shape.get("in_features", module.in_features), shape.get("out_features", module.out_features),
                         bias=module.bias is not None, **kw)
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(shape.get("in_channels", module.in_channels), shape.get("out_channels", module.out_channels),
                         module.kernel_size, module.stride, module.padding, module.dilation, module.groups,
                         module.bias is not None, module.padding_mode, **kw)
    raise TypeError(type(module).__name__)


def _check_plain(module: nn.Module, name: str) -> None:
    if parametrize.is_parametrized(module):
        raise ValueError(f"lowbit.compress.prune_channels: {name} has a mask or parametrization; call "
                         "lowbit.compress.remove(model) first")


def prune_channels(model: nn.Module, producer: str, consumers: Sequence[str], *, keep: int | None = None,
                   amount: float | None = None, scores: torch.Tensor | None = None, importance: str = "l1",
                   norm: str | None = None) -> torch.Tensor:
    """Remove output channels of `producer` and the matching inputs of each of `consumers`.

    `producer`: name of a Linear or Conv2d (groups=1). `norm`: name of the BatchNorm1d/2d that
    normalizes its output (its entries are removed too). `consumers`: names of the layers that
    read the producer's output: a Linear or Conv2d (input channel c), or a Linear reading a
    flattened [C, H, W] conv output (columns ``c*H*W .. (c+1)*H*W - 1``). Keeps `keep` channels
    (or ``round((1 - amount) * C)``) with the largest `scores` (default: the weight's
    `importance` norm). Element-wise layers in between (ReLU, dropout, pooling) need nothing.
    Returns the sorted indices of the kept channels.
    """
    parent, child, prod = _resolve(model, producer)
    if not isinstance(prod, PRUNABLE) or (isinstance(prod, nn.Conv2d) and prod.groups != 1):
        raise ValueError(f"lowbit.compress.prune_channels: producer {producer} must be a Linear or a Conv2d with "
                         f"groups=1, got {prod}")
    _check_plain(prod, producer)
    C = prod.weight.shape[0]
    if (keep is None) == (amount is None):
        raise ValueError("lowbit.compress.prune_channels: give exactly one of keep and amount")
    if keep is None:
        keep = C - round(amount * C)
    if not 1 <= keep <= C:
        raise ValueError(f"lowbit.compress.prune_channels: keep must be in [1, {C}], got {keep}")
    if scores is None:
        scores = channel_importance(prod, importance)
    if scores.shape != (C,):
        raise ValueError(f"lowbit.compress.prune_channels: scores must have shape [{C}], got {list(scores.shape)}")
    idx = torch.sort(torch.topk(scores.float(), keep, sorted=False).indices).values.to(prod.weight.device)

    plan = []  # validate everything before changing anything
    if norm is not None:
        pn, cn, bn = _resolve(model, norm)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.num_features != C:
            raise ValueError(f"lowbit.compress.prune_channels: norm {norm} must be a BatchNorm over {C} features")
        plan.append(("norm", pn, cn, bn))
    for cname in consumers:
        pc, cc, cons = _resolve(model, cname)
        _check_plain(cons, cname)
        if isinstance(cons, nn.Conv2d):
            if cons.groups != 1 or cons.in_channels != C:
                raise ValueError(f"lowbit.compress.prune_channels: consumer {cname} must be a Conv2d with groups=1 "
                                 f"and {C} input channels")
        elif isinstance(cons, nn.Linear):
            if cons.in_features % C:
                raise ValueError(f"lowbit.compress.prune_channels: consumer {cname} has in_features="
                                 f"{cons.in_features}, not a multiple of the producer's {C} channels")
        else:
            raise ValueError(f"lowbit.compress.prune_channels: consumer {cname} must be a Linear or Conv2d")
        plan.append(("consumer", pc, cc, cons))

    with torch.no_grad():
        new = _new_like(prod, **({"out_features": keep} if isinstance(prod, nn.Linear) else {"out_channels": keep}))
        new.weight.copy_(prod.weight[idx])
        if prod.bias is not None:
            new.bias.copy_(prod.bias[idx])
        new.train(prod.training)
        setattr(parent, child, new)
        for kind, p, c, mod in plan:
            if kind == "norm":
                bn = type(mod)(keep, mod.eps, mod.momentum, mod.affine, mod.track_running_stats,
                               device=mod.weight.device if mod.affine else None)
                if mod.affine:
                    bn.weight.copy_(mod.weight[idx])
                    bn.bias.copy_(mod.bias[idx])
                if mod.track_running_stats:
                    bn.running_mean.copy_(mod.running_mean[idx])
                    bn.running_var.copy_(mod.running_var[idx])
                    bn.num_batches_tracked.copy_(mod.num_batches_tracked)
                bn.train(mod.training)
                setattr(p, c, bn)
            elif isinstance(mod, nn.Conv2d):
                cons = _new_like(mod, in_channels=keep)
                cons.weight.copy_(mod.weight[:, idx])
                if mod.bias is not None:
                    cons.bias.copy_(mod.bias)
                cons.train(mod.training)
                setattr(p, c, cons)
            else:
                per = mod.in_features // C  # flattened [C, H, W]: channel c owns a run of H*W columns
                cols = (idx.unsqueeze(1) * per + torch.arange(per, device=idx.device)).reshape(-1)
                cons = _new_like(mod, in_features=keep * per)
                cons.weight.copy_(mod.weight[:, cols])
                if mod.bias is not None:
                    cons.bias.copy_(mod.bias)
                cons.train(mod.training)
                setattr(p, c, cons)
    return idx


# ----------------------------------------------------------------------------- attention heads
def _self_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The BERT-style attention blocks (``.self.query/key/value`` + ``.output.dense``) in order."""
    out = []
    for _, m in model.named_modules():
        s, o = getattr(m, "self", None), getattr(m, "output", None)
        if (s is not None and o is not None and all(isinstance(getattr(s, k, None), nn.Linear)
                                                    for k in ("query", "key", "value"))
                and isinstance(getattr(o, "dense", None), nn.Linear) and hasattr(s, "attention_head_size")):
            out.append(m)
    return out


def head_importance(model: nn.Module, batches: Iterable | None = None,
                    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
                    norm: str = "l1") -> list[torch.Tensor]:
    """Importance of each attention head, one tensor [heads] per layer.

    With `batches` and `loss_fn`: first-order Taylor on the per-head context (the input of
    ``output.dense``), ``|sum of a * dL/da|`` over the head's slice, averaged over batches.
    Without: the `norm` of the head's rows of Q, K, V and columns of the output projection.
    """
    layers = _self_attention_layers(model)
    if batches is None:
        out = []
        for att in layers:
            s, d = att.self, att.self.attention_head_size
            h = s.query.out_features // d
            parts = [getattr(s, k).weight.detach().float().reshape(h, d, -1) for k in ("query", "key", "value")]
            parts.append(att.output.dense.weight.detach().float().reshape(-1, h, d).transpose(0, 1))
            flat = torch.cat([p.reshape(h, -1) for p in parts], 1)
            out.append(flat.abs().sum(1) if norm == "l1" else flat.norm(dim=1))
        return out
    names = {id(att.output.dense): i for i, att in enumerate(layers)}
    acts: dict[int, torch.Tensor] = {}
    hooks = []

    def pre_hook(mod, args):
        x = args[0]
        if x.requires_grad:
            x.retain_grad()
        acts[names[id(mod)]] = x

    for att in layers:
        hooks.append(att.output.dense.register_forward_pre_hook(pre_hook))
    scores = [None] * len(layers)
    count = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for i, att in enumerate(layers):
                a = acts[i]
                d = att.self.attention_head_size
                prod = (a.detach() * a.grad).float()
                s = prod.reshape(-1, prod.shape[-1] // d, d).sum((0, 2)).abs()
                scores[i] = s if scores[i] is None else scores[i] + s
            count += 1
        model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return [s / count for s in scores]


def prune_attention_heads(model: nn.Module, heads: dict[int, Sequence[int]]) -> nn.Module:
    """Remove attention heads: ``{layer index: [head indices]}`` over the model's BERT-style blocks.

    Rewrites Q, K, V (their rows for the removed heads) and the output projection (its columns),
    and sets ``num_attention_heads`` / ``all_head_size``. (transformers >= 5 dropped
    ``PreTrainedModel.prune_heads``; this is the same surgery.) Head indices count the heads the
    layer has now (after earlier pruning). Removing every head of a layer is refused.
    """
    layers = _self_attention_layers(model)
    with torch.no_grad():
        for li, remove_heads in heads.items():
            att = layers[li]
            s, d = att.self, att.self.attention_head_size
            h = s.query.out_features // d
            drop = sorted(set(int(i) for i in remove_heads))
            if any(not 0 <= i < h for i in drop):
                raise ValueError(f"lowbit.compress.prune_attention_heads: layer {li} has {h} heads, got {drop}")
            kept = [i for i in range(h) if i not in drop]
            if not kept:
                raise ValueError(f"lowbit.compress.prune_attention_heads: would remove every head of layer {li}")
            idx = torch.tensor([i * d + j for i in kept for j in range(d)], device=s.query.weight.device)
            for k in ("query", "key", "value"):
                old = getattr(s, k)
                new = _new_like(old, out_features=len(idx))
                new.weight.copy_(old.weight[idx])
                if old.bias is not None:
                    new.bias.copy_(old.bias[idx])
                setattr(s, k, new)
            old = att.output.dense
            new = _new_like(old, in_features=len(idx))
            new.weight.copy_(old.weight[:, idx])
            if old.bias is not None:
                new.bias.copy_(old.bias)
            att.output.dense = new
            s.num_attention_heads = len(kept)
            s.all_head_size = len(idx)
    return model


def prune_heads_by_importance(model: nn.Module, fraction: float, scores: list[torch.Tensor]) -> dict[int, list[int]]:
    """Remove the globally least important `fraction` of heads (at least one kept per layer)."""
    flat = [(float(v), li, hi) for li, s in enumerate(scores) for hi, v in enumerate(s.tolist())]
    n = round(fraction * len(flat))
    flat.sort()
    plan: dict[int, list[int]] = {}
    for _, li, hi in flat:
        if n == 0:
            break
        if len(plan.get(li, [])) + 1 < len(scores[li]):
            plan.setdefault(li, []).append(hi)
            n -= 1
    prune_attention_heads(model, plan)
    return plan
