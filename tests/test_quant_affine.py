"""lowbit.quant.affine: the reference affine quantization math."""

import pytest
import torch

from lowbit import ops
from lowbit.quant import affine


def test_symmetric_int8_is_the_op_rule_bit_for_bit():
    x = torch.randn(6, 5, 80) * torch.logspace(-3, 3, 80)
    x[2, 1] = 0
    q, p = affine.quantize_affine(x, 8, symmetric=True, granularity="channel")
    q_op, s_op = ops.int8_quantize_dynamic(x, per_row=True)
    assert q.dtype == torch.int8 and p.zero_point is None
    assert torch.equal(q, q_op) and torch.equal(p.scale, s_op)
    qt, pt = affine.quantize_affine(x, 8, granularity="tensor")
    qt_op, st_op = ops.int8_quantize_dynamic(x, per_row=False)
    assert pt.scale.shape == () and torch.equal(qt, qt_op) and torch.equal(pt.scale, st_op)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 16)])
def test_symmetric_range_and_error(bits, granularity, group_size):
    x = torch.randn(12, 64)
    q, p = affine.quantize_affine(x, bits, granularity=granularity, group_size=group_size)
    qmax = 2 ** (bits - 1) - 1
    assert (p.qmin, p.qmax) == (-qmax, qmax)
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax
    # The largest magnitude of each scale's block maps onto +-qmax.
    assert int(q.abs().max()) == qmax
    err = (affine.dequantize(q, p) - x).abs()
    step = p.scale if granularity == "tensor" else p.scale.unsqueeze(-1)
    if granularity == "group":
        err = err.reshape(12, 4, 16)
    assert bool((err <= step / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 8)])
def test_asymmetric(bits, granularity, group_size):
    x = torch.rand(10, 32) * 3 + 0.5  # all positive: asymmetric spends every code on the range
    x[:, 0] = 0.0
    q, p = affine.quantize_affine(x, bits, symmetric=False, granularity=granularity, group_size=group_size)
    assert q.dtype == torch.uint8 and p.zero_point.dtype == torch.int32
    assert int(q.min()) >= 0 and int(q.max()) <= 2**bits - 1
    back = affine.dequantize(q, p)
    assert bool((back[:, 0] == 0).all())  # zero is on the grid
    err = (back - x).abs()
    step = p.scale if granularity == "tensor" else p.scale.unsqueeze(-1)
    if granularity == "group":
        err = err.reshape(10, 4, 8)
    assert bool((err <= step / 2 * (1 + 1e-5)).all())


def test_group_equals_channel_on_reshaped_rows():
    x = torch.randn(8, 96)
    qg, pg = affine.quantize_affine(x, 4, granularity="group", group_size=32)
    qc, pc = affine.quantize_affine(x.reshape(8, 3, 32), 4, granularity="channel")
    assert pg.scale.shape == (8, 3)
    assert torch.equal(qg, qc.reshape(8, 96)) and torch.equal(pg.scale, pc.scale)


def test_zero_block_and_fake_quantize():
    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    q, p = affine.quantize_affine(x, 4, symmetric=False)
    assert bool((p.scale == 1).all()) and not affine.dequantize(q, p).any()
    y = torch.randn(4, 16, dtype=torch.bfloat16)
    fq = affine.fake_quantize(y, 8)
    assert fq.dtype == torch.bfloat16 and (fq.float() - y.float()).abs().max() < 0.05


def test_bad_arguments():
    x = torch.randn(4, 30)
    with pytest.raises(ValueError, match="group_size"):
        affine.quantize_affine(x, 4, granularity="group", group_size=16)
    with pytest.raises(ValueError, match="granularity"):
        affine.quantize_affine(x, 4, granularity="row")
    with pytest.raises(ValueError, match="bits"):
        affine.quantize_affine(x, 1, symmetric=True)
    with pytest.raises(ValueError, match="non-empty"):
        affine.quantize_affine(torch.randn(0, 4), 8)
