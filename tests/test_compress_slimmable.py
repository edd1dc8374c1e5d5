"""lowbit.compress.slimmable: each width is the nested sub-network, BatchNorm switches with the
width, and sandwich training makes every width useful."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.compress import slimmable as S

W = (0.25, 0.5, 0.75, 1.0)


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: on a shared 2-core machine, thread hand-offs cost more than the arithmetic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _net():
    return nn.Sequential(
        S.SlimmableConv2d(1, 16, 3, padding=1, widths=W, slim_in=False), S.SwitchableBatchNorm2d(16, W), nn.ReLU(),
        S.SlimmableConv2d(16, 16, 3, padding=1, widths=W), S.SwitchableBatchNorm2d(16, W), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), S.SlimmableLinear(16, 3, widths=W, slim_out=False))


def test_width_selects_the_nested_subnetwork():
    torch.manual_seed(0)
    net = _net().eval()
    x = torch.randn(2, 1, 6, 6)
    S.set_width(net, 0.5)
    c1, bn1, c2, bn2, fc = net[0], net[1].bn[1], net[3], net[4].bn[1], net[8]
    h = F.relu(F.batch_norm(F.conv2d(x, c1.weight[:8], c1.bias[:8], padding=1), bn1.running_mean, bn1.running_var,
                            bn1.weight, bn1.bias))
    h = F.relu(F.batch_norm(F.conv2d(h, c2.weight[:8, :8], c2.bias[:8], padding=1), bn2.running_mean,
                            bn2.running_var, bn2.weight, bn2.bias))
    want = F.linear(h.mean((2, 3)), fc.weight[:, :8], fc.bias)
    torch.testing.assert_close(net(x), want)
    assert S.active_weights(net, 0.5) == 8 * 9 + 8 * 8 * 9 + 3 * 8
    assert S.active_weights(net, 1.0) == 16 * 9 + 16 * 16 * 9 + 3 * 16


def test_batchnorm_statistics_are_per_width():
    net = _net().train()
    S.set_width(net, 0.25)
    net(torch.randn(4, 1, 6, 6) + 3)
    assert float(net[1].bn[0].running_mean.abs().sum()) > 0
    assert float(net[1].bn[3].running_mean.abs().sum()) == 0
    with pytest.raises(ValueError, match="switchable widths"):
        S.set_width(net, 0.6)


def test_sandwich_training_serves_every_width():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # three classes told apart by where a bright square is
    y = torch.randint(0, 3, (192,), generator=g)
    x = torch.randn(192, 1, 6, 6, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        x[i, 0, 2 * c:2 * c + 2, 2:4] += 2.0
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    rng = random.Random(0)
    for step in range(40):
        idx = torch.randint(0, 192, (64,), generator=g)
        S.sandwich_step(net, x[idx], y[idx], opt, W, n_random=1, rng=rng)
    net.eval()
    for w in W:
        S.set_width(net, w)
        with torch.no_grad():
            acc = float((net(x).argmax(1) == y).float().mean())
        assert acc > 0.9, (w, acc)
