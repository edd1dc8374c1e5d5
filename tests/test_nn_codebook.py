"""CodebookLinear: conversion with every method, forward against the reference, presets, summary,
save/load with range checks, compile."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.backends.reference import codebook as ref
from lowbit.formats import codebook as fmt
from lowbit.nn import CodebookLinear

# Small learner budgets: these tests check the module's plumbing, not the learners' quality
# (tests/test_quant_codebook.py does that).
FAST = {"kmeans": {}, "lattice": {}, "pq": {"iters": 3}, "opq": {"iters": 2, "opq_iters": 2, "block": 32},
        "rq": {"iters": 3}, "aq": {"iters": 1, "kmeans_iters": 3}}


def sqnr_db(reference, approx):
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum()))


@pytest.mark.parametrize("method", list(FAST))
def test_every_method_converts_and_matches_its_dequantized_weight(method):
    torch.manual_seed(0)
    linear = nn.Linear(128, 24)
    m = CodebookLinear.from_float(linear, method, **FAST[method])
    assert (m.rotation is not None) == (method == "opq")
    x = torch.randn(2, 3, 128)
    y = m(x)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    # The layer computes x @ dequantize().T + b with fp32 accumulation; for opq the rotation is
    # applied to x in fp32 first (b + 1 roundings of |x| @ |R|.T each), then the codes' weight.
    xd = x.reshape(-1, 128).double()
    wd = m.dequantize(torch.float32).double()
    exact = xd @ wd.T + linear.bias.double()
    eps = torch.finfo(torch.float32).eps
    if m.rotation is None:
        bound = (128 + 4) * eps * (xd.abs() @ wd.abs().T + linear.bias.double().abs())
    else:
        w_codes = fmt.decode(m.codes, m.codebooks, m.scale, 128).double()
        x_rot_mag = fmt.apply_rotation(xd.abs().float(), m.rotation.abs()).double()
        b = m.rotation.shape[1]
        bound = (128 + 4 + b + 1) * eps * (x_rot_mag @ w_codes.abs().T + linear.bias.double().abs())
    assert ((y.reshape(-1, 24).double() - exact).abs() <= bound).all()
    # ... and it approximates the float layer (a layout or decode bug lands near 0 dB).
    assert sqnr_db(linear(x).detach(), y.detach()) > 5.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_dtypes_match_reference(dtype):
    linear = nn.Linear(256, 33).to(dtype)
    m = CodebookLinear.from_float(linear, "kmeans", bits=3)
    x = torch.randn(5, 256).to(dtype)
    y = m(x)
    assert y.dtype == dtype
    expected = ref.codebook_mm(x, m.codes, m.codebooks, m.scale, m.bias)
    xd, wd = x.double(), fmt.dequantize(m.quantized_weight()).double()
    bound = (256 + 4) * torch.finfo(torch.float32).eps * (xd.abs() @ wd.abs().T + m.bias.double().abs()) \
        + 2 * torch.finfo(dtype).eps * expected.double().abs() + torch.finfo(dtype).tiny
    assert ((y.double() - expected.double()).abs() <= bound).all()


def test_kmeans4_beats_uniform_int4_per_channel():
    torch.manual_seed(1)
    linear = nn.Linear(512, 64)
    w = linear.weight.detach()
    km = CodebookLinear.from_float(linear, "kmeans", bits=4, row_groups=64)  # one codebook per row
    from lowbit.formats import int4 as int4_fmt
    rtn = int4_fmt.dequantize(int4_fmt.quantize_weight(w, 512, symmetric=False))
    assert (km.dequantize(torch.float32) - w).pow(2).sum() < (rtn - w).pow(2).sum()


@pytest.mark.parametrize("preset,bpw", [("kmeans4", 4), ("kmeans3", 3), ("pq2", 2), ("aq2", 2), ("lattice", 2)])
def test_presets_and_summary_bits_include_codebooks(preset, bpw, monkeypatch):
    # The learners' default budgets are for real layers; shorten them here.
    from lowbit.quant import codebook as learn
    for name in ("product_quantize", "additive_quantize"):
        orig = getattr(learn, name)
        monkeypatch.setattr(learn, name, lambda *a, _f=orig, **k: _f(*a, **{**k, "iters": 1}))
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    q = lowbit.quantize(copy.deepcopy(model), preset)
    assert isinstance(q[0], CodebookLinear)
    row = lowbit.summary(q).rows[0]
    m = q[0]
    codebook_bits = m.codebooks.numel() * m.codebooks.element_size() * 8
    extra = sum(t.numel() * t.element_size() * 8 for t in (m.scale, m.rotation) if t is not None)
    assert row["bits_per_weight"] == pytest.approx(bpw + (codebook_bits + extra) / (64 * 32))


def test_state_dict_round_trip():
    m = CodebookLinear.from_float(nn.Linear(96, 12), "pq", bits=4, dim=2, groups=3, iters=2)
    fresh = CodebookLinear(96, 12, dim=2, bits=4, groups=3, codebook_dtype=torch.float16)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), m(x))


def test_save_load_round_trip_and_checks(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    q = lowbit.quantize(copy.deepcopy(model), "lattice")
    lowbit.save(q, tmp_path)
    loaded = copy.deepcopy(model)
    lowbit.load(tmp_path, loaded)
    x = torch.randn(4, 64)
    assert isinstance(loaded[0], CodebookLinear) and torch.equal(loaded(x), q(x))

    # A checkpoint whose codebook does not have 2**bits entries never reaches a kernel.
    import json
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["0.codebooks"] = tensors["0.codebooks"][:, :, :, :200].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    header = json.loads((tmp_path / "lowbit.json").read_text())
    header["modules"][0]["tensors"]["codebooks"]["shape"][3] = 200
    (tmp_path / "lowbit.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="lowbit.load: .*codebooks"):
        lowbit.load(tmp_path, copy.deepcopy(model))


def test_unsupported_dim_is_skipped_with_reason(caplog):
    model = nn.Sequential(nn.Linear(100, 8))
    lowbit.quantize(model, lowbit.CodebookConfig(method="pq", dim=8))
    assert isinstance(model[0], nn.Linear)
    assert "dim=8" in caplog.text or "dim 8" in caplog.text


def test_half_keeps_codebooks_and_rotation():
    m = CodebookLinear.from_float(nn.Linear(64, 8), "opq", **FAST["opq"])
    cb, rot = m.codebooks.clone(), m.rotation.clone()
    m.half()
    assert torch.equal(m.codebooks, cb) and m.rotation.dtype == torch.float32 and torch.equal(m.rotation, rot)
    assert m(torch.randn(2, 64).half()).dtype == torch.float16


def test_compile_fullgraph():
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    model[0] = CodebookLinear.from_float(model[0], "kmeans", bits=4)
    model[2] = CodebookLinear.from_float(model[2], "opq", **FAST["opq"])
    x = torch.randn(4, 128)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
