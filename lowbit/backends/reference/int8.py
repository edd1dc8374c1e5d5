"""INT8 family, reference semantics.

Quantization (symmetric, dynamic):
    amax  = max |x| over the row (per_row) or the whole tensor, in float32
    scale = amax / 127            (1.0 where amax == 0, so all-zero rows stay finite)
    q     = clamp(round_half_even(x / scale), -127, 127)

The range is [-127, 127] (never -128) so that negation is closed and the symmetric grid is
centred; int8_mm itself accepts the full [-128, 127] range.

GEMMs use the nn.Linear layout: a is [M, K] and b (the weight) is [N, K]; out = a @ b.T.
"""

from __future__ import annotations

import torch

QMAX = 127


def _exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float64 holds every partial sum exactly (|sum| <= K * 2**14 < 2**53), and unlike int64
    # matmul it runs on every device.
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int32)


def int8_quantize_dynamic(x: torch.Tensor, per_row: bool = True):
    x32 = x.to(torch.float32)
    if per_row:
        amax = x32.abs().amax(dim=-1)
    else:
        amax = x32.abs().amax()
    scale = int8_scale_from_amax(amax)
    q = int8_quantize_static(x, scale)
    return q, scale


def int8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    # tensor / tensor: on CUDA, tensor / python-scalar is computed as a multiply by the
    # reciprocal, which is not the IEEE division the spec (and every kernel) uses.
    return torch.where(amax > 0, amax / torch.full_like(amax, QMAX), torch.ones_like(amax))


def int8_quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x32 = x.to(torch.float32)
    s = scale.reshape(()) if scale.numel() == 1 else scale.unsqueeze(-1)
    return torch.clamp(torch.round(x32 / s), -QMAX, QMAX).to(torch.int8)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _exact_int_matmul(a, b)


def int8_scaled_mm(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    out_dtype = out_dtype or torch.float32
    acc = _exact_int_matmul(a, b).to(torch.float32)
    sa = scale_a.reshape(-1, 1) if scale_a.numel() > 1 else scale_a.reshape(())
    sb = scale_b.reshape(1, -1) if scale_b.numel() > 1 else scale_b.reshape(())
    y = acc * sa * sb
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def int8_weight_only_mm(x, w, scale, bias=None):
    # Contiguous first: BLAS picks a different summation order for a transposed operand, and
    # the result must not depend on the layout of the inputs.
    x, w = x.contiguous(), w.contiguous()
    y = (x.to(torch.float32) @ w.to(torch.float32).T) * scale.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.reshape(()) if scale.numel() == 1 else scale.unsqueeze(-1)
    return q.to(torch.float32) * s
