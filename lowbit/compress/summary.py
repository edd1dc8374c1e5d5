"""Storage of a compressed model: quantized, pruned and decomposed layers counted together.

:func:`lowbit.summary` reports Linear layers (float or quantized); a decomposed layer already
shows up there as its factors (ordinary Linears). :func:`compressed_size` covers every
parameter and buffer that is saved, including convolutions, and stores a weight that is
mostly zeros as a bitmap plus its nonzero values when that is smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.base import QuantizedLinear


@dataclass
class SizeReport:
    rows: list[dict] = field(default_factory=list)  # name, kind, weights, nonzero, bytes
    other_bytes: int = 0  # biases, norms, embeddings, masks excluded

    @property
    def weight_bytes(self) -> float:
        return sum(r["bytes"] for r in self.rows)

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.other_bytes

    @property
    def weights(self) -> int:
        return sum(r["weights"] for r in self.rows)

    @property
    def nonzero(self) -> int:
        return sum(r["nonzero"] for r in self.rows)

    def __str__(self) -> str:
        lines = [f"{'layer':32s} {'kind':18s} {'weights':>9s} {'nonzero':>9s} {'bytes':>10s}"]
        for r in self.rows:
            lines.append(f"{r['name'][:32]:32s} {r['kind'][:18]:18s} {r['weights']:9d} {r['nonzero']:9d} "
                         f"{r['bytes']:10.0f}")
        lines.append(f"{'weights total':32s} {'':18s} {self.weights:9d} {self.nonzero:9d} {self.weight_bytes:10.0f}")
        lines.append(f"{'other tensors (bias, norm, ...)':51s} {'':19s} {self.other_bytes:10d}")
        lines.append(f"{'total':51s} {'':19s} {self.total_bytes:10.0f}")
        return "\n".join(lines)


def _sparse_or_dense(w: torch.Tensor) -> tuple[int, float, str]:
    nnz = int((w != 0).sum())
    dense = w.numel() * w.element_size()
    sparse = math.ceil(w.numel() / 8) + nnz * w.element_size()  # bitmap + nonzero values
    return (nnz, sparse, "sparse") if sparse < dense else (nnz, float(dense), "dense")


def compressed_size(model: nn.Module) -> SizeReport:
    """Bytes to store `model`: quantized layers as their codes and scales, float Linear / Conv
    weights dense or (when smaller) as bitmap + nonzeros, every other tensor as it is."""
    rep = SizeReport()
    counted: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            N, K = m.out_features, m.in_features
            for t in m.buffers(recurse=False):
                counted.add(id(t))
            rep.rows.append({"name": name, "kind": m.scheme, "weights": N * K, "nonzero": N * K,
                             "bytes": float(m.weight_nbytes())})
            b = getattr(m, "bias", None)
            rep.other_bytes += b.numel() * b.element_size() if b is not None else 0
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            w = m.weight.detach()  # through a pruning mask when there is one
            nnz, nbytes, how = _sparse_or_dense(w)
            cls = type(m).__bases__[0] if type(m).__name__.startswith("Parametrized") else type(m)
            rep.rows.append({"name": name, "kind": f"{cls.__name__} {how}", "weights": w.numel(),
                             "nonzero": nnz, "bytes": nbytes})
            for _, t in m.named_parameters(recurse=True):
                if t.dim() >= 2 or t.shape == w.shape:
                    counted.add(id(t))
            for bname, t in m.named_buffers(recurse=True):
                if bname.endswith("mask"):
                    counted.add(id(t))  # the bitmap above already says where the zeros are
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in counted:
            counted.add(id(t))
            rep.other_bytes += t.numel() * t.element_size()
    return rep
