"""lowbit.quant.observers: ranges from data, and exactly the parameters the formats and ops take."""

import pytest
import torch

from lowbit import ops
from lowbit.formats import int4 as int4_fmt
from lowbit.formats import int8 as int8_fmt
from lowbit.quant import affine
from lowbit.quant import observers as obs

GRANS = [("tensor", None), ("channel", None), ("group", 16)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", GRANS)
def test_minmax_is_choose_qparams_over_everything_seen(bits, symmetric, granularity, group_size):
    a, b = torch.randn(6, 64), torch.randn(6, 64) * 3 + 0.5
    o = obs.MinMaxObserver(bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    o.observe(a)
    o.observe(b)
    # Both calls add samples to the same groups: like quantizing both side by side.
    if granularity == "group":
        both = torch.cat([a.reshape(6, 4, 16), b.reshape(6, 4, 16)], -1).reshape(6, 128)
        want = affine.choose_qparams(both, bits, symmetric=symmetric, granularity="group", group_size=32)
    else:
        want = affine.choose_qparams(torch.cat([a, b], -1), bits, symmetric=symmetric, granularity=granularity)
    got = o.qparams()
    assert got.scale.shape == want.scale.shape and torch.equal(got.scale, want.scale)
    assert (got.zero_point is None) == symmetric
    if not symmetric:
        assert torch.equal(got.zero_point, want.zero_point)


def test_moving_average_follows_its_formula():
    o = obs.MovingAverageMinMaxObserver(8, averaging_constant=0.25, symmetric=False)
    xs = [torch.randn(100) * s for s in (1.0, 4.0, 0.5)]
    lo, hi = xs[0].min(), xs[0].max()
    for x in xs:
        o.observe(x)
    for x in xs[1:]:
        lo, hi = lo + 0.25 * (x.min() - lo), hi + 0.25 * (x.max() - hi)
    got_lo, got_hi = o.range()
    assert torch.allclose(got_lo.reshape(()), lo) and torch.allclose(got_hi.reshape(()), hi)


def test_percentile_drops_outliers_and_100_is_minmax():
    x = torch.randn(10000)
    x[123] = 1000.0
    p = obs.PercentileObserver(8, percentile=99.9)
    p.observe(x)
    k = round(10000 * 0.999)
    assert float(p.range()[1]) == pytest.approx(float(torch.kthvalue(x.abs(), k).values))
    assert float(p.range()[1]) < 10
    full = obs.PercentileObserver(8, percentile=100.0, symmetric=False)
    full.observe(x)
    mm = obs.MinMaxObserver(8, symmetric=False)
    mm.observe(x)
    assert torch.equal(full.qparams().scale, mm.qparams().scale)


def _roundtrip_err(x, p, group_size=None):
    return (affine.dequantize(affine.quantize(x, p), p) - x).pow(2)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 64)])
def test_mse_never_worse_than_minmax_and_better_on_heavy_tails(symmetric, granularity, group_size):
    x = torch.distributions.Laplace(0.0, 1.0).sample((8, 256))
    kw = dict(symmetric=symmetric, granularity=granularity, group_size=group_size)
    mse, mm = obs.MSEObserver(4, **kw), obs.MinMaxObserver(4, **kw)
    mse.observe(x)
    mm.observe(x)
    e_mse, e_mm = _roundtrip_err(x, mse.qparams()), _roundtrip_err(x, mm.qparams())
    if granularity != "tensor":  # every group chose for itself: no group got worse
        g = affine._grouped(x, granularity, group_size)
        per = lambda e: e.reshape(g.shape).sum(-1)  # noqa: E731
        assert bool((per(e_mse) <= per(e_mm) * (1 + 1e-6)).all())
    # Laplace tails: clipping the few largest values buys a finer grid for all the rest.
    assert float(e_mse.sum()) < 0.95 * float(e_mm.sum())


def test_mse_on_the_fp8_grid():
    x = torch.distributions.StudentT(2.0).sample((20000,))
    o = obs.MSEObserver(8, fp8_format="e4m3")
    o.observe(x)
    mm = obs.MinMaxObserver(8)
    mm.observe(x)

    def err(scale):
        q = ops.fp8_quantize_static(x, scale, "e4m3")
        return float((q.to(torch.float32) * scale - x).pow(2).sum())

    assert err(o.fp8_scale("e4m3")) <= err(mm.fp8_scale("e4m3"))


def test_tensor_observers_subsample_reproducibly():
    x = torch.randn(50000)
    a, b = obs.PercentileObserver(8, max_samples=1000, seed=3), obs.PercentileObserver(8, max_samples=1000, seed=3)
    for o in (a, b):
        o.observe(x)
        o.observe(x * 2)
    assert a.samples().numel() == 1000 and torch.equal(a.qparams().scale, b.qparams().scale)


def test_fp8_scale_is_the_op_rule():
    x = torch.randn(33, 70) * 5
    o = obs.MinMaxObserver(8)
    o.observe(x)
    for fmt in ("e4m3", "e5m2"):
        _, s = ops.fp8_quantize_dynamic(x, fmt, "tensor")
        assert torch.equal(o.fp8_scale(fmt), s)


def test_int8_forms_match_the_format_and_ops():
    w = torch.randn(48, 96) * torch.logspace(-2, 1, 96)
    o = obs.MinMaxObserver(8, granularity="channel")
    o.observe(w)
    got, want = obs.int8_weight(w, o.qparams()), int8_fmt.quantize_weight(w)
    assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scale, want.scale)
    x = torch.randn(10, 96)
    a = obs.MinMaxObserver(8)
    a.observe(x)
    s = obs.int8_act_scale(a.qparams())
    assert s.shape == () and s.dtype == torch.float32
    assert torch.equal(ops.int8_quantize_static(x, s), ops.int8_quantize_dynamic(x, per_row=False)[0])
    with pytest.raises(ValueError, match="per-tensor"):
        obs.int8_act_scale(o.qparams())
    with pytest.raises(ValueError, match="int8 weights"):
        obs.int8_weight(w, affine.choose_qparams(w, 4, granularity="channel"))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_int4_forms_match_the_format_bit_for_bit(symmetric, group_size):
    w = torch.randn(24, 256)
    gran = "channel" if group_size is None else "group"
    o = obs.MinMaxObserver(4, symmetric=symmetric, granularity=gran, group_size=group_size)
    o.observe(w)
    got = obs.int4_weight(w, o.qparams())
    want = int4_fmt.quantize_weight(w, group_size or 256, symmetric, torch.float32)
    assert torch.equal(got.packed, want.packed) and torch.equal(got.scale, want.scale)
    assert (got.zero is None) == symmetric and (symmetric or torch.equal(got.zero, want.zero))
    y = ops.int4_weight_only_mm(torch.randn(3, 256), got.packed, got.scale, got.zero, got.group_size)
    assert y.shape == (3, 24)


def test_observer_errors():
    with pytest.raises(ValueError, match="granularity"):
        obs.MinMaxObserver(8, granularity="row")
    with pytest.raises(ValueError, match="group_size"):
        obs.MinMaxObserver(8, granularity="group")
    with pytest.raises(ValueError, match="kind"):
        obs.make_observer("histogram")
    o = obs.MinMaxObserver(8, granularity="channel")
    with pytest.raises(RuntimeError, match="nothing observed"):
        o.qparams()
    with pytest.raises(ValueError, match="inf or NaN"):
        o.observe(torch.tensor([[1.0, float("nan")]]))
    o.observe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="leading shape"):
        o.observe(torch.randn(5, 8))
    with pytest.raises(ValueError, match="floating-point"):
        o.observe(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="percentile"):
        obs.PercentileObserver(8, percentile=20)
