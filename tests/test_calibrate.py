"""lowbit.calibrate (static activation scales into the kernel modules) and SmoothQuant migration."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import ops
from lowbit.calibrate import activation_absmax
from lowbit.nn import FP8Linear, Int4Linear, Int8Linear
from lowbit.quant.smooth import SmoothedLinear, find_norm_linears, smooth_quant


def _mlp():
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


def _batches():
    return [torch.randn(5, 48) * s for s in (1.0, 3.0, 0.5)]


def test_int8_static_scale_is_the_calibrated_amax():
    model = _mlp()
    batches = _batches()
    float_model = copy.deepcopy(model)
    lowbit.calibrate(model, "int8", batches, progress=False)
    assert isinstance(model[0], Int8Linear) and model[0].activation == "static"
    x = torch.cat(batches)
    with torch.no_grad():
        h = torch.relu(float_model[0](x))
    assert torch.equal(model[0].act_scale, x.abs().amax() / 127)
    assert torch.equal(model[2].act_scale, h.abs().amax() / 127)
    assert model._lowbit_calibration["0"] is not None and len(model._lowbit_calibration) == 2
    # The module is exactly the static int8 op pipeline.
    xin = torch.randn(7, 48)
    q = ops.int8_quantize_static(xin, model[0].act_scale)
    want = ops.int8_scaled_mm(q, model[0].qweight, model[0].act_scale, model[0].scale, model[0].bias)
    assert torch.equal(model[0](xin), want)
    with torch.no_grad():
        err = (model(x) - float_model(x)).norm() / float_model(x).norm()
    assert float(err) < 0.02


def test_fp8_static_and_observer_choice():
    model = _mlp()
    batches = _batches()
    lowbit.calibrate(model, "fp8", batches, observer="percentile", percentile=99.0, progress=False)
    assert isinstance(model[0], FP8Linear) and model[0].activation == "static"
    x = torch.cat(batches)
    k = round(x.numel() * 0.99)
    assert torch.allclose(model[0].act_scale, torch.kthvalue(x.abs().flatten(), k).values / 448)


def test_layer_patterns_and_weight_only_layers():
    model = _mlp()
    lowbit.calibrate(model, {"0": "int8", "2": "int4-g32"}, _batches(), progress=False)
    assert isinstance(model[0], Int8Linear) and model[0].activation == "static"
    assert isinstance(model[2], Int4Linear)  # weight-only: no activation scale, plain conversion
    only_float = _mlp()
    lowbit.calibrate(only_float, {"0": None}, _batches(), progress=False)
    assert isinstance(only_float[0], nn.Linear) and isinstance(only_float[2], nn.Linear)


def test_shared_layer_and_saving(tmp_path):
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin).eval()
    lowbit.calibrate(model, "int8", [torch.randn(4, 16)], progress=False)
    assert model[0] is model[2] and isinstance(model[0], Int8Linear)
    lowbit.save(model, tmp_path)
    fresh_lin = nn.Linear(16, 16)
    fresh = lowbit.load(tmp_path, nn.Sequential(fresh_lin, nn.ReLU(), fresh_lin))
    assert fresh[0].activation == "static" and torch.equal(fresh[0].act_scale, model[0].act_scale)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))


def test_static_int8_compiles_fullgraph():
    torch._dynamo.reset()
    m = Int8Linear.from_float(nn.Linear(32, 16), "static", 0.02)
    x = torch.randn(4, 32)
    assert torch.equal(torch.compile(m, fullgraph=True, backend="aot_eager")(x), m(x))


def test_errors():
    with pytest.raises(ValueError, match="no batches"):
        lowbit.calibrate(_mlp(), "int8", [], progress=False)
    with pytest.raises(ValueError, match="act_scale"):
        Int8Linear.from_float(nn.Linear(4, 4), "static")
    with pytest.raises(ValueError, match="unknown preset"):
        lowbit.calibrate(_mlp(), {"*": "int3"}, _batches(), progress=False)


def test_activation_absmax_per_input_channel():
    model = _mlp()
    batches = _batches()
    stats = activation_absmax(model, batches, ["0"], progress=False)
    assert torch.equal(stats["0"], torch.cat(batches).abs().amax(0))


# ----------------------------------------------------------------------------- SmoothQuant
class PreNorm(nn.Module):
    """x -> norm -> (fc1 | fc2) with a channel outlier, residual taken *before* the norm (foldable)."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(32), nn.Linear(32, 16), nn.Linear(32, 16)
        with torch.no_grad():
            self.norm.weight[3] = 30.0  # an outlier channel, as in real transformers

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.fc1(h), self.fc2(h)], -1) + x


def test_smoothquant_folds_into_the_norm_and_helps_int8():
    model = PreNorm().eval()
    batches = [torch.randn(16, 32) for _ in range(3)]
    assert find_norm_linears(model, batches[0]) == {"norm": ["fc1", "fc2"]}
    x = torch.cat(batches)
    with torch.no_grad():
        ref = model(x)
    q_plain = lowbit.quantize(copy.deepcopy(model), "int8")
    smoothed = copy.deepcopy(model)
    factors = smooth_quant(smoothed, batches, alpha=0.5, progress=False)
    assert set(factors) == {"norm"}
    with torch.no_grad():
        assert torch.allclose(smoothed(x), ref, rtol=1e-5, atol=1e-5)  # same float function
        q_smooth = lowbit.quantize(smoothed, "int8")
        e_plain = (q_plain(x) - ref).norm() / ref.norm()
        e_smooth = (q_smooth(x) - ref).norm() / ref.norm()
    assert float(e_smooth) < 0.5 * float(e_plain)


class PostNorm(nn.Module):
    """The norm's output also feeds the residual (BERT): 1/s cannot be folded into it."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h) + h


def test_smoothquant_refuses_unsafe_folds_and_wraps_on_request():
    model = PostNorm().eval()
    batches = [torch.randn(8, 32) * torch.logspace(-1, 1, 32)]
    with torch.no_grad():
        ref = model(batches[0])
    assert smooth_quant(model, batches, progress=False) == {}
    with torch.no_grad():
        assert torch.equal(model(batches[0]), ref)  # the failed fold was undone exactly enough
    factors = smooth_quant(model, batches, wrap=True, progress=False)
    assert set(factors) == {"fc"} and isinstance(model.fc, SmoothedLinear)
    with torch.no_grad():
        assert torch.allclose(model(batches[0]), ref, rtol=1e-5, atol=1e-5)
    lowbit.quantize(model, "int8")
    assert isinstance(model.fc.linear, Int8Linear)


def test_smoothquant_on_minilm(minilm):
    """Real activations: MiniLM's W8A8 output SQNR with and without migration (alpha 0.5)."""
    from lowbit.cli import sqnr_db

    model, (cal, held) = minilm
    cal, held = ({k: v[:24] for k, v in b.items()} for b in (cal, held))  # half of each: test time
    real = held["attention_mask"].bool()  # padding positions are no part of the answer
    with torch.no_grad():
        ref = model(**held).last_hidden_state[real]
    plain = lowbit.quantize(copy.deepcopy(model), "int8")
    smoothed = copy.deepcopy(model)
    smooth_quant(smoothed, [cal], alpha=0.5, wrap=True, progress=False)
    lowbit.quantize(smoothed, "int8")
    with torch.no_grad():
        s_plain = sqnr_db(ref, plain(**held).last_hidden_state[real])
        s_smooth = sqnr_db(ref, smoothed(**held).last_hidden_state[real])
    print(f"MiniLM W8A8 token SQNR (held-out): plain {s_plain:.2f} dB, SmoothQuant a=0.5 {s_smooth:.2f} dB")
    assert s_smooth > s_plain + 2.0, (s_plain, s_smooth)
