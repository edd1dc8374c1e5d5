"""Int4Linear: conversion, forward against the reference, presets, summary, compile."""

import copy

import pytest
import torch
from torch import nn

import cpu_routes
import lowbit
from lowbit.backends.reference import int4 as ref
from lowbit.formats import int4 as fmt
from lowbit.nn import Int4Linear


def sqnr_db(reference, approx):
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum()))


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_reference(group_size, symmetric, dtype):
    linear = nn.Linear(384, 33).to(dtype)
    m = Int4Linear.from_float(linear, group_size=group_size, symmetric=symmetric)
    x = torch.randn(2, 5, 384).to(dtype)
    y = m(x)
    assert y.shape == (2, 5, 33) and y.dtype == dtype
    expected = ref.int4_weight_only_mm(x.reshape(-1, 384), m.packed, m.scale, m.zero, m.group_size, m.bias)
    # Same weight, same fp32 accumulation: only the summation order may differ. Except for bf16 x
    # of 5-256 rows on AMX CPUs (here 10): the AMX kernel rounds each weight once to bf16.
    xd = x.reshape(-1, 384).double()
    wd = fmt.dequantize(m.quantized_weight()).double()
    bound = 386 * torch.finfo(torch.float32).eps * (xd.abs() @ wd.abs().T) + torch.finfo(dtype).eps * expected.double().abs() + 1e-30
    if dtype == torch.bfloat16 and cpu_routes.amx_bf16_ready():
        bound = bound + torch.finfo(torch.bfloat16).eps * (xd.abs() @ wd.abs().T)
    err = (y.reshape(-1, 33).double() - expected.double()).abs()
    assert (err <= bound + (linear.bias.abs().double() * torch.finfo(dtype).eps)).all()


def test_quality_against_float_and_clip_search_helps():
    torch.manual_seed(1)
    linear = nn.Linear(1024, 256)
    x = torch.randn(64, 1024)
    y = linear(x).detach()
    rtn = Int4Linear.from_float(linear, group_size=128)
    clipped = Int4Linear.from_float(linear, group_size=128, clip_search=True)
    s_rtn, s_clip = sqnr_db(y, rtn(x).detach()), sqnr_db(y, clipped(x).detach())
    assert s_rtn >= 20.0, s_rtn
    w = linear.weight.detach()
    err = lambda m: (m.dequantize(torch.float32) - w).pow(2).sum()  # noqa: E731
    assert err(clipped) <= err(rtn)


def test_presets_and_summary_bits():
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    for preset, group in [("int4", 128), ("int4-g64", 64), ("int4-g32", 32)]:
        q = lowbit.quantize(copy.deepcopy(model), preset)
        assert isinstance(q[0], Int4Linear) and q[0].group_size == group and q[0].zero is not None
        rows = lowbit.summary(q).rows
        # 4 bits + (fp32 scale + fp32 zero) per group
        assert rows[0]["bits_per_weight"] == pytest.approx(4 + 64 / group)


def test_state_dict_round_trip():
    m = Int4Linear.from_float(nn.Linear(100, 7), group_size=None, symmetric=True)
    fresh = Int4Linear(100, 7, group_size=100, symmetric=True)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(3, 100)
    assert torch.equal(fresh(x), m(x))


def test_unsupported_group_size_is_skipped_with_reason(caplog):
    model = nn.Sequential(nn.Linear(100, 8))
    lowbit.quantize(model, lowbit.Int4Config(group_size=48))
    assert isinstance(model[0], nn.Linear)
    assert "group_size 48" in caplog.text


def test_compile_fullgraph():
    model = nn.Sequential(nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))
    lowbit.quantize(model, "int4-g32")
    x = torch.randn(4, 128)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), model(x))
