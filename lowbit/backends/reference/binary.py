"""Binary (XNOR-popcount) family, reference semantics (format: lowbit/formats/binary.py).

binary_quantize(x): packed = sign bits of x (1 = +1; 0 -> +1), scale = mean |x| per row in
    float32 (sum of |x| in float32, divided by K; the summation order is not part of the spec).
binary_mm(a, b, K): exact int32 dot products of the ±1 vectors: K - 2 * popcount(a XOR b)
    over the K real bits (padding bits ignored).
binary_scaled_mm: y = float32(dot) * scale_a[m] * scale_b[n] (+ bias), rounded once per
    operation in that order, then cast to out_dtype (float32 default).
"""

from __future__ import annotations

import torch

from ...formats import binary as fmt


def _signs(packed: torch.Tensor, K: int) -> torch.Tensor:
    return fmt.unpack(packed, K, torch.float64)


def binary_quantize(x: torch.Tensor):
    return fmt.pack(x), fmt.mean_abs(x)


def binary_mm(a: torch.Tensor, b: torch.Tensor, K: int) -> torch.Tensor:
    # float64 holds every ±1 partial sum exactly (|sum| <= K < 2**53) on every device.
    return (_signs(a, K) @ _signs(b, K).T).to(torch.int32)


def binary_scaled_mm(a, b, K, scale_a, scale_b, bias=None, out_dtype=None):
    out_dtype = out_dtype or torch.float32
    acc = binary_mm(a, b, K).to(torch.float32)
    sa = scale_a.reshape(-1, 1) if scale_a.numel() > 1 else scale_a.reshape(())
    sb = scale_b.reshape(1, -1) if scale_b.numel() > 1 else scale_b.reshape(())
    y = acc * sa * sb
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)
