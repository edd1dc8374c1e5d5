"""lowbit.save / lowbit.load: bit-exact round trips, and rejection of every malformed checkpoint."""

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
from lowbit.nn import FP8Linear, Int4Linear, Int8Linear, QuantizedLinear
from lowbit.serialization import CONFIG_FILE, TENSORS_FILE

PRESETS = sorted(lowbit.PRESETS)


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    # "4" is kept float by filter_fn: a layer quantize skipped must round-trip as a float layer.
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40), nn.LayerNorm(40), nn.Linear(40, 24))


def keep_last(module, name):
    return name != "4"


def mixed_model(seed: int = 0) -> nn.Sequential:
    """Every module class in one model, including a static-activation FP8Linear and a float layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40), nn.LayerNorm(40), nn.Linear(40, 72),
                         nn.ReLU(), nn.Linear(72, 40), nn.Linear(40, 8), nn.Linear(8, 8))


def quantize_mixed(m: nn.Sequential) -> nn.Sequential:
    lowbit.quantize(m, "int8", filter_fn=lambda _, n: n == "0")
    lowbit.quantize(m, "int4-g32", filter_fn=lambda _, n: n == "2")
    lowbit.quantize(m, "fp8-block", filter_fn=lambda _, n: n == "4")
    lowbit.quantize(m, "int8-weight", filter_fn=lambda _, n: n == "7")
    m[6] = FP8Linear.from_float(m[6], "e5m2", "tensor", activation="static", act_scale=0.05)
    return m


def saved_mixed(path: Path) -> tuple[nn.Module, torch.Tensor]:
    m = quantize_mixed(mixed_model())
    lowbit.save(m, path)
    x = torch.randn(7, 64)
    return m, x


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_small_model(tmp_path, preset):
    m = small_model()
    lowbit.quantize(m, preset, filter_fn=keep_last)
    lowbit.save(m, tmp_path)
    fresh = small_model(seed=1)  # different float weights: everything must come from the file
    assert lowbit.load(tmp_path, fresh) is fresh
    for a, b in zip(m, fresh):
        assert type(a) is type(b)
    assert type(fresh[4]) is nn.Linear
    x = torch.randn(5, 3, 64)
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))
    for key, t in m.state_dict().items():
        got = fresh.state_dict()[key]
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8)), key


def test_round_trip_mixed_model_and_bf16(tmp_path):
    m, x = saved_mixed(tmp_path / "a")
    fresh = lowbit.load(tmp_path / "a", mixed_model(seed=1))
    assert torch.equal(m(x), fresh(x))
    assert float(fresh[6].act_scale) == pytest.approx(0.05)

    m = small_model().to(torch.bfloat16)
    lowbit.quantize(m, "int4", filter_fn=keep_last)
    lowbit.save(m, tmp_path / "b")
    fresh = lowbit.load(tmp_path / "b", small_model(seed=1).to(torch.bfloat16))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(m(x), fresh(x))


def test_shared_linear_stays_shared(tmp_path):
    def build():
        torch.manual_seed(0)
        shared = nn.Linear(32, 32)
        return nn.Sequential(shared, nn.ReLU(), shared)

    m = lowbit.quantize(build(), "int8")
    assert m[0] is m[2]
    lowbit.save(m, tmp_path)
    fresh = lowbit.load(tmp_path, build())
    assert isinstance(fresh[0], Int8Linear) and fresh[0] is fresh[2]
    x = torch.randn(3, 32)
    assert torch.equal(m(x), fresh(x))


class WithViews(nn.Module):
    """Buffers that are views into a weight: safetensors refuses shared memory unless copied."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("rows", self.lin.weight.data[2:4])
        self.register_buffer("transposed", self.lin.weight.data.t())

    def forward(self, x):
        return self.lin(x) + self.rows.sum() + self.transposed[0].sum()


def test_views_into_one_storage(tmp_path):
    m = WithViews()
    lowbit.quantize(m, "int8", filter_fn=lambda *_: False)
    lowbit.save(m, tmp_path)
    torch.manual_seed(1)
    fresh = lowbit.load(tmp_path, WithViews())
    x = torch.randn(2, 8)
    assert torch.equal(m(x), fresh(x))


transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=128, vocab_size=100,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def no_lm_head(module, name):
    return "lm_head" not in name


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_llama(tmp_path, preset):
    m = tiny_llama()
    lowbit.quantize(m, preset, filter_fn=no_lm_head)
    assert lowbit.last_report().converted
    lowbit.save(m, tmp_path)
    fresh = lowbit.load(tmp_path, tiny_llama(seed=1))
    assert type(fresh.lm_head) is nn.Linear
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, fresh(ids).logits)


def test_tied_weights_stored_once_and_stay_tied(tmp_path):
    m = tiny_llama(tie=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    lowbit.quantize(m, "int8", filter_fn=no_lm_head)
    lowbit.save(m, tmp_path)
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert header["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in load_file(tmp_path / TENSORS_FILE)
    fresh = lowbit.load(tmp_path, tiny_llama(seed=1, tie=True))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, fresh(ids).logits)


def test_files_are_safetensors_and_json_only(tmp_path):
    saved_mixed(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    header = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert header["format_version"] == 1 and header["lowbit_version"] == lowbit.__version__
    by_name = {e["name"]: e for e in header["modules"]}
    assert sorted(by_name) == ["0", "2", "4", "6", "7"]
    assert by_name["2"]["args"] == {"in_features": 96, "out_features": 40, "bias": True, "dtype": "float32",
                                    "group_size": 32, "symmetric": False, "scale_dtype": "float32"}
    assert by_name["4"]["tensors"]["qweight"] == {"dtype": "float8_e4m3fn", "shape": [72, 40]}
    # fp8 is stored natively by safetensors (F8_E4M3 / F8_E5M2), not as uint8 views.
    assert load_file(tmp_path / TENSORS_FILE)["6.qweight"].dtype == torch.float8_e5m2


# ----------------------------------------------------------------------------- rejections
def edit_json(path: Path, fn) -> None:
    header = json.loads((path / CONFIG_FILE).read_text())
    header = fn(header) or header
    (path / CONFIG_FILE).write_text(json.dumps(header))


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / TENSORS_FILE)
    fn(tensors)
    save_file(tensors, path / TENSORS_FILE)


def entry(header, name):
    return next(e for e in header["modules"] if e["name"] == name)


def _set(d, key, value):
    d[key] = value


def _del(d, key):
    del d[key]


def _bad_scale(t, value):
    t["2.scale"][3, 0] = value


def _fp8_nan(t):
    t["4.qweight"].view(torch.uint8)[1, 2] = 0x7F


JSON_CASES = {
    "version": (lambda h: _set(h, "format_version", 3), "format_version 3"),
    "version type": (lambda h: _set(h, "format_version", "1"), "'format_version' must be int"),
    "not lowbit": (lambda h: _set(h, "format", "other"), "not a lowbit checkpoint"),
    "not an object": (lambda h: [h], "must hold a JSON object"),
    "unknown class": (lambda h: _set(entry(h, "0"), "class", "Int3Linear"), "'class' must be one of"),
    "scheme": (lambda h: _set(entry(h, "0"), "scheme", "int4"), "does not match class Int8Linear"),
    "extra field": (lambda h: _set(entry(h, "0"), "code", "import os"), "unknown field"),
    "extra module": (lambda h: h["modules"].append({**entry(h, "0"), "name": "9"}), "no module named '9'"),
    "not a Linear": (lambda h: _set(entry(h, "0"), "name", "1"), "is a ReLU in the model"),
    "listed twice": (lambda h: h["modules"].append(entry(h, "0")), "listed twice"),
    "missing module": (lambda h: h["modules"].remove(entry(h, "0")), "missing tensor"),
    "in_features": (lambda h: _set(entry(h, "0")["args"], "in_features", 65), r"\[96, 65\]"),
    "absurd size": (lambda h: _set(entry(h, "0")["args"], "out_features", 2**62), "layer is"),
    "bool as int": (lambda h: _set(entry(h, "0")["args"], "in_features", True), "must be int"),
    "bias type": (lambda h: _set(entry(h, "0")["args"], "bias", 1), "'bias' must be bool"),
    "bias flag": (lambda h: _set(entry(h, "0")["args"], "bias", False), "saved without a bias"),
    "dtype": (lambda h: _set(entry(h, "0")["args"], "dtype", "float64"), "'dtype' must be one of"),
    "group size": (lambda h: _set(entry(h, "2")["args"], "group_size", 48), "group_size 48"),
    "granularity": (lambda h: _set(entry(h, "4")["args"], "granularity", "row"), "do not match"),
    "tensor shape": (lambda h: _set(entry(h, "0")["tensors"]["qweight"], "shape", [96, 63]), "do not match"),
    "absurd shape": (lambda h: _set(entry(h, "0")["tensors"]["qweight"], "shape", [2**60, 2**60]), "do not match"),
    "tensor dtype": (lambda h: _set(entry(h, "0")["tensors"]["qweight"], "dtype", "int16"), "must be one of"),
    "shape type": (lambda h: _set(entry(h, "0")["tensors"]["scale"], "shape", "96"), "'shape' must be list"),
    "alias": (lambda h: _set(h["aliases"], "0.bias", "nowhere"), "must point to a stored tensor"),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_rejects_bad_json(tmp_path, case):
    saved_mixed(tmp_path)
    edit, message = JSON_CASES[case]
    edit_json(tmp_path, edit)
    fresh = mixed_model()
    before = [type(m) for m in fresh]
    with pytest.raises(ValueError, match=message):
        lowbit.load(tmp_path, fresh)
    assert [type(m) for m in fresh] == before  # a failed load leaves the model as it was


TENSOR_CASES = {
    "int8 -128": (lambda t: t["0.qweight"].__setitem__((0, 0), -128), "module '0'.*-128"),
    "int8 scale nan": (lambda t: t["0.scale"].__setitem__(5, float("nan")), "module '0'.*'scale'.*NaN"),
    "int4 scale inf": (lambda t: _bad_scale(t, float("inf")), "module '2'.*'scale'.*inf"),
    "int4 zero nan": (lambda t: t["2.zero"].__setitem__((0, 0), float("nan")), "'zero'.*NaN"),
    "fp8 nan code": (_fp8_nan, "module '4'.*NaN or inf fp8"),
    "fp8 scale nan": (lambda t: t["4.scale"].__setitem__((0, 0), float("nan")), "module '4'.*'scale'"),
    "act_scale": (lambda t: t.__setitem__("6.act_scale", torch.tensor(-1.0)), "'act_scale' must be > 0"),
    "shape": (lambda t: t.__setitem__("0.qweight", t["0.qweight"][:, :63].contiguous()), "'0.qweight' has shape"),
    "dtype": (lambda t: t.__setitem__("0.scale", t["0.scale"].half()), "'0.scale' has dtype float16"),
    "float dtype": (lambda t: t.__setitem__("8.weight", t["8.weight"].double()), "'8.weight' has dtype float64"),
    "missing": (lambda t: t.pop("8.bias"), r"missing tensor\(s\).*8.bias"),
    "extra": (lambda t: t.__setitem__("9.weight", torch.ones(2)), r"does not have.*9.weight"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_rejects_bad_tensors(tmp_path, case):
    saved_mixed(tmp_path)
    edit, message = TENSOR_CASES[case]
    edit_tensors(tmp_path, edit)
    fresh = mixed_model()
    with pytest.raises(ValueError, match=message):
        lowbit.load(tmp_path, fresh)
    assert not any(isinstance(m, QuantizedLinear) for m in fresh.modules())


def test_rejects_truncated_and_corrupted_files(tmp_path):
    saved_mixed(tmp_path)
    data = (tmp_path / TENSORS_FILE).read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"", data[:8] + b"{not json" + data[17:]):
        (tmp_path / TENSORS_FILE).write_bytes(broken)
        with pytest.raises(ValueError, match="model.safetensors"):
            lowbit.load(tmp_path, mixed_model())
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        lowbit.load(tmp_path, mixed_model())
    (tmp_path / CONFIG_FILE).write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="lowbit.json"):
        lowbit.load(tmp_path, mixed_model())
    with pytest.raises(ValueError, match="lowbit.json"):
        lowbit.load(tmp_path / "nowhere", mixed_model())


def test_rejects_wrong_model(tmp_path):
    saved_mixed(tmp_path)
    with pytest.raises(ValueError, match=r"module '0'.*\[96, 64\].*\[96, 65\]"):
        lowbit.load(tmp_path, nn.Sequential(nn.Linear(65, 96)))
    hooked = mixed_model()
    hooked[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="module '0'.*forward hooks"):
        lowbit.load(tmp_path, hooked)
    already = quantize_mixed(mixed_model())
    with pytest.raises(ValueError, match="is a Int8Linear in the model"):
        lowbit.load(tmp_path, already)
    with pytest.raises(ValueError, match="'3.weight' has dtype float32.*expects float16"):
        lowbit.load(tmp_path, mixed_model().half())


def test_rejects_int8_k_beyond_exact_accumulation_and_meta_models(tmp_path):
    from lowbit._checks import INT8_MAX_K

    m = nn.Sequential(nn.Linear(64, 4))
    lowbit.quantize(m, "int8")
    lowbit.save(m, tmp_path)
    with pytest.raises(ValueError, match="meta device"):
        lowbit.load(tmp_path, nn.Sequential(nn.Linear(64, 4, device="meta")))

    def widen(h):
        entry(h, "0")["args"]["in_features"] = INT8_MAX_K + 1

    edit_json(tmp_path, widen)
    with pytest.raises(ValueError, match="int32 accumulation could overflow"):
        lowbit.load(tmp_path, nn.Sequential(nn.Linear(INT8_MAX_K + 1, 4, device="meta")))


def test_save_rejects_meta_and_bare_layer(tmp_path):
    with pytest.raises(ValueError, match="meta device"):
        lowbit.save(nn.Linear(4, 4, device="meta"), tmp_path)
    with pytest.raises(ValueError, match="itself a quantized layer"):
        lowbit.save(Int4Linear.from_float(nn.Linear(64, 4)), tmp_path)


# ----------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine")
    saved_mixed(path)
    return (path / CONFIG_FILE).read_text(), (path / TENSORS_FILE).read_bytes()


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                        st.lists(st.integers(-3, 2**40), max_size=3), st.just({}), st.just([]),
                        st.sampled_from(["float32", "int8", "e4m3", "block", "Int4Linear", "0", "2"]))


def _mutate_json(text: str, data) -> str:
    header = json.loads(text)
    paths = list(_paths(header))
    path = data.draw(st.sampled_from(paths))
    if not path:
        return json.dumps(data.draw(JSON_VALUES))
    parent = header
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    return json.dumps(header)


def _mutate_bytes(blob: bytes, data) -> bytes:
    header_end = 8 + int.from_bytes(blob[:8], "little")
    kind = data.draw(st.sampled_from(["truncate", "header", "anywhere"]))
    if kind == "truncate":
        return blob[: data.draw(st.integers(0, len(blob) - 1))]
    hi = header_end if kind == "header" else len(blob)
    pos = data.draw(st.integers(0, hi - 1))
    flip = data.draw(st.integers(1, 255))
    return blob[:pos] + bytes([blob[pos] ^ flip]) + blob[pos + 1:]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_load_raises_value_error_or_loads(pristine, data):
    text, blob = pristine
    target = data.draw(st.sampled_from(["json", "tensors", "both"]))
    if target in ("json", "both"):
        text = _mutate_json(text, data)
    if target in ("tensors", "both"):
        blob = _mutate_bytes(blob, data)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_FILE).write_text(text)
        (Path(d) / TENSORS_FILE).write_bytes(blob)
        fresh = mixed_model()
        try:
            lowbit.load(d, fresh)
        except ValueError:
            assert not any(isinstance(m, QuantizedLinear) for m in fresh.modules())
            return
    # It loaded, so what was hit was harmless (a float tensor's payload, a version string, ...):
    # the model must run.
    with torch.no_grad():
        fresh(torch.randn(3, 64))


# ----------------------------------------------------------------------------- int4 cutlass_sm90
def sm90_model(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32, bias=False)).to(dtype)


def saved_sm90(path: Path, dtype: torch.dtype = torch.float16) -> nn.Sequential:
    from lowbit.nn import Int4LinearCutlassSm90

    m = sm90_model(dtype)
    m[0] = Int4LinearCutlassSm90.from_float(m[0], group_size=64)
    m[2] = Int4LinearCutlassSm90.from_float(m[2], group_size=64, symmetric=True)
    lowbit.save(m, path)
    return m


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_int4_cutlass_sm90(tmp_path, dtype):
    m = saved_sm90(tmp_path, dtype)
    fresh = lowbit.load(tmp_path, sm90_model(dtype, seed=1))
    assert [type(a) for a in fresh] == [type(a) for a in m]
    for key, t in m.state_dict().items():
        got = fresh.state_dict()[key]
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8)), key
    x = torch.randn(3, 128, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(m(x), fresh(x))


SM90_CASES = {
    "float32 dtype": (lambda h: _set(entry(h, "0")["args"], "dtype", "float32"), "dtype must be float16 or bfloat16"),
    "group size": (lambda h: _set(entry(h, "0")["args"], "group_size", 32), "group_size 64, 128 or in_features"),
    "missing group size": (lambda h: _del(entry(h, "0")["args"], "group_size"), "group_size"),
}


@pytest.mark.parametrize("case", sorted(SM90_CASES))
def test_int4_cutlass_sm90_rejects_bad_json(tmp_path, case):
    saved_sm90(tmp_path)
    edit, message = SM90_CASES[case]
    edit_json(tmp_path, edit)
    fresh = sm90_model(torch.float16)
    with pytest.raises(ValueError, match=message):
        lowbit.load(tmp_path, fresh)
    assert not any(isinstance(x, QuantizedLinear) for x in fresh.modules())


@pytest.mark.parametrize("name, value", [("0.scale", float("nan")), ("0.zero", float("inf")),
                                         ("2.zero", float("nan"))])
def test_int4_cutlass_sm90_rejects_non_finite_scales(tmp_path, name, value):
    saved_sm90(tmp_path)
    edit_tensors(tmp_path, lambda t: t[name].__setitem__((0, 0), value))
    module, tensor = name.split(".")
    with pytest.raises(ValueError, match=f"module '{module}'.*'{tensor}'"):
        lowbit.load(tmp_path, sm90_model(torch.float16))
