"""lowbit.compress.pruning: exact masks, masks that survive training, the gradual schedule, the
N:M hand-off, and structured pruning that keeps the model runnable and computing the same thing
as the unpruned model with those channels zeroed."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lowbit
from lowbit.compress import pruning as P


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: on a shared 2-core machine, thread hand-offs cost more than the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _mlp():
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))


def test_layer_scope_masks_exactly_the_smallest():
    m = _mlp()
    dense = [l.weight.detach().clone() for l in m if isinstance(l, nn.Linear)]
    masks = P.magnitude_prune(m, 0.7, scope="layer")
    for (name, mask), w in zip(masks.items(), dense):
        n_pruned = round(0.7 * w.numel())
        assert int((~mask).sum()) == n_pruned
        assert w.abs()[~mask].max() <= w.abs()[mask].min()
        assert torch.equal(m.get_submodule(name).weight, w * mask)


def test_global_scope_one_threshold():
    m = _mlp()
    dense = {n: l.weight.detach().abs().clone() for n, l in m.named_children() if isinstance(l, nn.Linear)}
    masks = P.magnitude_prune(m, 0.6, scope="global")
    total = sum(w.numel() for w in dense.values())
    assert sum(int((~k).sum()) for k in masks.values()) == round(0.6 * total)
    kept_min = min(float(dense[n][k].min()) for n, k in masks.items())
    pruned_max = max(float(dense[n][~k].max()) for n, k in masks.items() if (~k).any())
    assert pruned_max <= kept_min
    assert abs(P.sparsity(m) - 0.6) < 1 / total


def test_masks_survive_training_and_state_dict():
    m = _mlp()
    masks = P.magnitude_prune(m, 0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        x = torch.randn(16, 20)
        loss = m(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mask in masks.items():
        w = m.get_submodule(name).weight
        assert torch.all(w[~mask] == 0)
        assert torch.any(w[mask] != 0)
    sd = m.state_dict()
    assert any(k.endswith("parametrizations.weight.0.mask") for k in sd)


def test_gradual_schedule_is_cubic_and_monotone():
    m = _mlp()
    pruner = P.GradualPruner(m, final=0.9, steps=10, scope="layer")
    prev_masks = None
    seen = []
    for step in range(12):
        s = pruner.step()
        seen.append(s)
        masks = {n: P._mask_of(l).mask.clone() for n, l in m.named_children() if isinstance(l, nn.Linear)}
        if prev_masks is not None:
            for n in masks:  # a pruned weight is never revived
                assert not torch.any(masks[n] & ~prev_masks[n])
        prev_masks = masks
    assert seen[-1] == pytest.approx(0.9)
    assert seen[4] == pytest.approx(P.cubic_sparsity(5, 0.9, 10))
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    assert abs(P.sparsity(m) - 0.9) < 0.01


def test_remove_bakes_masks_and_unlocks_quantize():
    m = _mlp()
    P.magnitude_prune(m, 0.5)
    lowbit.quantize(m, "int8")
    assert lowbit.last_report().skipped  # parametrized layers are refused while masked
    P.remove(m)
    assert not any(parametrize.is_parametrized(l) for l in m.modules())
    assert P.sparsity(m) == pytest.approx(0.5, abs=0.01)
    zeros = m[0].weight == 0
    lowbit.quantize(m, "int8")
    assert len(lowbit.last_report().converted) == 3
    assert torch.all(m[0].qweight[zeros] == 0)  # pruned weights stay exact zeros in int8


def test_nm_hand_off_masks_are_the_pruners_and_compress_losslessly():
    from lowbit.quant.nm_prune import is_nm_sparse, nm_prune_mask
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    dense = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    norms = torch.rand(32) + 0.5
    masks = P.nm_prune(model, 2, 4, saliency={"0": norms})
    assert set(masks) == {"0", "2"}
    assert torch.equal(masks["0"], nm_prune_mask(dense[0], 2, 4, saliency=norms))
    assert torch.equal(masks["2"], nm_prune_mask(dense[1], 2, 4))
    P.remove(model)
    assert is_nm_sparse(model[0].weight, 2, 4) and is_nm_sparse(model[2].weight, 2, 4)
    pruned = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    x = torch.randn(5, 32)
    expected = model(x)
    lowbit.quantize(model, "sparse24")
    assert [type(model[i]).__name__ for i in (0, 2)] == ["Sparse24Linear", "Sparse24Linear"]
    # The 2:4 compression keeps every surviving weight: the layers compute the pruned model.
    for layer, w in zip((model[0], model[2]), pruned):
        assert torch.equal(layer.dequantize(torch.float32), w)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_linear_neurons_equal_zeroed_model():
    torch.manual_seed(0)
    m = _mlp()
    ref = _mlp()
    ref.load_state_dict(m.state_dict())
    keep = P.prune_channels(m, "0", ["2"], keep=30, importance="l2")
    assert m[0].out_features == 30 and m[2].in_features == 30
    dropped = torch.tensor([i for i in range(48) if i not in set(keep.tolist())])
    with torch.no_grad():
        ref[0].weight[dropped] = 0
        ref[0].bias[dropped] = 0
    x = torch.randn(7, 20)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-6, atol=1e-6)
    # the kept neurons are the ones with the largest L2 norm (measured before zeroing)
    norms = P.channel_importance(_mlp_like(m, ref)[0], "l2")
    assert norms[keep].min() >= norms[dropped].max()


def _mlp_like(m, ref):
    torch.manual_seed(0)
    return _mlp()  # the same seed rebuilds the unpruned weights


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()


def test_conv_bn_conv_and_flatten_linear_equal_zeroed_model():
    torch.manual_seed(0)
    m = _CNN().eval()
    _randomize_bn(m)
    ref = _CNN().eval()
    ref.load_state_dict(m.state_dict())
    k1 = P.prune_channels(m, "conv1", ["conv2"], norm="bn1", amount=0.5)
    k2 = P.prune_channels(m, "conv2", ["fc"], norm="bn2", keep=10, importance="l2")
    assert (m.conv1.out_channels, m.bn1.num_features, m.conv2.in_channels) == (8, 8, 8)
    assert (m.conv2.out_channels, m.fc.in_features) == (10, 160)
    with torch.no_grad():  # zeroed after BN (gamma = beta = 0): exactly what removal computes
        for bn, keep, c in ((ref.bn1, k1, 16), (ref.bn2, k2, 24)):
            drop = torch.tensor([i for i in range(c) if i not in set(keep.tolist())])
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in ref.parameters()) / 2


def test_structured_refuses_bad_wiring_without_changing_the_model():
    m = _CNN()
    before = repr(m)
    with pytest.raises(ValueError, match="BatchNorm over 16"):
        P.prune_channels(m, "conv1", ["conv2"], norm="bn2", keep=8)
    with pytest.raises(ValueError, match="16 input channels"):
        P.prune_channels(m, "conv1", ["conv2", "conv1"], norm="bn1", keep=8)
    with pytest.raises(ValueError, match="exactly one of keep and amount"):
        P.prune_channels(m, "conv1", ["conv2"], keep=8, amount=0.5)
    assert repr(m) == before


def test_taylor_importance_matches_autograd():
    torch.manual_seed(0)
    m = _mlp()
    x, y = torch.randn(32, 20), torch.randint(0, 5, (32,))
    scores = P.taylor_importance(m, ["0", "2"], [(x, y)], lambda mod, b: F.cross_entropy(mod(b[0]), b[1]),
                                 channel_dim=-1)
    h0 = m[0](x)
    h0.retain_grad()
    h2 = m[2](m[1](h0))
    h2.retain_grad()
    F.cross_entropy(m[4](m[3](h2)), y).backward()
    torch.testing.assert_close(scores["0"], (h0 * h0.grad).sum(0).abs())
    torch.testing.assert_close(scores["2"], (h2 * h2.grad).sum(0).abs())
    keep = P.prune_channels(m, "0", ["2"], keep=24, scores=scores["0"])
    assert set(keep.tolist()) == set(torch.topk(scores["0"], 24).indices.tolist())


# ----------------------------------------------------------------------------- attention heads
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from lowbit.report import DEFAULT_MODEL_PACKAGE, default_model_path, ReportError
    pytest.importorskip(DEFAULT_MODEL_PACKAGE)
    from transformers import AutoModel, AutoTokenizer
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager").eval()
    batch = tok(["Pruning heads keeps the model runnable.", "A second, longer sentence to pad the batch out."],
                padding=True, return_tensors="pt")
    return model, dict(batch)


def test_head_pruning_equals_zeroed_values(minilm):
    import copy
    model, batch = minilm
    pruned, ref = copy.deepcopy(model), model  # ref's edits leave it a valid model for the next test
    plan = {0: [1, 5], 3: [0, 2, 11], 5: [7]}
    P.prune_attention_heads(pruned, plan)
    d = ref.encoder.layer[0].attention.self.attention_head_size
    with torch.no_grad():  # a head whose values are zero contributes exactly nothing
        for li, heads in plan.items():
            v = ref.encoder.layer[li].attention.self.value
            for h in heads:
                v.weight[h * d:(h + 1) * d] = 0
                v.bias[h * d:(h + 1) * d] = 0
    att = pruned.encoder.layer[3].attention
    assert att.self.query.out_features == att.output.dense.in_features == 9 * d
    assert att.self.num_attention_heads == 9
    with torch.no_grad():
        torch.testing.assert_close(pruned(**batch).last_hidden_state, ref(**batch).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_head_importance_and_global_pruning(minilm):
    m, batch = minilm
    norms = P.head_importance(m)
    assert len(norms) == 6 and all(s.shape == (12,) for s in norms)

    def loss_fn(mod, b):
        return mod(**b).last_hidden_state.pow(2).mean()

    taylor = P.head_importance(m, [batch], loss_fn)
    assert all(s.shape == (12,) and torch.all(s >= 0) for s in taylor)
    plan = P.prune_heads_by_importance(m, 0.25, taylor)
    assert sum(len(v) for v in plan.values()) == 18
    with torch.no_grad():
        out = m(**batch).last_hidden_state
    assert out.shape == (2, batch["input_ids"].shape[1], 384) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="every head"):
        P.prune_attention_heads(m, {0: list(range(m.encoder.layer[0].attention.self.num_attention_heads))})
