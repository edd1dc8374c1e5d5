"""QuantizedConv2d: the lowering (im2col / 1x1 channels-last) against F.conv2d, every family,
odd geometries, unsupported layers, lowbit.quantize on a CNN, torch.compile.

Weight-only schemes: the module must equal ``F.conv2d(x, dequantized_weight, bias)`` up to float
summation order, ``|err| <= (K + 2) u conv(|x|, |W|) + u |b|`` with K = C*kh*kw (gamma_{K+1},
any order). W8A8 / fp8 activations are quantized per patch, which F.conv2d cannot express: the
module must then equal its own inner linear on independently unfolded patches, bit for bit.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.configs import Unsupported, resolve
from lowbit.nn import QuantizedConv2d


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny layers: per-op OpenMP synchronisation costs more than a second thread saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


U = 2.0**-24
GEOMETRIES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=1),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=(3, 1), padding=(1, 0), dilation=(2, 1)),
    dict(kernel_size=2, stride=3, bias=False),
]
WEIGHT_ONLY = ["int8-weight", "int4", "int4-g32", "fp8-weight"]
ACTIVATION = ["int8", "fp8", "fp8-block"]


def _gid(g):
    return "-".join(f"{k}{v}" for k, v in g.items())


def _conv(geometry, C=5, O=7):
    conv = nn.Conv2d(C, O, **geometry)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(-1, 1, O).reshape(-1, 1, 1, 1))
    return conv


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_gid)
@pytest.mark.parametrize("preset", WEIGHT_ONLY)
@pytest.mark.parametrize("batch", [1, 3])
def test_weight_only_matches_conv2d_on_dequantized_weight(geometry, preset, batch):
    conv = _conv(geometry)
    x = torch.randn(batch, 5, 11, 8)
    m = QuantizedConv2d.from_float(conv, resolve(preset))
    w = m.dequantize(torch.float32)
    assert w.shape == conv.weight.shape
    with torch.no_grad():
        want = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation)
        got = m(x)
        S = F.conv2d(x.double().abs(), w.double().abs(), None, conv.stride, conv.padding, conv.dilation)
        if conv.bias is not None:
            S = S + conv.bias.double().abs().reshape(1, -1, 1, 1)
    assert got.shape == want.shape
    K = conv.weight[0].numel()
    assert ((got - want).double().abs() <= (K + 2) * U * S).all()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_gid)
@pytest.mark.parametrize("preset", ACTIVATION)
def test_activation_quantized_equals_inner_linear_on_patches(geometry, preset):
    conv = _conv(geometry)
    x = torch.randn(2, 5, 9, 10)
    m = QuantizedConv2d.from_float(conv, resolve(preset))
    with torch.no_grad():
        cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [B, K, L]
        Ho = (9 + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        Wo = (10 + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
        y = m.linear(cols.transpose(1, 2).reshape(-1, cols.shape[1]))
        want = y.reshape(2, Ho, Wo, 7).permute(0, 3, 1, 2)
        got = m(x)
    assert torch.equal(got, want)
    # and it is a quantized conv: close to the float one (int8/fp8 relative error << 10%)
    ref = conv(x)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    conv = _conv(dict(kernel_size=3, padding=1)).to(dtype)
    m = QuantizedConv2d.from_float(conv, resolve("int8"))
    y = m(torch.randn(2, 5, 6, 6, dtype=dtype))
    assert y.dtype == dtype and y.shape == (2, 7, 6, 6)


def test_unsupported_layers():
    for conv, reason in [(nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
                         (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode"),
                         (nn.Conv2d(4, 4, 3, padding="same"), "padding='same'"),
                         (nn.Conv2d(4, 4, 3).double(), "float64")]:
        with pytest.raises(Unsupported, match=reason):
            QuantizedConv2d.from_float(conv, resolve("int8"))


def test_bad_input_shape():
    m = QuantizedConv2d.from_float(nn.Conv2d(3, 4, 3), resolve("int8"))
    for bad in (torch.randn(3, 8, 8), torch.randn(1, 4, 8, 8)):
        with pytest.raises(ValueError, match=r"input must have shape \[B, 3, H, W\]"):
            m(bad)


def test_empty_batch():
    for k in (1, 3):
        m = QuantizedConv2d.from_float(nn.Conv2d(3, 4, k), resolve("int8"))
        assert m(torch.randn(0, 3, 6, 6)).shape == (0, 4, 7 - k, 7 - k)


def test_quantize_converts_cnn_and_reports_grouped_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4),
                          nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    lowbit.quantize(model, "int4-g32")
    assert isinstance(model[0], QuantizedConv2d) and isinstance(model[3], QuantizedConv2d)
    assert type(model[2]) is nn.Conv2d  # kept float, with the reason recorded
    report = lowbit.last_report()
    assert [s.name for s in report.skipped] == ["2"] and "groups=4" in report.skipped[0].reason
    assert [name for name, _ in report.converted] == ["0", "3", "5"]
    assert (model(x) - ref).abs().max() < 0.2 * ref.abs().max()
    rows = {r["name"]: r for r in lowbit.summary(model).rows}
    assert rows["0.linear"]["shape"] == (8, 27) and rows["0.linear"]["scheme"] == "int4"


def test_compile_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    m = nn.Sequential(QuantizedConv2d.from_float(_conv(dict(kernel_size=3, padding=1)), resolve("int8")),
                      nn.ReLU(), QuantizedConv2d.from_float(nn.Conv2d(7, 3, 1), resolve("int4-g32")))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    x = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        assert torch.equal(compiled(x), m(x))
    assert counter.frame_count == 1
