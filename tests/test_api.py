"""lowbit.quantize / lowbit.summary and the config registry."""

import copy
import logging

import pytest
import torch
from torch import nn

import lowbit
from lowbit import api
from lowbit._checks import INT8_MAX_K
from lowbit.configs import PRESETS, Config, Int8Config, resolve
from lowbit.nn import Int8Linear, Int8WeightOnlyLinear


def sqnr(reference, out):
    reference, out = reference.double(), out.double()
    return (10 * torch.log10(reference.pow(2).sum() / (reference - out).pow(2).sum())).item()


class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.proj = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.out(torch.relu(self.proj(self.norm(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("preset,cls", [("int8", Int8Linear), ("int8-weight", Int8WeightOnlyLinear)])
def test_quantize_nested(preset, cls):
    model = Net().eval()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = model(x)
    assert lowbit.quantize(model, preset) is model
    names = ["blocks.0.proj", "blocks.0.out", "blocks.1.proj", "blocks.1.out", "head.0", "head.2"]
    for name in names:
        assert type(model.get_submodule(name)) is cls
    assert not any(type(m) is nn.Linear for m in model.modules())
    report = model._lowbit_report
    assert report is api.last_report()
    assert report.converted == [(n, cls.scheme) for n in names] and not report.skipped
    with torch.no_grad():
        assert sqnr(expected, model(x)) > 35
    # Converted layers are no longer nn.Linear: a second call is a no-op.
    lowbit.quantize(model, preset)
    assert api.last_report().converted == []


def test_filter_fn_sees_module_and_name():
    model = Net()
    seen = []

    def keep_blocks(module, name):
        seen.append((type(module), name))
        return name.startswith("blocks.")

    lowbit.quantize(model, Int8Config(weight_only=True), filter_fn=keep_blocks)
    assert [n for _, n in seen] == ["blocks.0.proj", "blocks.0.out", "blocks.1.proj", "blocks.1.out", "head.0", "head.2"]
    assert all(t is nn.Linear for t, _ in seen)
    assert type(model.blocks[1].out) is Int8WeightOnlyLinear
    assert type(model.head[0]) is nn.Linear and type(model.head[2]) is nn.Linear
    assert model._lowbit_report.excluded == ["head.0", "head.2"]


def test_skips_are_logged_and_recorded(caplog):
    model = nn.ModuleDict({
        "ok": nn.Linear(16, 16),
        "f64": nn.Linear(16, 16).double(),
        "meta": nn.Linear(16, 16, device="meta"),
        "wide": nn.Linear(INT8_MAX_K + 1, 2, bias=False),
    })
    with caplog.at_level(logging.INFO, logger="lowbit"):
        lowbit.quantize(model, "int8")
    assert type(model["ok"]) is Int8Linear
    assert all(type(model[k]) is nn.Linear for k in ("f64", "meta", "wide"))
    skipped = {s.name: s.reason for s in model._lowbit_report.skipped}
    assert set(skipped) == {"f64", "meta", "wide"}
    assert "float64" in skipped["f64"] and "meta" in skipped["meta"] and str(INT8_MAX_K) in skipped["wide"]
    warnings = [r for r in caplog.records if r.name == "lowbit" and r.levelno == logging.WARNING]
    assert len(warnings) == 3
    for name, reason in skipped.items():
        assert any(name in r.getMessage() and reason in r.getMessage() for r in warnings)
    assert any(r.levelno == logging.INFO and "converted 1" in r.getMessage() for r in caplog.records)
    assert "skipped f64" in str(model._lowbit_report)


def test_layers_used_through_their_weight_are_kept():
    # nn.MultiheadAttention reads out_proj.weight, and nn.TransformerEncoderLayer's inference
    # fast path reads linear1/linear2.weight: swapping them would break or bypass the module.
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        expected = layer(x)
    lowbit.quantize(layer, "int8")
    assert not layer._lowbit_report.converted
    skipped = {s.name: s.reason for s in layer._lowbit_report.skipped}
    assert set(skipped) == {"self_attn.out_proj", "linear1", "linear2"}
    assert "MultiheadAttention" in skipped["self_attn.out_proj"] and "fast path" in skipped["linear1"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # The same Linear layers under a plain parent are converted.
    mlp = nn.Sequential(layer.linear1, nn.ReLU(), layer.linear2)
    lowbit.quantize(mlp, "int8")
    assert type(mlp[0]) is Int8Linear and type(mlp[2]) is Int8Linear


def test_shared_linear_is_converted_once():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    lowbit.quantize(model, "int8")
    assert type(model["a"][0]) is Int8Linear and model["a"][0] is model["b"][0]
    assert len(model._lowbit_report.converted) == 1


def test_root_linear_returns_the_quantized_module():
    out = lowbit.quantize(nn.Linear(8, 4), "int8-weight")
    assert type(out) is Int8WeightOnlyLinear


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown preset 'int3'.*int8, int8-weight"):
        lowbit.quantize(Net(), "int3")
    with pytest.raises(TypeError, match="Config or a preset name"):
        resolve(8)
    assert resolve("int8-weight") == Int8Config(weight_only=True)
    assert PRESETS["int8"] == Int8Config()


def test_config_serialization():
    d = Int8Config(weight_only=True).to_dict()
    assert d == {"type": "Int8Config", "version": Int8Config.VERSION, "weight_only": True}
    assert Config.from_dict(d) == Int8Config(weight_only=True)
    with pytest.raises(ValueError, match="version"):
        Config.from_dict({**d, "version": Int8Config.VERSION + 1})
    with pytest.raises(ValueError, match="unknown config type"):
        Config.from_dict({**d, "type": "NoSuchConfig"})


def test_quantized_model_state_dict_loads_into_fresh_quantized_model():
    model = Net().eval()
    lowbit.quantize(model, "int8")
    fresh = lowbit.quantize(Net().eval(), "int8")  # different random weights
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- summary
def test_summary_numbers():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16, bias=False), nn.Linear(16, 8)).to(torch.bfloat16)
    lowbit.quantize(model, "int8", filter_fn=lambda m, name: name != "2")
    s = lowbit.summary(model)
    assert [r["name"] for r in s.rows] == ["0", "1", "2"]
    assert [r["scheme"] for r in s.rows] == ["int8", "int8", "float"]
    r0, r1, r2 = s.rows
    assert r0["shape"] == (32, 64)
    assert r0["bytes_before"] == 32 * 64 * 2 + 32 * 2  # bf16 weight + bf16 bias
    assert r0["bytes_after"] == 32 * 64 + 4 * 32 + 32 * 2  # N*K + 4N + bias
    assert r0["bits_per_weight"] == pytest.approx(8 + 32 / 64)
    assert r1["bytes_after"] == 16 * 32 + 4 * 16 and r1["bytes_before"] == 16 * 32 * 2
    assert r2["bytes_before"] == r2["bytes_after"] == 8 * 16 * 2 + 8 * 2 and r2["bits_per_weight"] == 16
    assert s.bytes_before == sum(r["bytes_before"] for r in s.rows)
    assert s.bytes_after == sum(r["bytes_after"] for r in s.rows)
    assert s.num_weights == 32 * 64 + 16 * 32 + 8 * 16
    assert s.bits_per_weight == pytest.approx((8.5 * 2048 + 9 * 512 + 16 * 128) / s.num_weights)
    text = str(s)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "scheme", "shape", "[N,", "K]", "bits/w", "before", "after"]
    # Aligned: every column starts at the same offset in the header and in each row.
    assert lines[2].index("int8") == lines[0].index("scheme") and lines[4].index("float") == lines[0].index("scheme")
    assert "total (3 layers)" in text and "compression" in text
    md = s.to_markdown().splitlines()
    assert len(md) == 2 + 3 + 1 and md[2].startswith("| 0 | int8 | 32 x 64 | 8.50 |")


def test_summary_float_model():
    model = Net()
    s = lowbit.summary(model)
    assert len(s.rows) == 6 and {r["scheme"] for r in s.rows} == {"float"}
    assert s.compression == 1.0
    q = lowbit.summary(lowbit.quantize(copy.deepcopy(model), "int8"))
    assert q.bytes_before == s.bytes_before and 3.5 < q.compression < 4
