"""lowbit.formats.fp8 and lowbit.nn.FP8Linear: the format, the module, its presets, and a swap on
a transformers model, against the reference backend (lowbit.backends.reference.fp8)."""

import copy
import io

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends.reference import fp8 as ref
from lowbit.configs import FP8Config, Unsupported
from lowbit.formats import fp8 as fmt
from lowbit.nn import FP8Linear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANTS = {
    "e4m3-row": dict(format="e4m3", granularity="row"),
    "e5m2-row": dict(format="e5m2", granularity="row"),
    "e4m3-tensor": dict(format="e4m3", granularity="tensor"),
    "e4m3-block": dict(format="e4m3", granularity="block"),
    "e4m3-weight": dict(format="e4m3", granularity="row", activation="none"),
    "e4m3-block-weight": dict(format="e4m3", granularity="block", activation="none"),
    "e4m3-static": dict(format="e4m3", granularity="row", activation="static", act_scale=4.0 / 448),
    "e4m3-block-static": dict(format="e4m3", granularity="block", activation="static", act_scale=4.0 / 448),
    "e5m2-weight-e4m3-act": dict(format="e5m2", granularity="row", act_format="e4m3"),
}


def sqnr(reference: torch.Tensor, out: torch.Tensor) -> float:
    reference, out = reference.double(), out.double()
    return (10 * torch.log10(reference.pow(2).sum() / (reference - out).pow(2).sum())).item()


def make_linear(K=300, N=140, bias=True, dtype=torch.float32):
    return nn.Linear(K, N, bias=bias).to(dtype)


def reference_forward(m: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the module must compute, written with the reference ops only."""
    x2 = x.reshape(-1, m.in_features)
    if m.activation == "none":
        y = ref.fp8_weight_only_mm(x2, m.qweight, m.scale, m.bias)
    else:
        if m.activation == "dynamic":
            gran = {"tensor": "tensor", "row": "row", "block": "block1x128"}[m.granularity]
            q, s = ref.fp8_quantize_dynamic(x2, m.act_format, gran)
        else:
            q, s = ref.fp8_quantize_static(x2, m.act_scale, m.act_format), m.act_scale
            if m.granularity == "block":
                s = s.expand(x2.shape[0], (m.in_features + 127) // 128)
        y = ref.fp8_scaled_mm(q, m.qweight, s, m.scale, m.bias, x.dtype)
    return y.reshape(*x.shape[:-1], m.out_features)


def assert_close_to_reference(m, x, out):
    expected = reference_forward(m, x)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    # The quantized activations are bit exact (tests/test_fp8.py); what remains is fp32
    # accumulation over K in the kernel's order (<= K * eps32 * sum|terms|, random-walk
    # sqrt(K) in practice) and the final rounding to the output dtype.
    K = m.in_features
    w = m.dequantize(torch.float32).abs()
    magnitude = (x.reshape(-1, K).float().abs() * 1.07 @ w.T).reshape(expected.shape)  # 1.07: e4m3/e5m2 rounding of x
    eps = torch.finfo(out.dtype).eps
    tol = 4 * K**0.5 * torch.finfo(torch.float32).eps * magnitude + 2 * eps * expected.abs().float() + 1e-30
    err = (out.float() - expected.float()).abs()
    assert bool((err <= tol).all()), f"max excess {(err - tol).max().item():.3g}"


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("granularity", fmt.GRANULARITIES)
@pytest.mark.parametrize("format", fmt.FORMATS)
def test_format_quantize_weight_is_the_op_rule(format, granularity):
    w = torch.randn(140, 300)
    w[3] = 0
    fw = fmt.quantize_weight(w, format, granularity)
    op_gran = {"tensor": "tensor", "row": "row", "block": "block128x128"}[granularity]
    q, s = ref.fp8_quantize_dynamic(w, format, op_gran)
    assert fw.qweight.dtype == fmt.FP8_FORMATS[format] and fw.qweight.is_contiguous()
    assert torch.equal(fw.qweight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(fw.scale, s)
    assert fw.scale.shape == fmt.scale_shape(granularity, 140, 300) and fw.format == format
    torch.testing.assert_close(fw.dequantize(), ref.fp8_dequantize(q, s), rtol=0, atol=0)
    # Round to nearest: relative error <= half a mantissa step (2**-4 e4m3, 2**-3 e5m2) above the subnormals.
    rel = {"e4m3": 2.0**-4, "e5m2": 2.0**-3}[format]
    err = (fw.dequantize() - w).abs()
    half_subnormal = {"e4m3": 2.0**-10, "e5m2": 2.0**-17}[format]
    assert bool((err <= w.abs() * rel + ref.expand_scale(s, w.shape) * half_subnormal).all())


def test_format_sizes_and_validation():
    fw = fmt.quantize_weight(torch.randn(130, 256), "e4m3", "block")
    assert fw.nbytes() == 130 * 256 + 4 * 2 * 2 == fmt.nbytes(130, 256, "block")
    assert fmt.nbytes(10, 64, "row") == 640 + 40 and fmt.nbytes(10, 64, "tensor") == 640 + 4
    with pytest.raises(ValueError, match="qweight"):
        fmt.Fp8Weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), "row")
    with pytest.raises(ValueError, match="scale must be float32 with shape \\[4\\]"):
        fmt.Fp8Weight(torch.zeros(4, 8).to(torch.float8_e4m3fn), torch.ones(4).half(), "row")
    with pytest.raises(ValueError, match="granularity"):
        fmt.quantize_weight(torch.randn(4, 8), "e4m3", "column")


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(variant, dtype):
    linear = make_linear(dtype=dtype)
    m = FP8Linear.from_float(linear, **VARIANTS[variant])
    assert m.scale.dtype == torch.float32 and m.qweight.dtype == fmt.FP8_FORMATS[m.format]
    assert m.bias.dtype == dtype and torch.equal(m.bias, linear.bias)
    for shape in [(1, 300), (2, 7, 300), (40, 300)]:  # small-M and large-M kernel paths
        x = torch.randn(shape).to(dtype)
        out = m(x)
        assert out.dtype == dtype and out.shape == (*shape[:-1], 140)
        assert_close_to_reference(m, x, out)


@pytest.mark.parametrize("variant,min_db", [("e4m3-row", 28.0), ("e4m3-block", 28.0), ("e4m3-weight", 31.0),
                                            ("e5m2-row", 22.0)])
def test_close_to_float(variant, min_db):
    # Gaussian data: e4m3 rounding (3 mantissa bits) gives ~31 dB per quantized operand, so ~28 dB
    # with both operands quantized; e5m2 (2 bits) ~6 dB less.
    linear = make_linear(K=256, N=128)
    x = torch.randn(32, 256)
    with torch.no_grad():
        expected = linear(x)
    assert sqnr(expected, FP8Linear.from_float(linear, **VARIANTS[variant])(x)) >= min_db


def test_leading_dims_empty_batch_and_wrong_width():
    m = FP8Linear.from_float(make_linear())
    x = torch.randn(2, 3, 5, 300)
    out = m(x)
    torch.testing.assert_close(out, m(x.reshape(30, 300)).reshape(2, 3, 5, 140), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x[1, 2, 4]), out[1, 2, 4], rtol=1e-5, atol=1e-5)
    assert m(torch.randn(0, 300)).shape == (0, 140)
    with pytest.raises(ValueError, match=r"\[\.\.\., 300\]"):
        m(torch.randn(2, 150))


def test_static_activation_scale_and_calibrate():
    linear = make_linear()
    with pytest.raises(ValueError, match="act_scale"):
        FP8Linear.from_float(linear, activation="static")
    m = FP8Linear.from_float(linear, granularity="tensor", activation="static", act_scale=1e-3)
    x = torch.randn(8, 300) * 3
    m.calibrate(x)
    amax = x.abs().max()
    assert m.act_scale.item() == pytest.approx((amax / 448).item(), rel=1e-6)
    m.calibrate(x / 10)  # a running max: never shrinks
    assert m.act_scale.item() == pytest.approx((amax / 448).item(), rel=1e-6)
    dyn = FP8Linear.from_float(linear, granularity="tensor")
    # A per-tensor static scale calibrated on x is the dynamic per-tensor scale of x.
    torch.testing.assert_close(m(x), dyn(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="calibrate"):
        dyn.calibrate(x)


# ----------------------------------------------------------------------------- module API
def test_module_metadata():
    m = FP8Linear.from_float(make_linear(K=256, N=128, dtype=torch.bfloat16), granularity="block")
    assert m.scheme == "fp8" and m.weight_nbytes() == 256 * 128 + 4 * 2
    assert m.bits_per_weight() == pytest.approx(8 * (256 * 128 + 8) / (256 * 128))
    assert "granularity='block'" in repr(m) and not hasattr(m, "weight")
    assert m.dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["e4m3-row", "e4m3-block-static"])
def test_state_dict_round_trip_and_dtype_cast(variant):
    kw = VARIANTS[variant]
    m = FP8Linear.from_float(make_linear(dtype=torch.bfloat16), **kw)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = FP8Linear(300, 140, dtype=torch.bfloat16, **{k: v for k, v in kw.items() if k != "act_scale"})
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 300, dtype=torch.bfloat16)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    scale = m.scale.clone()
    m.half()
    assert m.scale.dtype == torch.float32 and torch.equal(m.scale, scale) and m.qweight.dtype == torch.float8_e4m3fn
    assert m.act_scale is None or m.act_scale.dtype == torch.float32
    assert m(x.half()).dtype == torch.float16


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_from_float_rejects_what_it_cannot_convert():
    nonfinite = make_linear()
    with torch.no_grad():
        nonfinite.weight[0, 0] = float("nan")
    for match, linear in {"float64": make_linear().double(), "meta device": nn.Linear(8, 8, device="meta"),
                          "inf or NaN": nonfinite}.items():
        with pytest.raises(Unsupported, match=match):
            FP8Linear.from_float(linear)
    with pytest.raises(ValueError, match="format must be one of"):
        FP8Linear.from_float(make_linear(), format="e3m4")


# ----------------------------------------------------------------------------- configs / presets
def test_presets_and_config_round_trip():
    assert lowbit.PRESETS["fp8"] == FP8Config(format="e4m3", granularity="row")
    assert lowbit.PRESETS["fp8-e5m2"].format == "e5m2" and lowbit.PRESETS["fp8-block"].granularity == "block"
    assert lowbit.PRESETS["fp8-weight"].weight_only
    cfg = FP8Config(format="e5m2", granularity="block", weight_only=True)
    assert lowbit.configs.Config.from_dict(cfg.to_dict()) == cfg
    model = nn.Sequential(make_linear(), nn.ReLU(), make_linear(K=140, N=10))
    q = lowbit.quantize(copy.deepcopy(model), "fp8-block")
    assert all(isinstance(layer, FP8Linear) and layer.granularity == "block" for layer in (q[0], q[2]))
    q = lowbit.quantize(copy.deepcopy(model), FP8Config(granularity="diagonal"))
    assert len(q._lowbit_report.skipped) == 2 and "granularity" in q._lowbit_report.skipped[0].reason


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("variant", ["e4m3-row", "e4m3-block", "e4m3-weight", "e4m3-block-static"])
def test_compile_fullgraph(variant):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = nn.Sequential(FP8Linear.from_float(nn.Linear(64, 128), **VARIANTS[variant]), nn.ReLU(),
                          FP8Linear.from_float(nn.Linear(128, 32, bias=False), **VARIANTS[variant]))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=True)
    for shape in [(4, 64), (9, 64), (2, 3, 64)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 2  # one graph per input rank


# ----------------------------------------------------------------------------- transformers
# E4M3 keeps 3 mantissa bits: ~31 dB per quantized operand, ~28.5 dB per W8A8 layer (int8: ~40).
# Logits SQNR of the whole swapped model, measured on seeds 0-1: BERT 25.2-25.4 dB, Llama
# 21.9-22.0 dB (15 layers in series; int8 gives 35.9 / 32.9 on the same models).
SWAP_MODELS = {"bert": (25.0, 14), "llama": (21.0, 15)}


@pytest.mark.parametrize("arch", SWAP_MODELS)
def test_swap_on_transformers_model_from_config(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=4, intermediate_size=512, vocab_size=1000)
        model = transformers.LlamaForCausalLM(config).eval()
    else:
        config = transformers.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=512, vocab_size=1000)
        model = transformers.BertForMaskedLM(config).eval()
    min_db, n_linear = SWAP_MODELS[arch]
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        q = lowbit.quantize(copy.deepcopy(model), "fp8")
        logits = q(input_ids=ids).logits
    assert len(q._lowbit_report.converted) == n_linear and not q._lowbit_report.skipped
    assert all(isinstance(q.get_submodule(n), FP8Linear) for n, _ in q._lowbit_report.converted)
    assert sqnr(expected, logits) >= min_db
