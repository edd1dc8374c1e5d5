"""Batch-norm folding: exact in eval mode (float64: to 1e-12; float32: within the rounding bound
derived below), and the QAT fused modules' batch statistics / freeze behaviour.

float32 bound. Reference: ``y = conv(x, W) + b`` (error <= gamma_K (S + |b|), ``S = conv(|x|, |W|)``),
then eval batch norm ``(y - mean) * a + beta`` (a few roundings, each <= u times
``|a| (|y| + |mean|) + |beta|``). Folded: ``W' = fl(W a)`` (u |W a|), ``b' = fl(fl(b - mean) a + beta)``
and ``conv(x, W') + b'`` (gamma_K (|a| S + |b'|)). Both within
``(K + 8) u (|a| (S + |b| + |mean|) + |beta|)`` of the exact value, so they differ by at most
twice that.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.qat import QATConfig, QATConvBn2d, QATLinearBn1d, find_bn_pairs, fold_bn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny layers: per-op OpenMP synchronisation costs more than a second thread saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


U32 = 2.0**-24


def _randomize_bn(bn, dtype=torch.float32):
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n, dtype=dtype))
        bn.running_var.copy_(torch.rand(n, dtype=dtype) * 2 + 0.05)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(n, dtype=dtype))
            bn.bias.copy_(torch.randn(n, dtype=dtype))


def _model(affine=True, conv_bias=True):
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(8, affine=affine), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 6, 1, stride=2), nn.BatchNorm2d(6)), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10, bias=conv_bias), nn.BatchNorm1d(10, affine=affine))
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            _randomize_bn(mod)
    return m.eval()


def test_find_pairs():
    assert sorted(find_bn_pairs(_model())) == [("0", "1"), ("3.0", "3.1"), ("5", "6")]
    # not adjacent (a ReLU between) or not the matching kind: not folded
    assert find_bn_pairs(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.BatchNorm2d(2))) == []
    assert find_bn_pairs(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm2d(2))) == []


@pytest.mark.parametrize("affine,conv_bias", [(True, True), (False, False), (True, False)])
def test_fold_exact_float64(affine, conv_bias):
    model = _model(affine, conv_bias).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    want = model(x)
    folded = fold_bn(copy.deepcopy(model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    got = folded(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _bound32(x, layer, bn, conv=True):
    """(K + 8) u (|a| (S + |b| + |mean|) + |beta|) per output element, times 2 (both sides)."""
    with torch.no_grad():
        a = (bn.weight if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
        beta = bn.bias.double().abs() if bn.bias is not None else 0.0
        b = layer.bias.double().abs() if layer.bias is not None else 0.0
        if conv:
            S = F.conv2d(x.double().abs(), layer.weight.double().abs(), None, layer.stride, layer.padding)
            shape = (1, -1, 1, 1)
        else:
            S = x.double().abs() @ layer.weight.double().abs().T
            shape = (1, -1)
        K = layer.weight[0].numel()
        per = lambda t: t.reshape(shape) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return 2 * (K + 8) * U32 * (per(a.abs()) * (S + per(b) + per(bn.running_mean.double().abs())) + per(beta))


@pytest.mark.parametrize("conv", [True, False])
def test_fold_float32_within_bound(conv):
    if conv:
        layer, bn, x = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), torch.randn(4, 16, 9, 9) * 3
    else:
        layer, bn, x = nn.Linear(200, 24), nn.BatchNorm1d(24), torch.randn(7, 200) * 3
    _randomize_bn(bn)
    model = nn.Sequential(layer, bn).eval()
    with torch.no_grad():
        want = model(x)
        bound = _bound32(x, layer, bn, conv)
        got = fold_bn(copy.deepcopy(model))(x)
    assert ((got - want).double().abs() <= bound).all()


def test_fold_explicit_pairs_and_errors():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    block = Block().eval()
    _randomize_bn(block.bn)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    block = block.double()
    want = block(x)
    assert find_bn_pairs(block) == []  # not a Sequential: the caller must say the bn reads the conv
    fold_bn(block, pairs=[("conv", "bn")])
    assert isinstance(block.bn, nn.Identity)
    torch.testing.assert_close(block(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot fold"):
        fold_bn(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm2d(3)), pairs=[("0", "1")])
    no_stats = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    assert find_bn_pairs(no_stats) == []


def test_ptq_fold_then_quantize_cnn():
    model = _model()
    x = torch.randn(3, 3, 8, 8)
    want = model(x)
    q = lowbit.quantize(fold_bn(copy.deepcopy(model)), "int8")
    assert [type(m).__name__ for m in q.modules()].count("QuantizedConv2d") == 2
    assert (q(x) - want).abs().max() < 0.05 * want.abs().max()  # int8 W8A8: ~1% relative error per layer


# ----------------------------------------------------------------------------- QAT fused modules
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fused_training_uses_batch_stats(kind):
    """With batch statistics the fused module is layer + nn.BatchNorm in training mode (the fold
    is undone on the output): same outputs and running statistics, checked in float64 (rounding
    2**-53: 1e-10 leaves four orders of magnitude for K and batch-sized sums)."""
    if kind == "conv":
        float_model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)).double()
        x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 2 + 1
        fused = QATConvBn2d.from_modules(copy.deepcopy(float_model[0]), copy.deepcopy(float_model[1]),
                                         [lowbit.Int8Config(weight_only=True)])
    else:
        float_model = nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6)).double()
        x = torch.randn(16, 12, dtype=torch.float64) * 2 + 1
        fused = QATLinearBn1d.from_modules(copy.deepcopy(float_model[0]), copy.deepcopy(float_model[1]),
                                           [lowbit.Int8Config(weight_only=True)])
    _randomize_bn(float_model[1], torch.float64)
    fused.bn.load_state_dict(float_model[1].state_dict())
    fused.quant_enabled = False  # float64 has no fake quantizer; the batch-norm math is what is tested
    float_model.train()
    fused.train()
    for _ in range(3):
        torch.testing.assert_close(fused(x), float_model(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fused.bn.running_mean, float_model[1].running_mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fused.bn.running_var, float_model[1].running_var, rtol=1e-10, atol=1e-10)
    # eval: running statistics, i.e. the folded layer
    fused.eval()
    float_model.eval()
    torch.testing.assert_close(fused(x), float_model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fused_freezes_running_stats_after_step(kind):
    if kind == "conv":
        float_model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        x = torch.randn(8, 3, 5, 5) * 2 + 1
    else:
        float_model = nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6))
        x = torch.randn(16, 12) * 2 + 1
    _randomize_bn(float_model[1])
    qat = lowbit.prepare_qat(float_model, QATConfig("int8", freeze_bn_step=2)).train()
    fused = qat[0]
    for step in range(2):
        before = fused.bn.running_mean.clone()
        qat(x)
        assert not torch.equal(fused.bn.running_mean, before)  # batch statistics are tracked
    assert int(fused.bn.num_batches_tracked) == 2 and not fused.bn_frozen
    frozen_mean, frozen_var = fused.bn.running_mean.clone(), fused.bn.running_var.clone()
    y_train = qat(x)  # num_batches_tracked >= freeze_bn_step: frozen from here on
    qat(x)
    assert fused.bn_frozen
    assert torch.equal(fused.bn.running_mean, frozen_mean) and torch.equal(fused.bn.running_var, frozen_var)
    assert int(fused.bn.num_batches_tracked) == 2
    with torch.no_grad():
        y_eval = copy.deepcopy(qat).eval()(x)
    assert torch.equal(y_train.detach(), y_eval)  # frozen training forward == eval forward == folded layer
    converted = lowbit.convert(copy.deepcopy(qat).eval())
    with torch.no_grad():
        wq = fused.fake_quant_weight(fused._float_weights()[0]).detach()
        assert torch.equal(converted[0].dequantize(torch.float32).reshape(wq.shape), wq)


def test_fused_gradients_flow_to_bn_affine_and_weight():
    qat = lowbit.prepare_qat(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), QATConfig("int8")).train()
    qat(torch.randn(4, 2, 6, 6)).square().mean().backward()
    fused = qat[0]
    for p in (fused.weight, fused.bn.weight, fused.bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
