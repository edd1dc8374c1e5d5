"""SPARSE24 family, reference semantics (the spec; format in lowbit/formats/sparse24.py).

sparse24_mm: out = (x @ W.T) * scale + bias with W = decompress(values, meta) (the dense 2:4
    weight), x and W in float32, float32 accumulation, output in x.dtype. int8 values need the
    per-channel scale (weight-only 2:4 + INT8); for float values the scale is optional.
sparse24_int8_scaled_mm: acc = a @ W.T exactly in int32 (int8 activations, int8 values), then
    out = float32(acc) * scale_a[m] * scale_b[n] + bias[n], rounded to out_dtype: the
    int8_scaled_mm epilogue on a 2:4-sparse weight (2:4 + INT8, W8A8).
"""

from __future__ import annotations

import torch

from ...formats import sparse24 as fmt
from .int8 import int8_scaled_mm


def sparse24_dense(values, meta, K):
    return fmt.decompress(values, meta, K, torch.float32)


def sparse24_mm(x, values, meta, scale=None, bias=None):
    x = x.contiguous()
    w = sparse24_dense(values, meta, x.shape[1])
    y = x.to(torch.float32) @ w.T
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias=None, out_dtype=None):
    w = fmt.decompress(values, meta, a.shape[1], torch.int8)
    return int8_scaled_mm(a, w, scale_a, scale_b, bias, out_dtype)
