"""prepare_qat -> train -> convert: the kernel-backed layer computes what the fake-quantized one did.

The bound. A fake-quantized layer computes ``fl(sum_k a_k b_k + bias)`` in float32, where
``a_k``, ``b_k`` are the fake-quantized input and weight (the formats' own values, bit for bit:
tests/test_qat_fake_quant.py). The converted layer computes the same sum from the codes:

* weight-only (int8-weight, int4, fp8-weight): the kernel multiplies by exactly ``b_k`` and
  accumulates in float32 in its own order: each sum is within ``gamma_{K+1} * S`` of the exact
  one, ``S = sum_k |a_k b_k| + |bias|`` (Higham, Thm 3.1; any summation order);
* W8A8 / fp8 activations: ``a_k = fl(qa_k sa)``, ``b_k = fl(qb_k sb)`` (one rounding each), while
  the kernel sums ``qa_k qb_k`` (exactly in int32 for int8; fp8 products are exact in float32
  and summed with ``gamma_K``) and rescales: two more roundings for the scales, one for the
  int32 -> float32 conversion, one for the bias.

Adding both sides' errors: ``|fake - converted| <= (K + 8) u S`` with ``u = 2**-24`` (the
constant covers the roundings listed; second-order terms are far below the slack). Fake
values are exact (the converted weight is compared bit for bit below), so the bound is tight
up to that constant and a wrong code, scale or fold (an error of a whole quantization step)
breaks it by orders of magnitude.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import QuantizedConv2d, im2col
from lowbit.qat import QATConfig, QATConv2d, QATConvBn2d, QATLinear, QATLinearBn1d


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny layers: per-op OpenMP synchronisation costs more than a second thread saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


U = 2.0**-24
SCHEMES = [
    ("int8", False), ("int8", True), ("int8-weight", False), ("int8-weight", True),
    ("int4", False), ("int4", True), ("int4-g32", False), (lowbit.Int4Config(32, symmetric=True), True),
    (lowbit.Int4Config(None, symmetric=True), False),
    ("fp8", False), ("fp8-e5m2", False), ("fp8-block", False), ("fp8-weight", False),
    (lowbit.FP8Config(granularity="tensor"), False),
]


def _ids(s):
    cfg, lsq = s
    return f"{cfg if isinstance(cfg, str) else repr(cfg)}{'-lsq' if lsq else ''}"


def _train(model, x, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _rows_and_weight(layer, x):
    """The fake-quantized [M, K] input rows and [N, K] weight the layer multiplies, and its bias."""
    w_src, b = layer._float_weights()
    w = layer.fake_quant_weight(w_src).detach().reshape(w_src.shape[0], -1)
    if isinstance(layer, QATConv2d):
        rows, _, _ = im2col(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    else:
        rows = x.reshape(-1, x.shape[-1])
    act = layer.act_fake_quant
    rows = act(rows).detach() if act is not None else rows
    return rows, w, None if b is None else b.detach()


def _bound(rows, w, b):
    S = rows.double().abs() @ w.double().abs().T
    if b is not None:
        S = S + b.double().abs()
    return (w.shape[1] + 8) * U * S


def _check_layer(layer, x, converted):
    with torch.no_grad():
        y_fake = layer(x)
        y_conv = converted(x)
    rows, w, b = _rows_and_weight(layer, x)
    # the converted weight is the fake-quantized weight, bit for bit
    deq = converted.linear.dequantize(torch.float32) if isinstance(converted, QuantizedConv2d) \
        else converted.dequantize(torch.float32)
    assert torch.equal(deq.reshape(w.shape), w)
    if isinstance(layer, QATConv2d):
        diff = (y_fake - y_conv).permute(0, 2, 3, 1).reshape(-1, w.shape[0])
    else:
        diff = (y_fake - y_conv).reshape(-1, w.shape[0])
    bound = _bound(rows, w, b)
    excess = (diff.double().abs() - bound).max().item()
    assert excess <= 0, f"exceeds the bound by {excess}"
    return (y_fake - y_conv).abs().max().item()


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_linear_converted_matches_fake(scheme):
    cfg, lsq = scheme
    x = torch.randn(2, 5, 96)
    model = nn.Sequential(nn.Linear(96, 40))
    qat = _train(lowbit.prepare_qat(model, QATConfig(cfg, learnable_scales=lsq)), x)
    assert isinstance(qat[0], QATLinear)
    layer = qat[0]
    converted = lowbit.convert(copy.deepcopy(qat))[0]
    assert not isinstance(converted, QATLinear)
    _check_layer(layer, x, converted)


CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=0),
         dict(kernel_size=1), dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=2)]


CONV_CASES = ([(s, CONVS[0]) for s in SCHEMES]
              + [(s, g) for s in [("int8", False), ("int4-g32", True), ("fp8-weight", False)] for g in CONVS[1:]])


@pytest.mark.parametrize("scheme,geometry", CONV_CASES,
                         ids=[_ids(s) + "-" + "-".join(f"{k}{v}" for k, v in g.items()) for s, g in CONV_CASES])
def test_conv_converted_matches_fake(scheme, geometry):
    cfg, lsq = scheme
    x = torch.randn(2, 6, 9, 7)
    model = nn.Sequential(nn.Conv2d(6, 12, **geometry))
    qat = _train(lowbit.prepare_qat(model, QATConfig(cfg, learnable_scales=lsq)), x)
    layer = qat[0]
    assert type(layer) is QATConv2d
    converted = lowbit.convert(copy.deepcopy(qat))[0]
    assert isinstance(converted, QuantizedConv2d)
    _check_layer(layer, x, converted)


@pytest.mark.parametrize("scheme", [("int8", False), ("int4-g32", True), ("fp8", False)], ids=_ids)
def test_fused_bn_converted_matches_fake(scheme):
    cfg, lsq = scheme
    x = torch.randn(4, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 64, 16), nn.BatchNorm1d(16))
    qat = _train(lowbit.prepare_qat(model, QATConfig(cfg, learnable_scales=lsq)), x)
    assert isinstance(qat[0], QATConvBn2d) and isinstance(qat[4], QATLinearBn1d)
    assert isinstance(qat[1], nn.Identity) and isinstance(qat[5], nn.Identity)
    converted = lowbit.convert(copy.deepcopy(qat))
    _check_layer(qat[0], x, converted[0])
    h = qat[3](qat[2](qat[0](x))).detach()
    _check_layer(qat[4], h, converted[4])


def test_converted_model_end_to_end():
    """A small CNN: every layer converted, each within its bound on the inputs it sees in the
    fake-quantized model."""
    x = torch.randn(3, 1, 8, 8)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    qat = _train(lowbit.prepare_qat(model, QATConfig("int4-g32")), x)
    converted = lowbit.convert(copy.deepcopy(qat))
    kinds = [type(m).__name__ for m in converted]
    assert kinds.count("QuantizedConv2d") == 2 and "Int4Linear" in kinds
    assert not any(isinstance(m, (QATLinear, QATConv2d)) for m in converted.modules())
    inputs = {}
    hooks = [qat[i].register_forward_hook(lambda m, args, out, i=i: inputs.__setitem__(i, args[0].detach()))
             for i in (0, 3, 7)]
    with torch.no_grad():
        qat(x)
    for h in hooks:
        h.remove()
    for i in (0, 3, 7):
        _check_layer(qat[i], inputs[i], converted[i])


def test_compile_fullgraph_converted_conv_model():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.Flatten(), nn.Linear(4 * 64, 5))
    converted = lowbit.convert(_train(lowbit.prepare_qat(model, QATConfig("int8")), x))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(converted, fullgraph=True, backend=counter)
    with torch.no_grad():
        assert torch.equal(compiled(x), converted(x))
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- schedules, clipping, filters
def test_progressive_bit_width_schedule():
    x = torch.randn(4, 64)
    sched = lowbit.qat.ProgressiveSchedule(stages=[(0, "int8-weight"), (2, "int4-g32")])
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    qat = lowbit.prepare_qat(model, QATConfig(schedule=sched, learnable_scales=True))
    opt = torch.optim.SGD(qat.parameters(), lr=0.01)
    n_params = sum(1 for _ in qat.parameters())
    assert n_params == 4 + 2 + 2  # weights, biases, one LSQ scale per layer per stage: all known up front
    stages = []
    for _ in range(4):
        loss = qat(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step(qat)
        stages.append(qat[0].stage)
    assert stages == [0, 1, 1, 1]
    with torch.no_grad():
        assert torch.equal(qat[0].fake_quant_weight(qat[0].weight), qat[0].weight_fake_quants[1](qat[0].weight))
    converted = lowbit.convert(qat.eval())
    assert type(converted[0]).__name__ == "Int4Linear" and converted[0].group_size == 32


def test_progressive_fraction_schedule():
    sched = lowbit.qat.ProgressiveSchedule(ramp=(0, 4), start_fraction=0.0, order="backward")
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    qat = lowbit.prepare_qat(model, QATConfig("int8", schedule=sched))
    on = []
    for _ in range(4):
        sched.step(qat)
        on.append([m.quant_enabled for m in qat])
    assert on == [[False, False, False, True], [False, False, True, True], [False, True, True, True], [True] * 4]
    assert sched.fraction_at(0) == 0.0 and sched.fraction_at(100) == 1.0
    # a layer still float at conversion time converts to float
    sched.apply(qat, 1)
    converted = lowbit.convert(copy.deepcopy(qat))
    assert [type(m).__name__ for m in converted] == ["Linear", "Linear", "Linear", "Int8Linear"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        y_fake = qat[2](qat[1](qat[0](x)))
        y_conv = converted[2](converted[1](converted[0](x)))
    assert torch.equal(y_fake, y_conv)  # float layers: the same F.linear


@pytest.mark.parametrize("bad", [dict(stages=[(1, "int8")]), dict(stages=[(0, "int8"), (0, "int4")]),
                                 dict(ramp=(5, 5)), dict(order="sideways"), dict(start_fraction=1.5)])
def test_schedule_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="ProgressiveSchedule"):
        lowbit.qat.ProgressiveSchedule(**bad)


def test_clip_gradients_clips_weights_and_scales_separately():
    x = torch.randn(16, 32) * 100
    qat = lowbit.prepare_qat(nn.Sequential(nn.Linear(32, 16)),
                             QATConfig("int4-g32", learnable_scales=True, grad_clip_norm=0.5,
                                       scale_grad_clip_norm=0.01))
    qat(x).square().mean().backward()
    w_norm, s_norm = lowbit.qat.clip_gradients(qat)
    assert w_norm > 0.5 and s_norm > 0.01
    weights = [qat[0].weight.grad, qat[0].bias.grad]
    torch.testing.assert_close(torch.linalg.vector_norm(torch.cat([g.flatten() for g in weights])),
                               torch.tensor(0.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(qat[0].weight_fake_quant.scale.grad),
                               torch.tensor(0.01), rtol=1e-5, atol=0)


def test_prepare_skips_what_it_cannot_convert_and_honours_filter():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    qat = lowbit.prepare_qat(model, "int8", filter_fn=lambda m, name: name != "3")
    assert type(qat[0]) is nn.Conv2d and isinstance(qat[1], QATConv2d) and type(qat[3]) is nn.Linear
    report = qat._lowbit_report
    assert [s.name for s in report.skipped] == ["0"] and "groups=2" in report.skipped[0].reason
    assert report.excluded == ["3"]


def test_prepare_root_layer_and_unknown_preset():
    lin = nn.Linear(8, 4)
    q = lowbit.prepare_qat(lin, "int4-g32")
    assert isinstance(q, QATLinear)
    assert isinstance(lowbit.convert(q), lowbit.nn.Int4Linear)
    with pytest.raises(ValueError, match="unknown preset"):
        lowbit.prepare_qat(nn.Linear(8, 4), "int3")


def test_qat_gradients_reach_float_weights():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    qat = lowbit.prepare_qat(model, "int8")
    F.cross_entropy(qat(torch.randn(5, 2, 6, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert qat[0].weight.grad is not None and qat[0].weight.grad.abs().sum() > 0
    assert qat[3].weight.grad is not None and qat[3].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv", "conv-bn"])
def test_static_activation_steps_convert_to_static_int8(kind):
    if kind == "linear":
        model, x = nn.Sequential(nn.Linear(48, 16)), torch.randn(6, 48)
    elif kind == "conv":
        model, x = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), torch.randn(2, 4, 7, 7)
    else:
        model, x = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)), torch.randn(2, 4, 7, 7)
    qat = _train(lowbit.prepare_qat(model, QATConfig("int8", learnable_scales=True, static_activations=True)),
                 x * 3)  # trained on a wider range than x: the learned step is no per-call amax
    layer = qat[0]
    converted = lowbit.convert(copy.deepcopy(qat))[0]
    inner = converted.linear if isinstance(converted, QuantizedConv2d) else converted
    assert inner.activation == "static"
    assert torch.equal(inner.act_scale, layer.act_fake_quant.step().detach())
    _check_layer(layer, x, converted)
    _check_layer(layer, x * 10, converted)  # saturating inputs: both sides clamp to ±127 steps


def test_static_activations_only_for_w8a8():
    with pytest.raises(ValueError, match="static"):
        lowbit.prepare_qat(nn.Sequential(nn.Linear(8, 4)), QATConfig("int4", static_activations=True))
