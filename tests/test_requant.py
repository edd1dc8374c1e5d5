"""lowbit.quant.requant: integer-only W8A8 (int32 multiplier + shift) against exact arithmetic and the float path."""

import random
from fractions import Fraction

import pytest
import torch

from lowbit import ops
from lowbit.nn import Int8Linear
from lowbit.quant import requant as R


def test_quantize_multiplier_range_and_precision():
    m = torch.cat([torch.logspace(-9, 9, 200, base=2.0, dtype=torch.float64),
                   torch.tensor([1.0, 0.5, 1 - 2**-40, 2**-31, 2.0**29], dtype=torch.float64)])
    m0, shift = R.quantize_multiplier(m)
    assert m0.dtype == torch.int32 and shift.dtype == torch.int32
    assert bool((m0 >= 2**30).all()) and bool((m0.to(torch.int64) < 2**31).all())
    back = m0.to(torch.float64) * torch.pow(2.0, -shift.to(torch.float64))
    assert bool(((back - m).abs() <= m * 2.0**-31).all())  # 31 significant bits, rounded
    for bad in (0.0, -1.0, float("inf"), 2.0**31, 2.0**-40):
        with pytest.raises(ValueError, match="multiplier"):
            R.quantize_multiplier(torch.tensor([bad], dtype=torch.float64))


def test_requantize_is_exact_integer_rounding_half_up():
    rng = random.Random(0)
    acc = torch.randint(-2**31, 2**31 - 1, (64, 8), dtype=torch.int64).to(torch.int32)
    m0 = torch.tensor([2**30] + [rng.randrange(2**30, 2**31) for _ in range(7)], dtype=torch.int32)
    shift = torch.tensor([31, 62, 40, 45, 50, 55, 36, 33], dtype=torch.int32)
    bias_q = torch.tensor([0] + [rng.randrange(-2**20, 2**20) for _ in range(7)], dtype=torch.int32)
    out = R.requantize(acc, m0, shift, bias_q)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            t = Fraction((int(acc[i, j]) + int(bias_q[j])) * int(m0[j]), 2 ** int(shift[j]))
            want = max(-127, min(127, int((t + Fraction(1, 2)).__floor__())))
            assert int(out[i, j]) == want, (i, j)
    # M = 1/2 exactly: ties go up, towards +inf (not to even as in the float path).
    half_m0, half_shift = torch.tensor(2**30, dtype=torch.int32), torch.tensor(31, dtype=torch.int32)
    ties = torch.tensor([[1, -1, 3, -3, 5]], dtype=torch.int32)
    assert R.requantize(ties, half_m0, half_shift).tolist() == [[1, 0, 2, -1, 3]]
    assert R.requantize(torch.tensor([[-5, 5]], dtype=torch.int32), m0[:1], shift[:1], relu=True).tolist() == [[0, 3]]


def test_requantize_checks_its_arguments():
    acc = torch.zeros(2, 3, dtype=torch.int32)
    m0, s = R.quantize_multiplier(torch.full((3,), 0.01, dtype=torch.float64))
    with pytest.raises(ValueError, match="acc"):
        R.requantize(acc.float(), m0, s)
    with pytest.raises(ValueError, match="int32"):
        R.requantize(acc, m0.to(torch.int64), s)
    with pytest.raises(ValueError, match="shift"):
        R.requantize(acc, m0, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="bias_q"):
        R.requantize(acc, m0, s, torch.zeros(3))


def _static_layer(K, N, x, bias=True):
    lin = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-1, 1, N).unsqueeze(1))  # channel scales over two decades
    return lin, Int8Linear.from_float(lin, "static", x.abs().amax() / 127)


@pytest.mark.parametrize("M,K,N,bias", [(1, 64, 16, True), (37, 300, 70, True), (128, 1024, 96, False)])
def test_integer_linear_within_one_lsb_of_the_float_path(M, K, N, bias):
    x = torch.randn(M, K) * 2
    lin, m = _static_layer(K, N, x, bias)
    with torch.no_grad():
        out_scale = lin(x).abs().amax() / 127
    il = R.IntegerLinear.from_int8_linear(m, out_scale)
    q_in = ops.int8_quantize_static(x, m.act_scale)
    q_int = il(q_in)
    q_float = ops.int8_quantize_static(m(x), il.out_scale)  # float32 epilogue, then the next quantize
    acc = ops.int8_mm(q_in, m.qweight)
    # The derived bound (requant module doc) is < 1 here, hence at most one LSB apart.
    assert float(R.float_path_bound(acc, m.bias, il.multiplier(), il.out_scale).max()) < 1
    diff = (q_int.to(torch.int32) - q_float.to(torch.int32)).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).double().mean()) < 0.01  # and they disagree only near rounding ties


def test_chained_integer_layers_with_fused_relu():
    torch.manual_seed(3)
    K, H, N = 96, 128, 40
    x = torch.randn(50, K)
    lin1, m1 = _static_layer(K, H, x)
    with torch.no_grad():
        h = torch.relu(lin1(x))
    lin2, m2 = _static_layer(H, N, h)
    with torch.no_grad():
        out_scale = lin2(h).abs().amax() / 127
    l1 = R.IntegerLinear.from_int8_linear(m1, m2.act_scale, relu=True)  # emits layer 2's input codes
    l2 = R.IntegerLinear.from_int8_linear(m2, out_scale)
    q0 = ops.int8_quantize_static(x, m1.act_scale)
    q1 = l1(q0)
    assert int(q1.min()) >= 0
    q2 = l2(q1)
    # Float path with the same static scales: each stage rounds in float, then re-quantizes.
    q1_f = ops.int8_quantize_static(torch.relu(m1(x)), m2.act_scale)
    assert int((q1.int() - q1_f.int()).abs().max()) <= 1
    q2_f = ops.int8_quantize_static(m2(q1_f.float() * m2.act_scale), out_scale)
    # A one-LSB difference in a layer-2 input moves its output by at most M * sum|qweight row|.
    spread = l2.multiplier() * m2.qweight.abs().sum(1).double()
    bound = 1 + spread.unsqueeze(0) * float((q1.int() - q1_f.int()).abs().max())
    assert bool(((q2.int() - q2_f.int()).abs().double() <= bound).all())
    # And the integer pipeline still computes the float model.
    with torch.no_grad():
        ref = lin2(torch.relu(lin1(x)))
    err = (q2.float() * out_scale - ref).norm() / ref.norm()
    assert float(err) < 0.05


def test_integer_linear_rejects():
    lin = torch.nn.Linear(32, 8)
    with pytest.raises(ValueError, match="static"):
        R.IntegerLinear.from_int8_linear(Int8Linear.from_float(lin), 0.1)
    m = Int8Linear.from_float(lin, "static", 0.01)
    with pytest.raises(ValueError, match="out_scale"):
        R.IntegerLinear.from_int8_linear(m, 0.0)
    il = R.IntegerLinear.from_int8_linear(m, 0.05)
    with pytest.raises(ValueError, match="int8"):
        il(torch.zeros(2, 32))
    with pytest.raises(ValueError, match="int8"):
        il(torch.zeros(2, 31, dtype=torch.int8))
