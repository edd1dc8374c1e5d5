"""lowbit.compress.lowrank: Eckart–Young exactly, rank targets, in-place replacement, int8 on top."""

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.compress import lowrank as LR


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: on a shared 2-core machine, thread hand-offs cost more than the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _low_rankish(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    # decaying spectrum, like trained layers
    U, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
    s = torch.exp(-torch.arange(min(N, K), dtype=torch.float64) / 6)
    return (U[:, :len(s)] * s) @ V[:, :len(s)].T


@pytest.mark.parametrize("N,K,rank", [(40, 24, 1), (40, 24, 10), (17, 33, 16), (64, 64, 64)])
def test_error_equals_discarded_singular_values(N, K, rank):
    w = torch.randn(N, K, dtype=torch.float64, generator=torch.Generator().manual_seed(N + K))
    A, B, res = LR.svd_factors(w, rank=rank)
    S = torch.linalg.svdvals(w)
    err2 = float(((w - A @ B) ** 2).sum())
    assert err2 == pytest.approx(float((S[rank:] ** 2).sum()), rel=1e-9, abs=1e-20 + 1e-24 * float((w**2).sum()))
    assert res.error_sq == pytest.approx(err2, rel=1e-9, abs=1e-20)
    assert res.relative_error == pytest.approx(math.sqrt(err2 / float((w ** 2).sum())), rel=1e-9, abs=1e-12)


def test_factorized_layer_computes_the_reconstruction():
    lin = nn.Linear(48, 30).double()
    m = LR.LowRankLinear.from_linear(lin, rank=12)
    x = torch.randn(5, 48, dtype=torch.float64)
    torch.testing.assert_close(m(x), x @ m.weight().T + lin.bias, rtol=1e-12, atol=1e-12)
    S = torch.linalg.svdvals(lin.weight.detach())
    assert float(((m.weight() - lin.weight).detach() ** 2).sum()) == pytest.approx(float((S[12:] ** 2).sum()), rel=1e-9)
    # both factors carry sqrt(S): row norms of the two halves are balanced
    assert torch.allclose(m.first.weight.norm(dim=1), m.second.weight.norm(dim=0), rtol=1e-9)


def test_energy_target_is_the_smallest_rank():
    w = _low_rankish(50, 40)
    S = torch.linalg.svdvals(w)
    e = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
    for energy in (0.5, 0.9, 0.99, 1.0):
        r = LR.rank_for(S, (50, 40), energy=energy)
        assert e[r - 1] >= energy - 1e-12
        assert r == 1 or e[r - 2] < energy


def test_size_target():
    for ratio in (0.1, 0.5, 0.9):
        r = LR.rank_for(torch.ones(30), (64, 30), size_ratio=ratio)
        assert r * (64 + 30) <= ratio * 64 * 30 < (r + 1) * (64 + 30)


def test_low_rank_replaces_in_place_and_skips_unprofitable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[0].weight.copy_(_low_rankish(64, 64).float())
    done = LR.low_rank(model, energy=0.95)
    assert list(done) == ["0"]  # the 64->4 layer cannot be made smaller
    assert isinstance(model[0], LR.LowRankLinear) and type(model[2]) is nn.Linear
    assert model[0].rank == done["0"].rank < 32


def test_factors_quantize_with_int8():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))
    LR.low_rank(model, size_ratio=0.5)
    x = torch.randn(8, 128)
    ref = model(x)
    lowbit.quantize(model, "int8")
    assert [n for n, _ in lowbit.last_report().converted] == ["0.first", "0.second", "2.first", "2.second"]
    out = model(x)
    # int8 per-row weights and per-token activations at two layers: ~1 % relative error
    assert float((out - ref).norm() / ref.norm()) < 0.03
    s = lowbit.summary(model)
    assert s.bytes_after < s.bytes_before / 3
