"""INT4 family, reference semantics (the spec; format in lowbit/formats/int4.py).

int4_weight_only_mm: out = x @ dequantize(w).T (+ bias), with the dequantized weight
    (u - zero) * scale computed in float32, accumulation in float32, output in x.dtype.
"""

from __future__ import annotations

import torch

from ...formats import int4 as fmt


def int4_dequantize(packed_w, scale, zero, group_size, K):
    return fmt.dequantize(fmt.Int4Weight(packed_w, scale, zero, K, group_size))


def int4_weight_only_mm(x, packed_w, scale, zero, group_size, bias=None):
    x = x.contiguous()
    w = int4_dequantize(packed_w, scale, zero, group_size, x.shape[1])
    y = x.to(torch.float32) @ w.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
