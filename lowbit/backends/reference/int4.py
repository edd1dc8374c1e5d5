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


# ---- cutlass_sm90 layout (lowbit/formats/int4.py): the repack and the GEMM CUTLASS's sm_90
# mixed-input kernel runs. The weight is rounded to x.dtype as the kernel rounds it
# (fmt.dequantize_cutlass_sm90); accumulation float32; + bias in float32; output in x.dtype.
def int4_repack_cutlass_sm90(packed_w, scale, zero, group_size, K, dtype):
    return fmt.to_cutlass_sm90(packed_w, scale, zero, group_size, K, dtype)


def int4_cutlass_sm90_mm(x, packed, scale, zero, group_size, bias=None):
    w = fmt.dequantize_cutlass_sm90(packed, scale, zero, group_size)
    y = x.to(torch.float32) @ w.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
