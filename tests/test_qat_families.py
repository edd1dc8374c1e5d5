"""QAT for the binary, 2:4 sparse and codebook families: prepare_qat -> train -> convert gives the
kernel modules with the fake-quantized model's outputs; gradients equal their definitions; a tiny
training loop lowers the loss.

Bounds (u = 2**-24):

* binary: the fake layer computes ``(sign x @ sign w.T) * alpha * beta + bias`` in float32 in the
  packed kernels' order; the ±1 dot products are integers (exact in float32 for K < 2**24), alpha
  comes from the same op and beta from the same reduction, so converted == fake **bit for bit**.
* 2:4 float values and codebooks (weight-only): the converted weight equals the fake weight bit for
  bit (checked), and both sides sum the same products in float32 in different orders, each within
  ``gamma_{K+1} S`` of the exact sum, ``S = sum_k |x_k w_k| + |bias|``: ``|diff| <= (K + 8) u S``.
* 2:4 int8 values: W8A8 like Int8Linear, the bound of tests/test_qat_convert.py, ``(K + 8) u S``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.configs import BinaryConfig, CodebookConfig, Sparse24Config
from lowbit.nn import BinaryConv2d, BinaryLinear, CodebookLinear, QuantizedConv2d, Sparse24Linear, im2col
from lowbit.qat import (CodebookWeightFakeQuant, GeneralCodebookWeightFakeQuant, QATConfig, QATConv2d, QATLinear,
                        Sparse24WeightFakeQuant, configure_codebook, configure_sparse24)
from lowbit.formats import codebook as cb_fmt
from lowbit.quant import nm_prune
from lowbit.quant.codebook import scalar_kmeans_quantize

U = 2.0**-24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny layers: per-op OpenMP synchronisation costs more than a second thread saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, bias=False), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 24), nn.ReLU(), nn.Linear(24, 5))


def _train(model, x, steps=4, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _qat_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QATLinear, QATConv2d))]


def _inputs(model, x):
    """The input each QAT layer sees in eval mode."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=n: seen.__setitem__(name, a[0].detach()))
             for n, m in _qat_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


# ----------------------------------------------------------------------------- binary
@pytest.mark.parametrize("binary_activations", [True, False])
@pytest.mark.parametrize("keep_first_last", [True, False])
def test_binary_converted_equals_fake_bit_for_bit(binary_activations, keep_first_last):
    x = torch.randn(4, 3, 6, 6)
    cfg = BinaryConfig(binary_activations=binary_activations, keep_first_last=keep_first_last)
    qat = _train(lowbit.prepare_qat(_cnn(), cfg), x)
    names = [n for n, _ in _qat_layers(qat)]
    if keep_first_last:  # first conv and last linear stay float, as lowbit.quantize keeps them
        assert names == ["3", "5", "8"] and type(qat[0]) is nn.Conv2d and type(qat[10]) is nn.Linear
        assert {"0", "10"} <= set(qat._lowbit_report.excluded)
    else:
        assert names == ["0", "3", "5", "8", "10"]
    with torch.no_grad():
        y_fake = qat(x)
    w_fake = qat[8].fake_quant_weight(qat[8].weight).detach()
    conv = lowbit.convert(copy.deepcopy(qat))
    assert isinstance(conv[3], BinaryConv2d) and isinstance(conv[5], BinaryConv2d)
    assert isinstance(conv[8], BinaryLinear) and conv[8].binary_activations == binary_activations
    assert torch.equal(conv[8].dequantize(torch.float32), w_fake)
    with torch.no_grad():
        y_conv = conv(x)
    assert torch.equal(y_fake, y_conv)


def test_binary_ste_gradients_match_definition():
    M, K, N = 6, 40, 5
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K) * 0.8)  # some |w| > 1: the clipped STE zeroes them
    layer = lowbit.prepare_qat(lin, BinaryConfig(keep_first_last=False))
    x = (torch.randn(M, K) * 1.2).requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    # The definition, in float64: y = (sx @ sw.T) * alpha beta + b, sign' = 1 on [-1, 1];
    # beta = mean|w| (d beta_n / d w_nk = sign(w_nk) / K); alpha is a constant.
    w, xd, gd = lin.weight.detach().double(), x.detach().double(), g.double()
    sw, sx = (1.0 - 2.0 * (w < 0).double()), (1.0 - 2.0 * (xd < 0).double())
    alpha, beta = xd.abs().mean(1), w.abs().mean(1)
    dot = sx @ sw.T
    y_def = dot * alpha[:, None] * beta + lin.bias.detach().double()
    # float32 alpha, beta (means of K terms), two products, a bias addition: (K + 8) u |terms|
    assert ((y.detach().double() - y_def).abs()
            <= (K + 8) * U * (dot.abs() * alpha[:, None] * beta + lin.bias.detach().double().abs())).all()
    gab = gd * alpha[:, None] * beta                     # dL/d(dot) scaled
    d_sw = gab.T @ sx                                    # [N, K]
    d_beta = (gd * alpha[:, None] * dot).sum(0)          # [N]
    dw = d_sw * (w.abs() <= 1) + d_beta[:, None] * sw / K
    dx = (gab @ sw) * (xd.abs() <= 1)
    # float32 sums of at most M + K terms each, against float64: (M + K + 4) u sum|terms|.
    bw = (M + K + 4) * U * ((gab.abs().T @ sx.abs()) + (gd.abs() * alpha[:, None] * dot.abs()).sum(0)[:, None] / K)
    bx = (M + K + 4) * U * (gab.abs() @ sw.abs())
    assert ((lin.weight.grad.double() - dw).abs() <= bw).all()
    assert ((x.grad.double() - dx).abs() <= bx).all()
    assert (x.grad[xd.abs() > 1] == 0).all() and (w.abs() > 1).any() and (xd.abs() > 1).any()
    assert torch.equal(lin.bias.grad, g.sum(0))


# ----------------------------------------------------------------------------- shared bound check
def _check_within_bound(qat, converted, x):
    """Per QAT layer: converted weight == fake weight bit for bit, output within (K + 8) u S."""
    inputs = _inputs(qat, x)
    conv_modules = dict(converted.named_modules())
    for name, layer in _qat_layers(qat):
        xin = inputs[name]
        new = conv_modules[name]
        w_src, b = layer._float_weights()
        w = layer.fake_quant_weight(w_src).detach().reshape(w_src.shape[0], -1)
        inner = new.linear if isinstance(new, QuantizedConv2d) else new
        assert torch.equal(inner.dequantize(torch.float32), w), name
        if isinstance(layer, QATConv2d):
            rows = im2col(xin, layer.kernel_size, layer.stride, layer.padding, layer.dilation)[0]
        else:
            rows = xin.reshape(-1, xin.shape[-1])
        act = layer.act_fake_quant
        rows = act(rows).detach() if act is not None else rows
        with torch.no_grad():
            d = layer(xin) - new(xin)
        if isinstance(layer, QATConv2d):
            d = d.permute(0, 2, 3, 1)
        S = rows.double().abs() @ w.double().abs().T + (0 if b is None else b.detach().double().abs())
        assert (d.reshape(S.shape).double().abs() <= (w.shape[1] + 8) * U * S).all(), name


# ----------------------------------------------------------------------------- 2:4 sparse
@pytest.mark.parametrize("values_dtype", [None, "float16", "int8"])
def test_sparse24_converted_matches_fake(values_dtype):
    x = torch.randn(4, 3, 6, 6)
    qat = _train(lowbit.prepare_qat(_cnn(), Sparse24Config(values_dtype=values_dtype)), x, lr=0.2)
    conv = lowbit.convert(copy.deepcopy(qat))
    assert isinstance(conv[8], Sparse24Linear) and isinstance(conv[3].linear, Sparse24Linear)
    assert conv[8].values_dtype == {None: torch.float32, "float16": torch.float16, "int8": torch.int8}[values_dtype]
    modules = dict(conv.named_modules())
    for name, layer in _qat_layers(qat):
        w = layer._float_weights()[0].detach().reshape(layer.weight.shape[0], -1)
        # the converted layer keeps the magnitude 2:4 survivors of the final latent weights
        new = modules[name].linear if isinstance(layer, QATConv2d) else modules[name]
        if values_dtype != "int8":
            kept = w.to(new.values_dtype).float()
            assert torch.equal(new.dequantize(torch.float32), torch.where(nm_prune.nm_prune_mask(w), kept, 0.0))
    _check_within_bound(qat, conv, x)
    with torch.no_grad():
        yq, yc = qat(x), conv(x)
    assert (yq - yc).abs().max() <= 1e-4 * yq.abs().max()


def test_sparse24_mask_follows_weights_or_freezes():
    torch.manual_seed(1)
    x = torch.randn(16, 32)
    free = lowbit.prepare_qat(nn.Sequential(nn.Linear(32, 16)), "sparse24")
    frozen = copy.deepcopy(free)
    assert configure_sparse24(frozen, freeze_mask_step=1) == 1
    m0 = free[0].weight_fake_quant.mask.clone()
    _train(free, x, steps=6, lr=2.0)
    _train(frozen, x, steps=6, lr=2.0)
    assert not torch.equal(free[0].weight_fake_quant.mask, m0)  # large steps reorder magnitudes
    assert torch.equal(frozen[0].weight_fake_quant.mask, m0)
    w = frozen[0].weight.detach().clone()
    c = lowbit.convert(frozen)[0]
    assert torch.equal(c.dequantize(torch.float32), torch.where(m0, w, torch.zeros_like(w)))
    assert nm_prune.is_nm_sparse(c.dequantize(torch.float32))


@pytest.mark.parametrize("decay", [0.0, 0.3])
def test_sparse24_ste_gradient_reaches_every_weight(decay):
    w = torch.randn(6, 20, requires_grad=True)
    q = Sparse24WeightFakeQuant(w.detach(), None, srste_decay=decay)
    y = q(w)
    mask = nm_prune.nm_prune_mask(w.detach())
    assert torch.equal(y.detach(), torch.where(mask, w.detach(), torch.zeros_like(w)))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert torch.equal(w.grad, g + decay * (~mask).float() * w.detach())


# ----------------------------------------------------------------------------- codebook
def _nearest(v, cb):
    """Brute-force nearest centroid of each [*, d] sub-vector among cb [E, d] (float64)."""
    return ((v.double().unsqueeze(-2) - cb.double()) ** 2).sum(-1).argmin(-1)


@pytest.mark.parametrize("cfg", [CodebookConfig(bits=3, dim=1), CodebookConfig(method="pq", bits=4, dim=2, groups=2),
                                 CodebookConfig(bits=4, dim=1, codebook_dtype="float32")],
                         ids=["kmeans3", "pq", "kmeans4-fp32"])
def test_codebook_converted_matches_fake(cfg):
    x = torch.randn(4, 3, 6, 6)
    qat = _train(lowbit.prepare_qat(_cnn(), cfg), x, lr=0.1)
    conv = lowbit.convert(copy.deepcopy(qat))
    assert isinstance(conv[8], CodebookLinear) and isinstance(conv[3].linear, CodebookLinear)
    if cfg.dim == 2:  # the first conv's K = 27 is not a multiple of dim: kept float, and reported
        assert type(conv[0]) is nn.Conv2d and qat._lowbit_report.skipped[0].name == "0"
    _check_within_bound(qat, conv, x)


def test_codebook_learned_at_prepare_and_reassigned():
    torch.manual_seed(2)
    lin = nn.Linear(24, 8)
    w0 = lin.weight.detach().clone()
    layer = lowbit.prepare_qat(lin, CodebookConfig(bits=3, dim=1, codebook_dtype="float32"))
    q = layer.weight_fake_quant
    fit = scalar_kmeans_quantize(w0, 3)  # the real learner
    assert torch.equal(q.centroids.detach(), fit.codebooks[0, :, 0])
    assert torch.equal(q.codes, _nearest(w0.reshape(8, 24, 1), q.centroids.detach()[0]).reshape(8, 24))
    layer.train()
    layer(torch.randn(2, 24))  # step 0: the prepare-time codes
    with torch.no_grad():
        lin.weight.add_(torch.randn_like(lin.weight) * 0.3)
        q.centroids.add_(0.01)
    layer(torch.randn(2, 24))  # step 1: reassigned to the moved centroids
    assert torch.equal(q.codes, _nearest(lin.weight.detach().reshape(8, 24, 1), q.centroids.detach()[0]).reshape(8, 24))
    configure_codebook(layer, reassign_every=3)
    codes = q.codes.clone()
    with torch.no_grad():
        lin.weight.mul_(-1)
    layer(torch.randn(2, 24))  # step 2: not a multiple of 3, codes kept
    assert torch.equal(q.codes, codes)


def test_codebook_gradients_match_definition():
    torch.manual_seed(3)
    w = torch.randn(10, 16)
    q = CodebookWeightFakeQuant(w, CodebookConfig(method="pq", bits=3, dim=2, groups=4))
    wl = w.clone().requires_grad_(True)
    y = q(wl)
    cb = q.stored_centroids().detach()
    G, E, d = cb.shape
    group = q.group_of.unsqueeze(0).expand_as(q.codes)
    assert torch.equal(y.detach(), cb[group, q.codes].reshape(10, 16))
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert torch.equal(wl.grad, g)  # straight through to the latent weights
    # each centroid: the sum of the gradients of the weights that use it (float64 reference)
    ref = torch.zeros(G * E, d, dtype=torch.float64).index_add_(0, (group * E + q.codes).reshape(-1),
                                                                g.double().reshape(-1, d))
    uses = torch.zeros(G * E, dtype=torch.float64).index_add_(0, (group * E + q.codes).reshape(-1),
                                                               torch.ones(group.numel(), dtype=torch.float64))
    bound = uses.unsqueeze(1) * U * torch.zeros(G * E, d, dtype=torch.float64).index_add_(
        0, (group * E + q.codes).reshape(-1), g.double().abs().reshape(-1, d))
    assert ((q.centroids.grad.double().reshape(G * E, d) - ref).abs() <= bound).all()
    assert (uses > 1).any()


# ----------------------------------------------------------------------------- codebook: opq / rq / aq / lattice
GENERAL = [CodebookConfig(method="opq", bits=4, dim=4), CodebookConfig(method="rq", bits=4, dim=4, num_codebooks=2),
           CodebookConfig(method="aq", bits=4, dim=4, num_codebooks=2), CodebookConfig(method="lattice", bits=4, dim=4)]


def _mlp():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))


@pytest.mark.parametrize("cfg", GENERAL, ids=["opq", "rq", "aq", "lattice"])
def test_general_codebook_converted_matches_fake(cfg):
    x = torch.randn(6, 32)
    qat = _train(lowbit.prepare_qat(_mlp(), cfg), x, lr=0.1)
    conv = lowbit.convert(copy.deepcopy(qat))
    for i in (0, 2):
        layer, new = qat[i], conv[i]
        assert isinstance(layer.weight_fake_quant, GeneralCodebookWeightFakeQuant) and isinstance(new, CodebookLinear)
        w = layer.fake_quant_weight(layer.weight).detach()
        assert torch.equal(new.dequantize(torch.float32), w)  # the same operations on the same values
        xin = x if i == 0 else torch.tanh(qat[0](x)).detach()
        with torch.no_grad():
            d = (layer(xin) - new(xin)).double().abs()
        b = layer.bias.detach().double().abs()
        K = w.shape[1]
        if new.rotation is None:
            bound = (K + 8) * U * (xin.double().abs() @ w.double().abs().T + b)
        else:
            # The converted layer computes (x R^T) W_codes^T, the fake one x (W_codes R)^T: each is
            # within (K + blk + 8) u (|x| |R|^T |W_codes|^T + |bias|) of the exact product.
            R = torch.block_diag(*new.rotation.double().abs().unbind(0))
            Wc = cb_fmt.decode(new.codes, new.codebooks, new.scale, K).double().abs()
            bound = 2 * (K + new.rotation.shape[1] + 8) * U * (xin.double().abs() @ R.T @ Wc.T + b)
        assert (d <= bound).all(), cfg.method


@pytest.mark.parametrize("cfg", [GENERAL[0], GENERAL[3]], ids=["opq", "lattice"])
def test_general_codebook_reassigns_to_the_nearest_entry(cfg):
    torch.manual_seed(6)
    w = torch.randn(8, 32)
    q = GeneralCodebookWeightFakeQuant(w, cfg)
    w2 = w + 0.3 * torch.randn_like(w)
    q.train()
    q(w2)  # step 0: prepare-time codes
    q(w2)  # step 1: reassigned
    frame = w2.double()
    if q.rotation is not None:
        frame = frame @ torch.block_diag(*q.rotation.double().unbind(0)).T
    if q.scale is not None:
        frame = frame / q.scale.double().unsqueeze(1)
    books = q.stored_codebooks().detach()[0, :, 0]  # [G, E, d]: one row group, one codebook per column group
    G = books.shape[0]
    v = frame.reshape(8, 8, 4)
    want = torch.stack([_nearest(v[:, j], books[j // (8 // G)]) for j in range(8)], 1)
    assert torch.equal(q.codes[..., 0], want)


def test_general_codebook_learned_by_the_real_learner():
    torch.manual_seed(7)
    lin = nn.Linear(32, 8)
    cfg = CodebookConfig(method="rq", bits=4, dim=4, num_codebooks=2, codebook_dtype="float32")
    q = GeneralCodebookWeightFakeQuant(lin.weight.detach(), cfg)
    ref = CodebookLinear.from_float(lin, "rq", 4, 4, num_codebooks=2, codebook_dtype=torch.float32)
    assert torch.equal(q.codebooks.detach(), ref.codebooks)
    # codes: the learner's beam search on the same codebooks, so the same weight error at most
    e_q = (q.values().detach() - lin.weight.detach()).square().sum()
    e_ref = (ref.dequantize(torch.float32) - lin.weight.detach()).square().sum()
    assert e_q <= e_ref * (1 + 1e-6)


# ----------------------------------------------------------------------------- training lowers the loss
@pytest.mark.parametrize("cfg", [BinaryConfig(), BinaryConfig(binary_activations=False), Sparse24Config(),
                                 Sparse24Config(values_dtype="int8"), CodebookConfig(bits=3, dim=1),
                                 CodebookConfig(method="pq", bits=4, dim=2), GENERAL[2]],
                         ids=["binary", "binary-weight", "sparse24", "sparse24-int8", "kmeans3", "pq", "aq"])
def test_training_lowers_the_loss(cfg):
    torch.manual_seed(4)
    x = torch.randn(128, 16)
    y = (x @ torch.randn(16, 4)).argmax(1)  # a linearly separable 4-class task
    # tanh, not ReLU: sign() of a ReLU output is +1 everywhere, which would leave a binarized
    # activation nothing to carry
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    qat = lowbit.prepare_qat(model, QATConfig(cfg))
    opt = torch.optim.Adam(qat.parameters(), lr=1e-2)

    def loss():
        with torch.no_grad():
            return F.cross_entropy(qat.eval()(x), y).item()

    before = loss()
    qat.train()
    for _ in range(40):
        step_loss = F.cross_entropy(qat(x), y)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
    after = loss()
    assert after < 0.6 * before, (before, after)
    converted = lowbit.convert(qat.eval())
    with torch.no_grad():
        assert F.cross_entropy(converted(x), y).item() < 0.6 * before


def test_unsupported_options_are_refused():
    lin = nn.Linear(16, 8)
    with pytest.raises(ValueError, match="kmeans"):  # not a codebook method
        lowbit.prepare_qat(copy.deepcopy(lin), CodebookConfig(method="bogus", bits=4, dim=2))
    with pytest.raises(ValueError, match="learnable"):
        lowbit.prepare_qat(copy.deepcopy(lin), QATConfig(BinaryConfig(keep_first_last=False), learnable_scales=True))
    with pytest.raises(ValueError, match="reassign_every"):
        configure_codebook(lin, reassign_every=0)
    # a layer the format cannot hold stays float and is reported (K = 15 is not a multiple of dim 2)
    model = nn.Sequential(nn.Linear(15, 8), nn.Linear(8, 4))
    qat = lowbit.prepare_qat(model, CodebookConfig(method="pq", bits=2, dim=2))
    assert type(qat[0]) is nn.Linear and isinstance(qat[1], QATLinear)
    assert [s.name for s in qat._lowbit_report.skipped] == ["0"]
