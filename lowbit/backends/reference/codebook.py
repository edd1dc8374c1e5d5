"""Codebook family, reference semantics (the spec; format in lowbit/formats/codebook.py).

codebook_dequant: W [N, K] = scale[n] * sum_c codebooks[r(n), g(j), c, code, :], the C terms
    summed in float32 in order c = 0, 1, ..., then multiplied by the scale; returned in out_dtype.
codebook_mm: out = x @ W.T (+ bias) with W as above in float32, float32 accumulation, output in
    x.dtype. Kernels may apply scale[n] to the row's sum instead of each weight (the same value
    up to float32 rounding).
"""

from __future__ import annotations

import torch

from ...formats import codebook as fmt


def codebook_dequant(codes, codebooks, scale, in_features, out_dtype=None):
    w = fmt.decode(codes, codebooks, scale, in_features)
    return w.to(out_dtype or torch.float32)


def codebook_mm(x, codes, codebooks, scale=None, bias=None):
    w = fmt.decode(codes, codebooks, scale, x.shape[1])
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
