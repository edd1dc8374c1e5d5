"""lowbit.save / lowbit.load of Conv2d layers: QuantizedConv2d (any family's linear) and BinaryConv2d."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.nn import QuantizedConv2d, QuantizedLinear
from lowbit.nn.binary import BinaryConv2d, BinaryLinear
from lowbit.nn.conv import conv_as_linear
from lowbit.serialization import CONFIG_FILE, TENSORS_FILE

PRESETS = sorted(lowbit.PRESETS)
CONVERTED = (QuantizedConv2d, BinaryConv2d, QuantizedLinear)


def small_cnn(seed: int = 0, **override) -> nn.Sequential:
    """Every geometry field away from its default somewhere: non-square kernel, stride, padding,
    dilation, a 1x1 conv (the no-unfold path) and a conv without bias. `override` changes the
    second conv's arguments (for the geometry-mismatch tests)."""
    torch.manual_seed(seed)
    second = dict(in_channels=16, out_channels=32, kernel_size=(2, 4), stride=(2, 1), padding=(0, 1),
                  dilation=(1, 2), bias=True)
    second.update(override)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(**second), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.Conv2d(32, 32, (2, 2), stride=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 2 * 3, 10))


def cnn_input() -> torch.Tensor:
    return torch.randn(2, 3, 8, 10, generator=torch.Generator().manual_seed(7))


def assert_same(m: nn.Module, fresh: nn.Module, x: torch.Tensor) -> None:
    assert [type(a) for a in m.modules()] == [type(b) for b in fresh.modules()]
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))
    want, got = m.state_dict(), fresh.state_dict()
    assert sorted(want) == sorted(got)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key].view(torch.uint8), t.view(torch.uint8)), key


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_cnn(tmp_path, preset):
    m = lowbit.quantize(small_cnn(), preset)
    convs = [n for n, c in m.named_children() if isinstance(c, (QuantizedConv2d, BinaryConv2d))]
    assert len(convs) >= 3, f"{preset} converted only {convs}: the test would not cover conv layers"
    lowbit.save(m, tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert header["format_version"] == 2
    fresh = small_cnn(seed=1)  # different float weights: everything must come from the file
    assert lowbit.load(tmp_path, fresh) is fresh
    assert_same(m, fresh, cnn_input())


class Mixed(nn.Module):
    """Linear and Conv2d layers of several families, a conv used twice, and float layers."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 16, 2, stride=2)
        self.shared = nn.Conv2d(16, 16, 1)  # called twice: one module, one entry
        self.binary = nn.Conv2d(16, 16, 3, padding=(1, 2), dilation=(1, 2), bias=False)
        self.wrapped = nn.Conv2d(16, 16, 1)
        self.float_conv = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.block(torch.relu(self.stem(x))))
        x = self.shared(torch.relu(self.shared(x)))
        x = self.float_conv(self.wrapped(self.binary(x)))
        return self.head(torch.relu(self.fc(x.mean(dim=(2, 3)))))


def quantize_mixed(m: Mixed) -> Mixed:
    lowbit.quantize(m, {"stem": "int8", "block": "int4-g32", "shared": "fp8-block", "fc": "sparse24",
                        "head": "int8-weight"})
    m.binary = BinaryConv2d.from_float(m.binary, binary_activations=True)
    # A family's linear inside QuantizedConv2d, built by hand: BinaryLinear with float activations.
    m.wrapped = QuantizedConv2d.from_float(
        m.wrapped, linear=BinaryLinear.from_float(conv_as_linear(m.wrapped), binary_activations=False))
    return m


def test_round_trip_mixed_linear_and_conv(tmp_path):
    m = quantize_mixed(Mixed())
    assert isinstance(m.stem, QuantizedConv2d) and isinstance(m.fc, QuantizedLinear)
    assert type(m.float_conv) is nn.Conv2d
    lowbit.save(m, tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    by_name = {e["name"]: e for e in header["modules"]}
    assert sorted(by_name) == ["binary", "block", "fc", "head", "shared", "stem", "wrapped"]
    assert by_name["binary"]["conv"] == {"in_channels": 16, "out_channels": 16, "kernel_size": [3, 3],
                                         "stride": [1, 1], "padding": [1, 2], "dilation": [1, 2], "bias": False}
    assert by_name["wrapped"]["linear"]["class"] == "BinaryLinear"
    assert by_name["block"]["linear"]["args"]["group_size"] == 32
    fresh = lowbit.load(tmp_path, Mixed(seed=1))
    assert_same(m, fresh, cnn_input())


class TwoNames(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = small_cnn(seed)
        self.alias = self.net[2]  # the same Conv2d registered under a second name (not called twice)

    def forward(self, x):
        return self.net(x)


def test_conv_at_two_names_stays_one_module(tmp_path):
    m = lowbit.quantize(TwoNames(), "int4-g32")
    assert m.alias is m.net[2] and isinstance(m.alias, QuantizedConv2d)
    lowbit.save(m, tmp_path)
    fresh = lowbit.load(tmp_path, TwoNames(seed=1))
    assert fresh.alias is fresh.net[2] and isinstance(fresh.alias, QuantizedConv2d)
    assert_same(m, fresh, cnn_input())


def big_conv(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 1))
    with torch.no_grad():  # bell-shaped weights: codes of < 8 (< 4) bits of entropy, which Huffman shrinks
        m[0].weight.normal_()
    return m


@pytest.mark.parametrize("preset", ["int8", "int4-g32"])
def test_entropy_coded_conv_codes(tmp_path, preset):
    m = lowbit.quantize(big_conv(0), preset)
    lowbit.save(m, tmp_path, entropy_coding=True)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert "0.linear." + ("qweight" if preset == "int8" else "packed") in header["entropy_coded"]
    fresh = lowbit.load(tmp_path, big_conv(1))
    assert_same(m, fresh, torch.randn(1, 64, 5, 6))


def test_linear_only_files_stay_version_1(tmp_path):
    # An older lowbit reads version 1 only: a model without Conv2d layers is written as before.
    m = lowbit.quantize(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), "int8")
    lowbit.save(m, tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert header["format_version"] == 1
    assert all(set(e) == {"name", "class", "scheme", "args", "tensors"} for e in header["modules"])


def test_cli_quantize_module_function_cnn(tmp_path, monkeypatch, capsys):
    from lowbit.cli import main

    (tmp_path / "lowbit_conv_cli_model.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),\n"
        "                      nn.Flatten(), nn.Linear(8 * 3 * 3, 4))\n"
        "    return m, torch.randn(2, 3, 8, 8)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["quantize", "lowbit_conv_cli_model:build", "--scheme", "int8", "--out", str(out)]) == 0
    import lowbit_conv_cli_model

    m, x = lowbit_conv_cli_model.build()
    fresh, _ = lowbit_conv_cli_model.build()
    lowbit.load(out, fresh)
    assert isinstance(fresh[0], QuantizedConv2d) and isinstance(fresh[2], QuantizedConv2d)
    lowbit.quantize(m, "int8")
    assert_same(m.eval(), fresh.eval(), x)


# ----------------------------------------------------------------------------- rejections
def saved_cnn(path: Path, preset: str = "int8") -> nn.Module:
    m = lowbit.quantize(small_cnn(), preset)
    lowbit.save(m, path)
    return m


GEOMETRY_CASES = {
    "in_channels": (dict(in_channels=8), "'in_channels' was saved as 16, the model's Conv2d has 8"),
    "out_channels": (dict(out_channels=24), "'out_channels' was saved as 32, the model's Conv2d has 24"),
    "kernel_size": (dict(kernel_size=(4, 2)), r"'kernel_size' was saved as \[2, 4\], the model's Conv2d has \[4, 2\]"),
    "stride": (dict(stride=1), r"'stride' was saved as \[2, 1\], the model's Conv2d has \[1, 1\]"),
    "padding": (dict(padding=(1, 1)), r"'padding' was saved as \[0, 1\], the model's Conv2d has \[1, 1\]"),
    "dilation": (dict(dilation=1), r"'dilation' was saved as \[1, 2\], the model's Conv2d has \[1, 1\]"),
    "bias": (dict(bias=False), "'bias' was saved as True, the model's Conv2d has False"),
    "groups": (dict(groups=2), "groups=2"),
    "padding_mode": (dict(padding_mode="reflect"), "padding_mode='reflect'"),
}


@pytest.mark.parametrize("preset", ["int8", "binary"])
@pytest.mark.parametrize("case", sorted(GEOMETRY_CASES))
def test_rejects_geometry_mismatch(tmp_path, preset, case):
    saved_cnn(tmp_path, preset)
    override, message = GEOMETRY_CASES[case]
    fresh = small_cnn(**override)
    before = [type(m) for m in fresh.modules()]
    with pytest.raises(ValueError, match=rf"lowbit.load: {tmp_path / CONFIG_FILE}, module '2': .*{message}"):
        lowbit.load(tmp_path, fresh)
    assert [type(m) for m in fresh.modules()] == before  # a failed load leaves the model as it was


@pytest.mark.parametrize("preset", ["int8", "binary-weight"])
def test_save_rejects_a_bare_conv_layer(tmp_path, preset):
    m = lowbit.quantize(small_cnn(), preset)
    with pytest.raises(ValueError, match="model is itself a quantized layer"):
        lowbit.save(m[2], tmp_path)


def test_rejects_conv_entry_where_the_model_has_a_linear(tmp_path):
    saved_cnn(tmp_path)
    fresh = small_cnn()
    fresh[2] = nn.Linear(128, 32)
    with pytest.raises(ValueError, match="module '2': is a Linear in the model, not the nn.Conv2d"):
        lowbit.load(tmp_path, fresh)


def _set(d, key, value):
    d[key] = value


def _conv(header, name="2"):
    return next(e for e in header["modules"] if e["name"] == name)


JSON_CASES = {
    "version 1": (lambda h: _set(h, "format_version", 1), "needs format_version 2"),
    "geometry missing": (lambda h: _conv(h).pop("conv"), "missing field 'conv'"),
    "field missing": (lambda h: _conv(h)["conv"].pop("stride"), "'conv' is missing field 'stride'"),
    "extra geometry": (lambda h: _set(_conv(h)["conv"], "groups", 1), r"'conv' has unknown field\(s\) \['groups'\]"),
    "three numbers": (lambda h: _set(_conv(h)["conv"], "kernel_size", [2, 4, 1]), "'kernel_size' must be two"),
    "zero stride": (lambda h: _set(_conv(h)["conv"], "stride", [0, 1]), "'stride' must be two integers >= 1"),
    "negative padding": (lambda h: _set(_conv(h)["conv"], "padding", [-1, 1]), "'padding' must be two integers >= 0"),
    "bool as size": (lambda h: _set(_conv(h)["conv"], "dilation", [True, 2]), "'dilation' must be two integers"),
    "channels type": (lambda h: _set(_conv(h)["conv"], "in_channels", 16.0), "'in_channels' must be int"),
    "zero channels": (lambda h: _set(_conv(h)["conv"], "out_channels", 0), "'out_channels' must be >= 1"),
    "linear shape": (lambda h: _set(_conv(h)["linear"]["args"], "in_features", 64), r"needs \[32, 128\]"),
    "linear bias": (lambda h: _set(_conv(h)["linear"]["args"], "bias", False), "needs .* with bias"),
    "linear class": (lambda h: _set(_conv(h)["linear"], "class", "QuantizedConv2d"), "'class' must be one of"),
    "scheme": (lambda h: _set(_conv(h), "scheme", "int4"), "does not match its linear class Int8Linear"),
    "extra entry field": (lambda h: _set(_conv(h), "code", "import os"), "unknown field"),
    "tensor shape": (lambda h: _set(_conv(h)["linear"]["tensors"]["qweight"], "shape", [32, 64]), "do not match"),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_rejects_bad_conv_json(tmp_path, case):
    saved_cnn(tmp_path)
    edit, message = JSON_CASES[case]
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    edit(header)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(header))
    fresh = small_cnn()
    with pytest.raises(ValueError, match=message):
        lowbit.load(tmp_path, fresh)
    assert not any(isinstance(m, CONVERTED) for m in fresh.modules())


@pytest.mark.parametrize("preset, edit, message", [
    ("int8", lambda t: t["2.linear.qweight"].__setitem__((0, 0), -128), "module '2'.*-128"),
    ("int8", lambda t: t["4.linear.scale"].__setitem__(3, float("nan")), "module '4'.*'scale'.*NaN"),
    ("binary", lambda t: t["2.scale"].__setitem__(3, float("inf")), "module '2'.*'scale'.*inf"),
    ("binary", lambda t: t.__setitem__("4.packed", t["4.packed"][:, :0].contiguous()), r"tensor '4.packed' has shape \[32, 0\]"),
])
def test_rejects_bad_conv_tensors(tmp_path, preset, edit, message):
    saved_cnn(tmp_path, preset)
    tensors = load_file(tmp_path / TENSORS_FILE)
    edit(tensors)
    save_file(tensors, tmp_path / TENSORS_FILE)
    fresh = small_cnn()
    with pytest.raises(ValueError, match=message):
        lowbit.load(tmp_path, fresh)
    assert not any(isinstance(m, CONVERTED) for m in fresh.modules())


# ----------------------------------------------------------------------------- fuzzing the new fields
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine_conv")
    lowbit.save(quantize_mixed(Mixed()), path)
    return (path / CONFIG_FILE).read_text(), (path / TENSORS_FILE).read_bytes()


def _conv_paths(header):
    """Paths to every value inside the conv entries (their geometry, nested linear, args, tensors)."""
    def walk(node, prefix):
        yield prefix
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            yield from walk(v, (*prefix, k))
    for i, e in enumerate(header["modules"]):
        if isinstance(e, dict) and e.get("class") in ("QuantizedConv2d", "BinaryConv2d"):
            yield from (p for p in walk(e, ("modules", i)) if len(p) > 2)


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                        st.lists(st.integers(-3, 2**40), max_size=3), st.just({}), st.just([]),
                        st.sampled_from(["QuantizedConv2d", "BinaryConv2d", "Int8Linear", "BinaryLinear", "binary",
                                         "float32", [1, 1], [2, 2], [0, 0], 16, 32]))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_conv_fields(pristine, data):
    text, blob = pristine
    header = json.loads(text)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_conv_paths(header))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = header
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON_VALUES)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_FILE).write_text(json.dumps(header))
        (Path(d) / TENSORS_FILE).write_bytes(blob)
        fresh = Mixed()
        try:
            lowbit.load(d, fresh)
        except ValueError:
            assert not any(isinstance(m, CONVERTED) for m in fresh.modules())
            return
    # It loaded, so what was hit was harmless (e.g. a value rewritten to what it was): the model runs.
    with torch.no_grad():
        fresh(cnn_input())
