"""lowbit.quant.awq: activation-aware scaling for int4 / int8 weight-only, folded exactly, better than RTN."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Int4Linear, Int8WeightOnlyLinear
from lowbit.quant import awq as A
from lowbit.quant.gptq import Hessian
from lowbit.quant.smooth import SmoothedLinear


def _outlier_inputs(K=256, T=512, seed=0):
    """Activations with a few channels 20x larger than the rest, as in transformer Linears."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    x[:, torch.randperm(K, generator=g)[:6]] *= 20.0
    return x


def _stats(x):
    h = Hessian(x.shape[1])
    h.add(x)
    return h.H, x.abs().mean(0)


@pytest.mark.parametrize("config", [lowbit.Int4Config(128), lowbit.Int4Config(None, symmetric=True),
                                    lowbit.Int8Config(weight_only=True)])
def test_search_beats_round_to_nearest_on_outlier_channels(config):
    torch.manual_seed(0)
    x = _outlier_inputs()
    H, act = _stats(x)
    w = torch.randn(64, 256) * 0.05
    q = A.weight_quantizer(config, 256)
    s, alpha, errs = A.search_scale([w], [q], act, H)
    # alpha = 0 is RTN: the reported baseline must be RTN's output error, computed directly.
    rtn = float(((x @ (w - q(w)).T).double().square().sum()) / (x @ w.T).double().square().sum())
    assert errs["rtn"] == pytest.approx(rtn, rel=1e-6)
    assert 0 < alpha <= 1 and errs["awq"] < 0.8 * errs["rtn"]
    w_hat = q(w * s) / s
    assert float(((x @ (w - w_hat).T).double().square().sum()) / (x @ w.T).double().square().sum()) == \
        pytest.approx(errs["awq"], rel=1e-6)


def test_clip_never_raises_a_groups_error():
    torch.manual_seed(1)
    x = _outlier_inputs(seed=1)
    H, _ = _stats(x)
    w = torch.randn(32, 256)
    w[:, 5] *= 8  # an outlier weight per row: clipping it buys a finer grid for the group
    q = A.weight_quantizer(lowbit.Int4Config(128), 256)
    wc = A.clip_weight(w, q, H, 128)
    assert bool((wc.abs() <= w.abs() + 0).all())

    def group_err(v):
        d = (w - q(v)).reshape(32, 2, 128).double()
        Hb = H.reshape(2, 128, 2, 128)[[0, 1], :, [0, 1], :]
        return torch.einsum("ngi,gij,ngj->ng", d, Hb, d)

    e0, e1 = group_err(w), group_err(wc)
    assert bool((e1 <= e0 * (1 + 1e-6)).all()) and float(e1.sum()) < float(e0.sum())


class _Block(nn.Module):
    """LayerNorm -> (q, k) summed [foldable into the norm]; v -> token mixing -> o [foldable into v];
    fc1 -> GELU -> fc2 [not foldable: wrapped]; a residual that does not see the norm's output."""

    def __init__(self, d=128, h=256):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):  # x [B, T, d]
        y = self.norm(x)
        a = self.q(y) + self.k(y)
        mix = torch.softmax(x @ x.transpose(1, 2) / x.shape[-1], -1)
        b = self.o(mix @ self.v(x))
        return x + a + b + self.fc2(torch.nn.functional.gelu(self.fc1(a)))


def _toy(seed=0):
    torch.manual_seed(seed)
    model = _Block().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_(0, 0.1)
    x = torch.randn(8, 16, 128)
    x[..., :4] *= 15  # outlier channels
    return model, x


def test_folding_is_exact_in_float_and_wraps_the_rest():
    model, x = _toy()
    with torch.no_grad():
        ref = model(x)
    info = A.awq_scale(model, "int4", [x], clip=False, progress=False)
    folds = {k: v["fold"] for k, v in info.items()}
    assert folds["norm"] == "norm" and folds["o"] == "linear:v"
    assert folds["fc2"] == "wrap" and isinstance(model.fc2, SmoothedLinear)
    assert all(v["alpha"] > 0 and v["error_awq"] <= v["error_rtn"] for v in info.values())
    with torch.no_grad():
        out = model(x)
    # Only float rounding moves: relative change at the level of a few float32 ulps per op.
    assert float((out - ref).norm() / ref.norm()) < 1e-5


def test_awq_quantizes_to_the_kernel_modules_and_beats_rtn():
    model, x = _toy(1)
    with torch.no_grad():
        ref = model(x)
    rtn = lowbit.quantize(copy.deepcopy(model), "int4")
    cfg = {"q": "int4", "k": "int4", "v": "int8-weight", "o": "int4", "fc1": "int4", "fc2": "int4"}
    m = lowbit.awq(copy.deepcopy(model), cfg, [x], progress=False)
    # v reads the raw input (nothing to fold into): wrapped, and still given its own config.
    assert isinstance(m.q, Int4Linear) and isinstance(m.v.linear, Int8WeightOnlyLinear)
    assert isinstance(m.fc2, SmoothedLinear) and isinstance(m.fc2.linear, Int4Linear)
    assert set(m._lowbit_awq) == {"norm", "v", "o", "fc1", "fc2"}
    with torch.no_grad():
        e_rtn = float((rtn(x) - ref).norm() / ref.norm())
        e_awq = float((m(x) - ref).norm() / ref.norm())
    assert e_awq < e_rtn


def test_errors_and_untouched_layers():
    model, x = _toy(2)
    with pytest.raises(ValueError, match="no batches"):
        A.awq_scale(model, "int4", [], progress=False)
    with pytest.raises(ValueError, match="n_grid"):
        A.awq_scale(model, "int4", [x], n_grid=0, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert A.awq_scale(model, "int8", [x], progress=False) == {}  # W8A8 is SmoothQuant's job
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- real model, real text
@pytest.fixture(scope="module")
def minilm_quality(minilm):
    """Embedding quality on the held-out sentences: RTN int4 vs AWQ int4 (g128 asym, no clipping) on
    encoder layer 4, and the float model after scaling alone (calibration on the other 48 sentences).
    One layer has every kind of group AWQ finds in BERT (q/k/v and the intermediate dense behind a
    LayerNorm, wrapped because each LayerNorm also feeds the residual; o folded into v; the output
    dense wrapped) and keeps the test fast. Measured held-out SQNR gaps (AWQ - RTN): layer 4 alone
    2.23 dB, layers 0 and 4 1.86 dB, layer 0 alone 0.49 dB (its RTN error is already small).
    AWQ on all layers: docs/ptq.md."""
    from lowbit import report

    model, (cal, held) = minilm
    mask = held["attention_mask"]

    def emb(m):
        with torch.no_grad():
            return report._mean_pool_normalize(report._hidden(m(**held)), mask)

    ref = emb(model)
    cfg = {"encoder.layer.4.*": "int4"}
    scaled = copy.deepcopy(model)
    A.awq_scale(scaled, cfg, [cal], clip=False, progress=False)
    out = {"scaled_float": emb(scaled)}
    out["rtn"] = emb(lowbit.quantize(copy.deepcopy(model), cfg))
    # One search serves both: AWQ without clipping is the scaled model, quantized.
    out["awq"] = emb(lowbit.quantize(scaled, cfg))
    q = {k: report.quality("embedding", ref, v) for k, v in out.items()}
    print({k: (round(v["sqnr_db"], 2), round(v["cosine_mean"], 4)) for k, v in q.items()})
    return ref, q


def test_awq_beats_rtn_on_minilm(minilm_quality):
    _, q = minilm_quality
    assert q["awq"]["sqnr_db"] > q["rtn"]["sqnr_db"] + 1.0
    assert q["awq"]["cosine_mean"] > q["rtn"]["cosine_mean"]


def test_awq_scaling_is_exact_on_minilm(minilm_quality):
    _, q = minilm_quality
    assert q["scaled_float"]["sqnr_db"] > 100.0  # float32 rounding only


def test_awq_keeps_quantizing_what_it_does_not_scale():
    # A Conv2d and a W8A8 Linear are not AWQ's: lowbit.awq must still quantize them as lowbit.quantize does.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 128), nn.Linear(128, 16))
    x = torch.randn(4, 3, 4, 4)
    m = lowbit.awq(copy.deepcopy(model), {"0": "int8", "2": "int8", "3": "int4"}, [x], progress=False)
    assert type(m[0]).__name__ == "QuantizedConv2d" and type(m[2]).__name__ == "Int8Linear"
    # Layer 3 reads layer 2's output directly: its 1/s folds into layer 2's rows (or alpha = 0).
    assert isinstance(m[3], Int4Linear) and m._lowbit_awq["3"]["fold"] in ("linear:2", "none")
    assert set(m._lowbit_awq) == {"3"}
    with torch.no_grad():
        m(x)
