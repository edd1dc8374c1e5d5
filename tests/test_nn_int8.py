"""lowbit.formats.int8 and lowbit.nn.int8: the format, the modules, and their numerics against
the reference backend (lowbit.backends.reference.int8, the spec)."""

import io

import pytest
import torch
from torch import nn

from lowbit import ops
from lowbit._checks import INT8_MAX_K
from lowbit.backends.reference import int8 as ref
from lowbit.configs import Unsupported
from lowbit.formats import int8 as fmt
from lowbit.nn import Int8Linear, Int8WeightOnlyLinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODULES = [Int8Linear, Int8WeightOnlyLinear]


def sqnr(reference: torch.Tensor, out: torch.Tensor) -> float:
    reference, out = reference.double(), out.double()
    return (10 * torch.log10(reference.pow(2).sum() / (reference - out).pow(2).sum())).item()


def make_linear(K=96, N=48, bias=True, dtype=torch.float32):
    return nn.Linear(K, N, bias=bias).to(dtype)


def reference_forward(module, x):
    """What the module must compute, written with the reference ops only."""
    x2 = x.reshape(-1, module.in_features)
    if isinstance(module, Int8Linear):
        q, s = ref.int8_quantize_dynamic(x2)
        y = ref.int8_scaled_mm(q, module.qweight, s, module.scale, module.bias, x.dtype)
    else:
        y = ref.int8_weight_only_mm(x2, module.qweight, module.scale, module.bias)
    return y.reshape(*x.shape[:-1], module.out_features)


def assert_close_to_reference(module, x, out):
    """`out` equals the reference up to the freedom the op contract leaves to a kernel."""
    expected = reference_forward(module, x)
    eps = torch.finfo(out.dtype).eps
    # Rounding to the output dtype: a kernel may order the float32 epilogue differently, which
    # can move the rounded result by an ulp.
    tol = 2 * eps * expected.abs().float() + 2 * eps * expected.abs().max().float()
    if isinstance(module, Int8WeightOnlyLinear):
        # Float32 accumulation over K in an order of the kernel's choosing: the rounding errors
        # grow like sqrt(K) * eps32 * sum_k |x_k * w_k| (a random walk).
        K = module.in_features
        w = module.qweight.float().abs() * module.scale[:, None]
        magnitude = (x.reshape(-1, K).float().abs() @ w.T).reshape(expected.shape)
        tol = tol + 4 * K**0.5 * torch.finfo(torch.float32).eps * magnitude
    err = (out.float() - expected.float()).abs()
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"


# ----------------------------------------------------------------------------- format
def test_format_quantize_weight_is_the_op_rule():
    w = torch.randn(40, 72)
    w[3] = 0  # an all-zero channel must stay finite and exact
    iw = fmt.quantize_weight(w)
    q, s = ref.int8_quantize_dynamic(w)
    assert iw.qweight.dtype == torch.int8 and iw.qweight.shape == (40, 72) and iw.qweight.is_contiguous()
    assert iw.scale.dtype == torch.float32 and iw.scale.shape == (40,)
    assert torch.equal(iw.qweight, q) and torch.equal(iw.scale, s)
    assert iw.scale[3] == 1.0 and not iw.qweight[3].any()
    assert int(iw.qweight.abs().max()) <= 127
    # Round-to-nearest: every weight is within half a step of its code.
    err = (iw.dequantize() - w).abs()
    assert bool((err <= iw.scale[:, None] / 2 * (1 + 1e-6)).all())


def test_format_sizes():
    iw = fmt.quantize_weight(torch.randn(10, 64))
    assert iw.nbytes() == 10 * 64 + 4 * 10
    assert iw.bits_per_weight() == pytest.approx(8 + 32 / 64)
    assert (iw.out_features, iw.in_features) == (10, 64)


def test_format_rejects_bad_tensors():
    with pytest.raises(ValueError, match="qweight"):
        fmt.Int8Weight(torch.zeros(4, 8, dtype=torch.int16), torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        fmt.Int8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, dtype=torch.float16))
    with pytest.raises(ValueError, match="scale"):
        fmt.Int8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5))


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(cls, dtype, bias):
    linear = make_linear(bias=bias, dtype=dtype)
    m = cls.from_float(linear)
    assert m.qweight.dtype == torch.int8 and m.scale.dtype == torch.float32
    assert (m.bias is None) == (not bias)
    if bias:
        assert m.bias.dtype == dtype and torch.equal(m.bias, linear.bias)
    x = torch.randn(2, 7, 96).to(dtype)
    out = m(x)
    assert out.dtype == dtype and out.shape == (2, 7, 48)
    assert_close_to_reference(m, x, out)


@pytest.mark.parametrize("cls,min_db", [(Int8Linear, 38.0), (Int8WeightOnlyLinear, 41.0)], ids=["int8", "int8-weight"])
def test_close_to_float(cls, min_db):
    # Gaussian data: per-channel/per-token int8 with amax ~3 sigma gives ~43 dB per quantized
    # operand, so ~40 dB for W8A8 (two operands) and ~43 dB weight-only.
    linear = make_linear(K=256, N=128)
    x = torch.randn(32, 256)
    with torch.no_grad():
        expected = linear(x)
    assert sqnr(expected, cls.from_float(linear)(x)) >= min_db


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
def test_leading_dims(cls):
    m = cls.from_float(make_linear())
    # W8A8 accumulates exactly in int32 and quantizes each token alone, so a row's result cannot
    # depend on the batch around it; weight-only accumulates in float32, whose summation order
    # may change with M (GEMV vs GEMM paths).
    tol = dict(rtol=0, atol=0) if cls is Int8Linear else dict(rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 5, 96)
    out = m(x)
    assert out.shape == (2, 3, 5, 48)
    torch.testing.assert_close(out, m(x.reshape(30, 96)).reshape(2, 3, 5, 48), **tol)
    torch.testing.assert_close(m(x[1, 2, 4]), out[1, 2, 4], **tol)  # 1-D input
    xt = torch.randn(96, 6).t()  # non-contiguous input: same result as the contiguous one
    torch.testing.assert_close(m(xt), m(xt.contiguous()), **tol)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
def test_empty_batch_and_wrong_width(cls):
    m = cls.from_float(make_linear())
    assert m(torch.randn(0, 96)).shape == (0, 48)
    assert m(torch.randn(2, 0, 96)).shape == (2, 0, 48)
    with pytest.raises(ValueError, match=r"\[\.\.\., 96\]"):
        m(torch.randn(4, 48))  # 192 elements would silently reshape to [2, 96]


# ----------------------------------------------------------------------------- module API
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
def test_module_metadata(cls):
    m = cls.from_float(make_linear(K=64, N=32, dtype=torch.bfloat16))
    assert (m.in_features, m.out_features) == (64, 32)
    assert m.scheme == {Int8Linear: "int8", Int8WeightOnlyLinear: "int8-weight"}[cls]
    assert m.weight_nbytes() == 64 * 32 + 4 * 32
    assert m.bits_per_weight() == pytest.approx(8.5)
    assert "in_features=64, out_features=32, bias=True" in repr(m) and m.scheme in repr(m)
    assert not hasattr(m, "weight")
    assert m.dequantize().dtype == torch.bfloat16
    torch.testing.assert_close(m.dequantize(torch.float32), fmt.dequantize(m.quantized_weight()), rtol=0, atol=0)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dict_round_trip(cls, bias):
    m = cls.from_float(make_linear(bias=bias, dtype=torch.bfloat16))
    sd = m.state_dict()
    assert set(sd) == ({"qweight", "scale", "bias"} if bias else {"qweight", "scale"})
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = cls(96, 48, bias=bias, dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
def test_model_dtype_cast_keeps_scales_float32(cls):
    linear = make_linear()
    m = cls.from_float(linear)
    scale = m.scale.clone()
    m.to(torch.bfloat16)
    assert m.scale.dtype == torch.float32 and torch.equal(m.scale, scale)
    assert m.bias.dtype == torch.bfloat16 and m.qweight.dtype == torch.int8
    m.half()
    assert m.scale.dtype == torch.float32 and torch.equal(m.scale, scale)
    x = torch.randn(3, 96, dtype=torch.float16)
    assert m(x).dtype == torch.float16


# ----------------------------------------------------------------------------- eligibility
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
def test_from_float_rejects_what_it_cannot_convert(cls):
    cases = {
        "float64": make_linear().double(),
        "meta device": nn.Linear(8, 8, device="meta"),
        "zero-sized": nn.Linear(0, 8),
        "MultiheadAttention": nn.MultiheadAttention(16, 2).out_proj,
    }
    nonfinite = make_linear()
    with torch.no_grad():
        nonfinite.weight[0, 0] = float("inf")
    cases["inf or NaN"] = nonfinite
    hooked = make_linear()
    hooked.register_forward_hook(lambda *a: None)
    cases["hooks"] = hooked
    for match, linear in cases.items():
        with pytest.raises(Unsupported, match=match):
            cls.from_float(linear)


def test_large_k_only_limits_w8a8():
    linear = nn.Linear(INT8_MAX_K + 1, 1, bias=False)
    with pytest.raises(Unsupported, match=f"in_features={INT8_MAX_K + 1} exceeds {INT8_MAX_K}"):
        Int8Linear.from_float(linear)
    m = Int8WeightOnlyLinear.from_float(linear)  # float32 accumulation has no such limit
    x = torch.randn(2, INT8_MAX_K + 1)
    assert_close_to_reference(m, x, m(x))


# ----------------------------------------------------------------------------- torch.compile
class TwoLayer(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.up = cls.from_float(nn.Linear(64, 128))
        self.down = cls.from_float(nn.Linear(128, 32, bias=False))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
def test_compile_fullgraph(cls):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = TwoLayer(cls)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    for shape in [(4, 64), (9, 64), (2, 3, 64)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    # One graph per input rank, not per batch size: the leading-dims reshape stays symbolic.
    assert counter.frame_count == 2


@pytest.mark.slow
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
def test_compile_inductor(cls):
    torch._dynamo.reset()
    model = TwoLayer(cls)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(8, 64)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- devices
@pytest.mark.cuda
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.scheme)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(cls, dtype):
    m = cls.from_float(make_linear(K=256, N=128, dtype=dtype)).cuda()
    assert m.scale.dtype == torch.float32 and m.qweight.is_cuda
    x = torch.randn(3, 17, 256, device="cuda").to(dtype)
    out = m(x)
    assert out.dtype == dtype and out.device == x.device
    assert_close_to_reference(m, x, out)
    compiled = torch.compile(m, fullgraph=True)
    assert_close_to_reference(m, x, compiled(x))
