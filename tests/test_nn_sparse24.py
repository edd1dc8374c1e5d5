"""Sparse24Linear: pruning + compression, forward against the pruned dense layer, presets, summary,
save/load, recovery, compile."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends.reference import int8 as int8_ref
from lowbit.formats import sparse24 as fmt
from lowbit.nn import Sparse24Linear
from lowbit.quant.nm_prune import is_nm_sparse, nm_prune


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [384, 37])
def test_forward_equals_the_pruned_dense_layer(dtype, K):
    linear = nn.Linear(K, 33).to(dtype)
    m = Sparse24Linear.from_float(linear)
    w = m.dequantize(torch.float32)
    assert is_nm_sparse(w) and torch.equal(w, nm_prune(linear.weight.detach()).float())
    x = torch.randn(2, 5, K).to(dtype)
    y = m(x)
    assert y.shape == (2, 5, 33) and y.dtype == dtype
    xd, wd = x.reshape(-1, K).double(), w.double()
    exact = xd @ wd.T + linear.bias.double()
    bound = (K + 3) * torch.finfo(torch.float32).eps * (xd.abs() @ wd.abs().T + linear.bias.double().abs()) \
        + torch.finfo(dtype).eps * exact.abs() * 1.01 + 1e-30
    assert ((y.reshape(-1, 33).double() - exact).abs() <= bound).all()


def test_int8_values_are_w8a8_exactly_like_int8_scaled_mm():
    linear = nn.Linear(200, 24)
    m = Sparse24Linear.from_float(linear, torch.int8)
    assert m.values.dtype == torch.int8 and m.scale.dtype == torch.float32
    x = torch.randn(7, 200)
    q, s = lowbit.ops.int8_quantize_dynamic(x)
    dense_q = fmt.decompress(m.values, m.meta, 200, torch.int8)
    want = int8_ref.int8_scaled_mm(q, dense_q, s, m.scale, m.bias, torch.float32)
    assert torch.equal(m(x), want)


def test_quality_of_sparse24_int8_against_sparse24():
    torch.manual_seed(0)
    linear = nn.Linear(512, 128)
    x = torch.randn(32, 512)
    f = Sparse24Linear.from_float(linear)
    i8 = Sparse24Linear.from_float(linear, torch.int8)
    yf, yi = f(x), i8(x)
    sqnr = 10 * torch.log10(yf.pow(2).sum() / (yf - yi).pow(2).sum())
    assert sqnr > 30, float(sqnr)  # int8 on top of 2:4 adds ~1% error, far below the pruning's


def test_presets_summary_bytes_saved():
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    q = lowbit.quantize(copy.deepcopy(model), "sparse24")
    assert isinstance(q[0], Sparse24Linear) and q[0].values.dtype == torch.float32
    s = lowbit.summary(q)
    # fp32 values: 16 bits + 1 bit of metadata per weight (vs 32)
    assert s.rows[0]["bits_per_weight"] == pytest.approx(17.0)
    assert s.bytes_after < s.bytes_before
    q8 = lowbit.quantize(copy.deepcopy(model), "sparse24-int8")
    assert q8[0].values.dtype == torch.int8
    assert lowbit.summary(q8).rows[0]["bits_per_weight"] == pytest.approx(5 + 32 / 256)
    half = lowbit.quantize(copy.deepcopy(model).half(), "sparse24")
    assert half[0].values.dtype == torch.float16
    assert lowbit.summary(half).rows[0]["bits_per_weight"] == pytest.approx(9.0)


def test_unsupported_pattern_is_skipped_with_reason(caplog):
    model = nn.Sequential(nn.Linear(64, 8))
    lowbit.quantize(model, lowbit.Sparse24Config(n=4, m=8))
    assert isinstance(model[0], nn.Linear)
    assert "4:8" in caplog.text


def test_one_of_four_runs_on_the_2_4_kernels():
    linear = nn.Linear(64, 8)
    m = Sparse24Linear.from_float(linear, n=1, m=4)
    w = m.dequantize(torch.float32)
    assert is_nm_sparse(w, 1, 4)
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), x @ w.T + linear.bias, rtol=1e-5, atol=1e-5)


def test_calibration_saliency_and_recovery_reduce_output_error():
    torch.manual_seed(0)
    K = 128
    mix = torch.randn(K, K) / K**0.5 + torch.eye(K)
    scales = torch.rand(K) * 3 + 0.1  # uneven input magnitudes: where |w|·‖x‖ beats |w|
    calib = (torch.randn(1024, K) @ mix) * scales
    test = (torch.randn(256, K) @ mix) * scales
    linear = nn.Linear(K, 64)
    y = linear(test).detach()

    def err(m):
        return float((m(test).detach() - y).pow(2).mean() / y.pow(2).mean())

    mag = Sparse24Linear.from_float(linear)
    sal = Sparse24Linear.from_float(linear, calibration=calib)
    rec = Sparse24Linear.from_float(linear, calibration=calib, recovery=True)
    assert err(sal) < err(mag)
    assert err(rec) < 0.8 * err(sal), (err(mag), err(sal), err(rec))
    assert is_nm_sparse(rec.dequantize(torch.float32))


def test_save_load_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    lowbit.quantize(model, "sparse24-int8")
    lowbit.save(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    lowbit.load(tmp_path, fresh)
    assert isinstance(fresh[0], Sparse24Linear) and fresh[0].values.dtype == torch.int8
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_load_refuses_bad_metadata(tmp_path):
    from safetensors.torch import load_file, save_file

    model = nn.Sequential(nn.Linear(64, 32))
    lowbit.quantize(model, "sparse24")
    lowbit.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["0.meta"][0, 0] = 0x00
    save_file(tensors, tmp_path / "model.safetensors")
    fresh = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="meta"):
        lowbit.load(tmp_path, fresh)
    assert isinstance(fresh[0], nn.Linear)


def test_compile_fullgraph():
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    lowbit.quantize(model, "sparse24")
    x = torch.randn(4, 128)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
    m8 = nn.Sequential(nn.Linear(128, 64))
    lowbit.quantize(m8, "sparse24-int8")
    c8 = torch.compile(m8, fullgraph=True, backend="aot_eager")
    assert torch.equal(c8(x), m8(x))
