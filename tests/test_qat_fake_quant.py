"""Fake quantization: values equal the real formats' bit for bit; STE and LSQ gradients equal
their definitions; the registry lets a new config type plug into prepare_qat / convert."""

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import configs
from lowbit.backends.reference import fp8 as fp8_ref
from lowbit.nn import FP8Linear, Int4Linear, Int8Linear
from lowbit.qat import fake_quant as fq


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny layers: per-op OpenMP synchronisation costs more than a second thread saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHAPES = [(1, 32), (5, 7), (16, 96), (3, 300)]


def _linear(N, K, dtype=torch.float32):
    lin = nn.Linear(K, N, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, dtype=dtype) * torch.logspace(-2, 1, N, dtype=dtype).unsqueeze(1))
    return lin


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), f"max |diff| {(a.float() - b.float()).abs().max().item()}"


# ----------------------------------------------------------------------------- int8
def _int8_definition(x, per_row):
    """Symmetric int8 by its written rule: scale = amax/127 (1 if 0), round half to even, clamp ±127."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True) if per_row else x32.abs().amax()
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.clamp(torch.round(x32 / scale), -127, 127) * scale).to(x.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_weight_equals_int8linear(shape, dtype):
    lin = _linear(*shape, dtype=dtype)
    _same(fq.int8_values(lin.weight, "channel"), Int8Linear.from_float(lin).dequantize())


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
def test_int8_values_match_definition(granularity):
    x = torch.randn(6, 40) * 3
    x[2] = 0.0  # an all-zero row keeps scale 1 and stays zero
    x[3, 5] = 1e-30
    got = fq.int8_values(x, granularity)
    _same(got, _int8_definition(x, granularity != "tensor"))
    # 3-D activations: per token = per row of the last dimension
    x3 = torch.randn(2, 3, 17)
    _same(fq.int8_values(x3, "token"), _int8_definition(x3, True))


# ----------------------------------------------------------------------------- int4
@pytest.mark.parametrize("N,K,group_size", [(4, 32, 32), (7, 96, 32), (3, 200, 64), (5, 128, 128), (2, 9, None),
                                            (6, 80, 128)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", [None, torch.bfloat16])
def test_int4_values_equal_int4linear(N, K, group_size, symmetric, scale_dtype):
    lin = _linear(N, K)
    m = Int4Linear.from_float(lin, group_size, symmetric, scale_dtype=scale_dtype)
    _same(fq.int4_values(lin.weight, group_size, symmetric, scale_dtype), m.dequantize(torch.float32))


def test_int4_clip_search_values_equal_int4linear():
    lin = _linear(6, 128)
    m = Int4Linear.from_float(lin, 32, False, clip_search=True)
    _same(fq.int4_values(lin.weight, 32, False, clip_search=True), m.dequantize(torch.float32))


# ----------------------------------------------------------------------------- fp8
@pytest.mark.parametrize("format", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("shape", [(5, 7), (130, 260)])
def test_fp8_weight_equals_fp8linear(format, granularity, shape):
    lin = _linear(*shape)
    m = FP8Linear.from_float(lin, format, granularity, activation="none")
    _same(fq.fp8_values(lin.weight, format, granularity), m.dequantize(torch.float32))


@pytest.mark.parametrize("format", ["e4m3", "e5m2"])
def test_fp8_activation_values_match_definition(format):
    """Per token: scale = amax/fmax, saturating round-to-nearest-even through torch's fp8 cast."""
    x = torch.randn(9, 50) * torch.logspace(-3, 3, 9).unsqueeze(1)
    x[4] = 0.0
    fmax = fp8_ref.FMAX[format]
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    want = torch.clamp(x / scale, -fmax, fmax).to(lowbit._checks.FP8_FORMATS[format]).float() * scale
    _same(fq.fp8_values(x, format, "row"), want)
    # 1x128 blocks: each block of a row has its own scale
    xb = torch.randn(3, 300)
    blocks = [fq.fp8_values(xb[:, i:i + 128], format, "row") for i in range(0, 300, 128)]
    _same(fq.fp8_values(xb, format, "block1x128"), torch.cat(blocks, dim=1))


# ----------------------------------------------------------------------------- STE
@pytest.mark.parametrize("fn", [
    lambda t: fq.fake_quantize_int8(t, "channel"),
    lambda t: fq.fake_quantize_int8(t, "tensor"),
    lambda t: fq.fake_quantize_int4(t, 32, False),
    lambda t: fq.fake_quantize_int4(t, 32, True),
    lambda t: fq.fake_quantize_fp8(t, "e4m3", "row"),
    lambda t: fq.fake_quantize_fp8(t, "e5m2", "block"),
])
def test_ste_value_and_gradient(fn):
    """Value: the fake-quantized tensor bit for bit. Gradient: the upstream gradient unchanged
    (scales come from the data's own range, so no value is clipped)."""
    x = torch.randn(8, 64, requires_grad=True)
    y = fn(x)
    _same(y.detach(), fn(x.detach()))
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    _same(x.grad, upstream)


def test_ste_mask():
    x = torch.randn(4, 5, requires_grad=True)
    mask = (torch.rand(4, 5) > 0.5).float()
    value = torch.round(x.detach())
    y = fq.ste(x, value, mask)
    _same(y.detach(), value)
    y.sum().backward()
    _same(x.grad, mask)


def _close_sums(got, terms, dim=None):
    """`got` equals the sum of `terms` (over `dim`) up to float32 summation: (n + 4) u sum|terms|."""
    want = terms.double().sum() if dim is None else terms.double().sum(dim)
    n = terms.numel() if dim is None else terms.shape[dim]
    bound = (n + 4) * 2.0**-24 * (terms.double().abs().sum() if dim is None else terms.double().abs().sum(dim))
    assert ((got.double() - want).abs() <= bound).all(), f"{got} vs {want}"


# ----------------------------------------------------------------------------- LSQ
def _lsq_definition(x, s, qn, qp, g):
    """LSQ (Esser et al. 2020), element by element: value, dL/dx and the per-element dL/ds terms
    for dL/dy = 1."""
    v = x / s
    q = torch.clamp(torch.round(v), qn, qp)
    inside = (v > qn) & (v < qp)
    dx = inside.to(x.dtype)
    ds = torch.where(v <= qn, qn * torch.ones_like(v), torch.where(v >= qp, qp * torch.ones_like(v),
                                                                   torch.round(v) - v)) * g
    return q * s, dx, ds


def test_lsq_int8_gradient_matches_definition():
    w = torch.randn(6, 40)
    m = fq.LSQInt8WeightFakeQuant(w)
    with torch.no_grad():  # shrink some steps so that values fall outside [-127, 127] and get clipped
        m.scale[:3] *= 0.5
    x = w.clone().requires_grad_(True)
    y = m(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    s = m.scale.detach().unsqueeze(1)
    g = 1.0 / math.sqrt(40 * 127)
    value, dx, ds = _lsq_definition(w, s.expand_as(w), -127.0, 127.0, g)
    _same(y.detach(), value)
    _same(x.grad, upstream * dx)
    _close_sums(m.scale.grad, upstream * ds, dim=1)
    assert (dx == 0).any(), "the test must reach the clipped region"


@pytest.mark.parametrize("symmetric", [True, False])
def test_lsq_int4_gradient_matches_definition(symmetric):
    N, K, gs = 4, 80, 32  # 3 groups per row, the last one partial
    w = torch.randn(N, K)
    m = fq.LSQInt4WeightFakeQuant(w, gs, symmetric, torch.float32)
    with torch.no_grad():
        m.scale[:, 0] *= 0.6
    x = w.clone().requires_grad_(True)
    y = m(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    G = m.scale.shape[1]
    g = 1.0 / math.sqrt(gs * (7 if symmetric else 15))
    gi = torch.arange(K) // gs
    s = m.scale.detach()[:, gi]
    z = m.zero[:, gi]
    value, dx, ds = _lsq_definition(w, s, -z, 15 - z, g)
    _same(y.detach(), value)
    _same(x.grad, upstream * dx)
    for grp in range(G):
        _close_sums(m.scale.grad[:, grp], (upstream * ds)[:, gi == grp], dim=1)


def test_lsq_starts_at_min_max_values():
    w = torch.randn(5, 96)
    _same(fq.LSQInt8WeightFakeQuant(w)(w).detach(), fq.int8_values(w, "channel"))
    for sym in (True, False):
        _same(fq.LSQInt4WeightFakeQuant(w, 32, sym, torch.float32)(w).detach(), fq.int4_values(w, 32, sym))


def test_lsq_scale_rounded_to_scale_dtype():
    w = torch.randn(3, 64)
    m = fq.LSQInt4WeightFakeQuant(w, 32, True, torch.bfloat16)
    with torch.no_grad():
        m.scale.mul_(1.0 + 2**-12)  # not a bf16 value any more
    s = m.step()
    _same(s.detach(), m.scale.detach().to(torch.bfloat16).float())


def test_lsq_fp8_rejected():
    with pytest.raises(ValueError, match="int8 and int4"):
        fq.fake_quant_scheme(configs.FP8Config(), torch.randn(4, 8), learnable_scales=True)


# ----------------------------------------------------------------------------- registry
def test_unregistered_config_is_a_clear_error():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NotRegisteredConfig(configs.Config):
        pass

    with pytest.raises(TypeError, match="no fake quantizer registered for NotRegisteredConfig"):
        fq.fake_quant_scheme(NotRegisteredConfig(), torch.randn(4, 8))


def test_registry_plugs_a_new_family_into_prepare_and_convert():
    """A family that arrives later registers its handler and its fake quantizer and nothing else."""
    from dataclasses import dataclass

    from lowbit.nn import Int8WeightOnlyLinear

    @dataclass(frozen=True)
    class ToySignConfig(configs.Config):
        pass

    def sign_values(w):  # one scale per row, codes ±1 (a binary-like format)
        return torch.sign(w.detach()) * w.detach().abs().mean(dim=1, keepdim=True)

    class SignLinear(Int8WeightOnlyLinear):
        scheme = "toy-sign"

    def handler(linear, config):
        m = SignLinear.from_float(linear)
        m.qweight = torch.sign(linear.weight.detach()).to(torch.int8)
        m.scale = linear.weight.detach().abs().mean(dim=1).float()
        return m

    configs.register_handler(ToySignConfig)(handler)
    fq.register_fake_quant(ToySignConfig)(
        lambda config, weight, learnable: fq.FakeQuantScheme(fq.MinMaxWeightFakeQuant(sign_values)))
    try:
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        qat = lowbit.prepare_qat(model, ToySignConfig())
        x = torch.randn(3, 16)
        y_fake = qat[0](x)
        w_fake = qat[0].fake_quant_weight(qat[0].weight).detach()
        conv = lowbit.convert(qat)
        assert isinstance(conv[0], SignLinear) and isinstance(conv[2], SignLinear)
        _same(conv[0].dequantize(torch.float32), w_fake)
        # same weights, same inputs: only the float summation order differs, |err| <= (K+2) u sum|x w| + u|b|
        bound = (16 + 2) * 2.0**-24 * ((x.abs() @ w_fake.abs().T) + conv[0].bias.abs())
        assert ((conv[0](x) - y_fake).abs() <= bound).all()
    finally:
        configs._HANDLERS.pop(ToySignConfig, None)
        configs._CONFIG_TYPES.pop("ToySignConfig", None)
        fq._FAKE_QUANT.pop(ToySignConfig, None)


def test_lsq_int8_activation_gradient_matches_definition():
    K = 24
    m = fq.LSQInt8ActivationFakeQuant(K)
    x0 = torch.randn(10, K)
    m(x0)  # first call sets the step to amax / 127
    assert torch.equal(m.scale.detach(), x0.abs().amax() / 127)
    x = (x0 * 3).requires_grad_(True)  # beyond the first batch's range: saturates
    y = m(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    s = m.scale.detach()
    value, dx, ds = _lsq_definition(x.detach(), s, -127.0, 127.0, 1.0 / math.sqrt(K * 127))
    _same(y.detach(), value)
    _same(x.grad, upstream * dx)
    _close_sums(m.scale.grad, upstream * ds)
    assert (dx == 0).any()
