"""Integer-only W8A8 inference: int8 in, int8 out, no floating point between the two.

A static W8A8 layer (:class:`lowbit.nn.Int8Linear` with ``activation="static"``) computes

    y[m, n] = acc[m, n] * s_in * s_w[n] + bias[n],        acc = q_in @ qweight.T  (exact int32)

and the next layer quantizes y with its own static scale s_out: ``q_out = round(y / s_out)``.
Folding the three scales into one real multiplier per output channel,

    q_out = round((acc + bias_q[n]) * M[n]),   M[n] = s_in * s_w[n] / s_out,
    bias_q[n] = round(bias[n] / (s_in * s_w[n]))   (int32),

leaves one real multiply, done in integers (gemmlowp / TFLite style): ``M = m0 * 2**-shift`` with
an int32 ``m0`` in [2**30, 2**31) (31 significant bits; relative error <= 2**-31) and ``shift``
in [1, 62]. Then

    q_out = clamp(((acc + bias_q) * m0 + 2**(shift - 1)) >> shift, qmin, qmax)

with ``acc + bias_q`` and the product in int64 (|acc + bias_q| < 2**32 and m0 < 2**31, so the
product is below 2**63) and an arithmetic right shift: rounding is **half up** (towards +inf),
not half-to-even as in the float path. ``qmin, qmax = -127, 127`` (the lowbit int8 grid), or
``0, 127`` with ``relu=True`` (ReLU fused for free, since the output zero point is 0).

Difference from the float path (int8_scaled_mm in float32, then int8_quantize_static), in LSB of
the output: both round values that differ by
    delta <= M/2                        (bias rounded to the accumulator's grid)
           + 2**-31 * |t|               (m0 has 31 bits)
           + 2**-21 * (|acc * M| + |bias / s_out|)   (a few float32 roundings in the float path)
where t is the exact pre-rounding value. Two roundings of numbers less than 1 apart differ by at
most 1, so the paths agree within 1 LSB whenever delta < 1, i.e. for M < 1 and outputs that are
not the result of a catastrophic cancellation of terms near 2**20 -- every practical layer
(M is ~1e-2 to 1e-5 when s_out covers the output). :func:`float_path_bound` evaluates delta.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

QMAX = 127
MIN_SHIFT, MAX_SHIFT = 1, 62


def quantize_multiplier(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m0, shift)`` int32 with ``m ~= m0 * 2**-shift``, ``2**30 <= m0 < 2**31``, for real m > 0."""
    m = torch.as_tensor(m, dtype=torch.float64)
    if not bool(torch.isfinite(m).all()) or not bool((m > 0).all()):
        raise ValueError("lowbit.requant: multipliers must be finite and > 0")
    frac, exp = torch.frexp(m)  # m = frac * 2**exp, frac in [0.5, 1)
    m0 = torch.round(frac * 2.0**31).to(torch.int64)
    carry = m0 == 2**31  # frac rounded up to 1.0
    m0 = torch.where(carry, m0 // 2, m0)
    exp = exp.to(torch.int64) + carry.to(torch.int64)
    shift = 31 - exp
    if bool((shift < MIN_SHIFT).any()) or bool((shift > MAX_SHIFT).any()):
        raise ValueError(f"lowbit.requant: multiplier out of range [2**-32, 2**30): min {float(m.min()):.3g}, "
                         f"max {float(m.max()):.3g}")
    return m0.to(torch.int32), shift.to(torch.int32)


def quantize_bias(bias: torch.Tensor, acc_scale: torch.Tensor) -> torch.Tensor:
    """int32 bias on the accumulator's grid: ``round(bias / acc_scale)`` (half to even), range-checked."""
    b = torch.round(bias.to(torch.float64) / acc_scale.to(torch.float64))
    if not bool(torch.isfinite(b).all()) or bool((b.abs() > 2**31 - 1).any()):
        raise ValueError("lowbit.requant: bias / (s_in * s_w) does not fit int32; the input scale is too small")
    return b.to(torch.int32)


def requantize(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor, bias_q: torch.Tensor | None = None,
               relu: bool = False) -> torch.Tensor:
    """int32 accumulators [M, N] -> int8 codes: ``clamp(((acc + bias_q) * m0 + 2**(shift-1)) >> shift)``.

    `m0`, `shift` (int32) and `bias_q` (int32) are per output channel [N] or scalars. Integer
    arithmetic only (int64 intermediates); rounding half up.
    """
    if acc.dtype != torch.int32:
        raise ValueError(f"lowbit.requant: acc must be int32, got {acc.dtype}")
    if m0.dtype != torch.int32 or shift.dtype != torch.int32:
        raise ValueError(f"lowbit.requant: m0 and shift must be int32, got {m0.dtype} and {shift.dtype}")
    if bool((shift < MIN_SHIFT).any()) or bool((shift > MAX_SHIFT).any()):
        raise ValueError(f"lowbit.requant: shift must be in [{MIN_SHIFT}, {MAX_SHIFT}]")
    x = acc.to(torch.int64)
    if bias_q is not None:
        if bias_q.dtype != torch.int32:
            raise ValueError(f"lowbit.requant: bias_q must be int32, got {bias_q.dtype}")
        x = x + bias_q.to(torch.int64)
    s = shift.to(torch.int64)
    half = torch.bitwise_left_shift(torch.ones_like(s), s - 1)
    y = torch.bitwise_right_shift(x * m0.to(torch.int64) + half, s)
    return y.clamp(0 if relu else -QMAX, QMAX).to(torch.int8)


def float_path_bound(acc: torch.Tensor, bias: torch.Tensor | None, multiplier: torch.Tensor,
                     s_out: torch.Tensor) -> torch.Tensor:
    """The module doc's ``delta`` per element: when < 1, integer and float paths differ by <= 1 LSB."""
    a = acc.to(torch.float64) * multiplier.to(torch.float64)
    b = torch.zeros(()) if bias is None else bias.to(torch.float64) / s_out.to(torch.float64)
    t = (a + b).abs()
    return multiplier.to(torch.float64) / 2 + 2.0**-31 * t + 2.0**-21 * (a.abs() + b.abs())


class IntegerLinear(nn.Module):
    """int8 [.., K] codes (scale ``in_scale``) -> int8 [.., N] codes (scale ``out_scale``), integers only.

    The GEMM is :func:`lowbit.ops.int8_mm` (exact int32, kernel-backed); requantization is
    :func:`requantize`. Build it from a static :class:`lowbit.nn.Int8Linear` and the scale the
    next layer wants its input in (its ``act_scale``): :meth:`from_int8_linear`.
    """

    def __init__(self, qweight: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor, bias_q: torch.Tensor | None,
                 in_scale: torch.Tensor, out_scale: torch.Tensor, relu: bool = False):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.relu = relu
        self.register_buffer("qweight", qweight)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)
        self.register_buffer("bias_q", bias_q)
        # Only to enter and leave the integer domain; forward never reads them.
        self.register_buffer("in_scale", in_scale.to(torch.float32).reshape(()))
        self.register_buffer("out_scale", out_scale.to(torch.float32).reshape(()))

    @classmethod
    def from_int8_linear(cls, m, out_scale: float | torch.Tensor, relu: bool = False) -> IntegerLinear:
        if getattr(m, "activation", None) != "static":
            raise ValueError("lowbit IntegerLinear: needs an Int8Linear with activation='static' "
                             "(lowbit.calibrate makes them)")
        out_scale = torch.as_tensor(out_scale, dtype=torch.float32).reshape(())
        if not (float(out_scale) > 0 and torch.isfinite(out_scale)):
            raise ValueError(f"lowbit IntegerLinear: out_scale must be finite and > 0, got {float(out_scale)}")
        acc_scale = m.act_scale.to(torch.float64) * m.scale.to(torch.float64)  # [N]
        m0, shift = quantize_multiplier(acc_scale / out_scale.to(torch.float64))
        bias_q = None if m.bias is None else quantize_bias(m.bias, acc_scale)
        return cls(m.qweight, m0, shift, bias_q, m.act_scale, out_scale, relu)

    def multiplier(self) -> torch.Tensor:
        """The real multiplier each channel applies, float64 (for checks)."""
        return self.m0.to(torch.float64) * torch.pow(2.0, -self.shift.to(torch.float64))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if q.dtype != torch.int8 or q.dim() == 0 or q.shape[-1] != self.in_features:
            raise ValueError(f"lowbit IntegerLinear: input must be int8 [..., {self.in_features}], got "
                             f"{q.dtype} {list(q.shape)}")
        acc = ops.int8_mm(q.reshape(-1, self.in_features), self.qweight)
        out = requantize(acc, self.m0, self.shift, self.bias_q, self.relu)
        return out.reshape(*q.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias_q is not None}, relu={self.relu}")
