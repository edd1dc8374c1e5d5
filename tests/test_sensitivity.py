"""lowbit.sensitivity, layer-pattern configs in lowbit.quantize, and the mixed-precision search."""

import copy
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Int4Linear, Int8Linear, Int8WeightOnlyLinear
from lowbit.sensitivity import SensitivityTable, mixed_precision, sensitivity


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"attn": nn.Linear(64, 64), "mlp": nn.Linear(64, 128)})
        self.head = nn.Linear(128, 10)
        with torch.no_grad():  # one layer far more sensitive: an input channel with outliers
            self.block["attn"].weight[:, 0] *= 40

    def forward(self, x):
        return self.head(torch.relu(self.block["mlp"](torch.relu(self.block["attn"](x)))))


def _data():
    return [torch.randn(16, 64) for _ in range(2)]


def test_table_matches_quantizing_one_layer_by_hand_and_restores_the_model(tmp_path):
    net = Net().eval()
    data = _data()
    with torch.no_grad():
        before = [net(x) for x in data]
    table = sensitivity(net, data, ["int8", "int4-g32"], progress=False,
                        loss_fn=lambda out, x: out.pow(2).mean())
    assert sorted(table.layers) == ["block.attn", "block.mlp", "head"] and len(table.rows) == 6
    assert all(type(m) is nn.Linear for m in (net.block["attn"], net.block["mlp"], net.head))
    with torch.no_grad():
        assert all(torch.equal(net(x), b) for x, b in zip(data, before))
    # One row by hand: quantize block.mlp alone with int4-g32.
    by_hand = copy.deepcopy(net)
    by_hand.block["mlp"] = lowbit.quantize(by_hand.block["mlp"], "int4-g32")
    with torch.no_grad():
        outs = [by_hand(x) for x in data]
    sig = sum(float(b.double().pow(2).sum()) for b in before)
    noise = sum(float((b.double() - o.double()).pow(2).sum()) for b, o in zip(before, outs))
    row = table.row("block.mlp", "int4-g32")
    assert row["sqnr_db"] == pytest.approx(10 * math.log10(sig / noise), rel=1e-9)
    loss = sum(float(o.pow(2).mean()) for o in outs) / 2
    assert row["loss_delta"] == pytest.approx(loss - table.float_loss, rel=1e-6, abs=1e-9)
    assert row["float_bytes"] == 128 * 64 * 4 and row["quant_bytes"] == by_hand.block["mlp"].weight_nbytes()
    # int4 hurts more than int8 on every layer.
    for name in table.layers:
        assert table.row(name, "int8")["sqnr_db"] > table.row(name, "int4-g32")["sqnr_db"]
    assert "block.attn" in str(table) and table.to_markdown().startswith("| layer")
    png = table.plot(str(tmp_path / "sens.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_layer_patterns_in_quantize():
    net = Net()
    lowbit.quantize(net, {"block.attn": "int8-weight", "block.*": "int4-g32", "head": None})
    assert isinstance(net.block["attn"], Int8WeightOnlyLinear)  # first matching pattern wins
    assert isinstance(net.block["mlp"], Int4Linear) and net.block["mlp"].group_size == 32
    assert type(net.head) is nn.Linear
    report = lowbit.last_report()
    assert [n for n, _ in report.converted] == ["block.attn", "block.mlp"] and report.excluded == ["head"]
    other = Net()
    lowbit.quantize(other, {"*": lowbit.Int8Config()})
    assert all(isinstance(m, Int8Linear) for m in (other.block["attn"], other.block["mlp"], other.head))
    untouched = Net()
    with pytest.raises(ValueError, match="unknown preset"):
        lowbit.quantize(untouched, {"block.*": "int8", "head": "int5"})
    assert all(type(m) is nn.Linear for m in untouched.modules() if isinstance(m, nn.Linear))
    with pytest.raises(TypeError, match="patterns must be strings"):
        lowbit.quantize(Net(), {3: "int8"})


def _table(entries):
    """entries: name -> (float_bytes, {scheme: (bytes, sqnr)})."""
    rows = [{"name": n, "scheme": s, "sqnr_db": q, "loss_delta": None, "float_bytes": fb, "quant_bytes": b,
             "shape": (1, 1), "converted": True}
            for n, (fb, opts) in entries.items() for s, (b, q) in opts.items()]
    return SensitivityTable(rows, {"int8": "int8", "int4": "int4"})


def test_greedy_size_budget_spends_noise_where_it_is_cheapest():
    t = _table({"a": (400, {"int8": (100, 40.0), "int4": (50, 20.0)}),
                "b": (400, {"int8": (100, 40.0), "int4": (50, 35.0)}),
                "c": (400, {"int8": (100, 20.0), "int4": (50, 10.0)})})
    # Least added noise per byte saved first: a and b to int8 (1e-4 each for 300 bytes), then b
    # to int4 (+2.2e-4 for 50 bytes) before c to int8 (+1e-2 for 300): greedy, not optimal packing.
    plan = mixed_precision(t, max_bytes=300)
    assert plan.choice == {"a": "int8", "b": "int4", "c": "int8"} and plan.bytes == 250 and plan.met_budget
    nsr = 10 ** -4.0 + 10 ** -3.5 + 10 ** -2.0
    assert plan.predicted_sqnr_db == pytest.approx(-10 * math.log10(nsr))
    plan = mixed_precision(t, max_bytes=200)  # then a (+1e-2 for 50 bytes) before c (+9e-2)
    assert plan.choice == {"a": "int4", "b": "int4", "c": "int8"} and plan.bytes == 200
    impossible = mixed_precision(t, max_bytes=100)
    assert not impossible.met_budget and impossible.bytes == 150


def test_greedy_quality_budget_never_crosses_it():
    t = _table({"a": (400, {"int8": (100, 40.0), "int4": (50, 20.0)}),
                "b": (400, {"int8": (100, 40.0), "int4": (50, 35.0)})})
    plan = mixed_precision(t, min_sqnr_db=33.0)
    assert plan.predicted_sqnr_db >= 33.0 and plan.met_budget
    assert plan.choice == {"a": "int8", "b": "int4"}
    assert mixed_precision(t, min_sqnr_db=1000.0).choice == {"a": None, "b": None}
    with pytest.raises(ValueError, match="max_bytes or min_sqnr_db"):
        mixed_precision(t)


def test_plan_applies_with_lowbit_quantize():
    net = Net().eval()
    data = _data()
    table = sensitivity(net, data, ["int8-weight", "int4-g32"], progress=False)
    plan = mixed_precision(table, max_bytes=0.2 * table.float_bytes)
    assert plan.met_budget and plan.bytes <= 0.2 * table.float_bytes
    plan.apply(net)
    got = sum(m.weight_nbytes() if hasattr(m, "weight_nbytes") else m.weight.numel() * 4
              for m in (net.block["attn"], net.block["mlp"], net.head))
    assert got == plan.bytes
