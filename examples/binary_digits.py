"""Train a binarized MLP on scikit-learn's digits (bundled, no download), then run it on packed kernels.

    python examples/binary_digits.py [--epochs 40] [--hidden 256] [--float-activations]

The network: Linear(64, H) -> BN -> [BinarizedLinear(H, H) -> BN] x 2 -> Linear(H, 10). The first
and last layers stay full precision (:func:`lowbit.nn.binary.binarize_for_training` with its
default ``keep_first_last=True``); the hidden layers train with latent float weights and the
clipped straight-through estimator. After training, :func:`lowbit.nn.binary.to_packed` swaps
them for :class:`lowbit.nn.BinaryLinear` (1-bit weights packed 32 per word, XNOR-popcount GEMM
on binarized activations) and the test accuracy is measured again on those kernels: it is the
same, because the packed modules compute the training forward's values exactly.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import lowbit
from lowbit.nn import binary as lbin


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_test = len(x) // 4
    mean, std = x[n_test:].mean(0), x[n_test:].std(0) + 0.1  # train statistics only
    x = (x - mean) / std
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def build(hidden: int, binary_activations: bool) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(64, hidden), nn.BatchNorm1d(hidden),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden),
        nn.Linear(hidden, 10),
    )
    return lbin.binarize_for_training(model, binary_activations=binary_activations, keep_first_last=True)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(epochs: int = 40, hidden: int = 256, binary_activations: bool = True, seed: int = 0,
         verbose: bool = True) -> dict:
    torch.manual_seed(seed)
    (xtr, ytr), (xte, yte) = load_digits(seed)
    model = build(hidden, binary_activations)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
        sched.step()
        if verbose and (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  loss {loss_fn(model(xtr), ytr).item():.3f}  "
                  f"test acc {accuracy(model, xte, yte):.4f}")
    train_s = time.perf_counter() - t0

    latent_acc = accuracy(model, xte, yte)
    packed = lbin.to_packed(copy.deepcopy(model)).eval()
    packed_acc = accuracy(packed, xte, yte)
    with torch.no_grad():
        model.eval()
        same = torch.equal(model(xte), packed(xte))
    if verbose:
        print(packed)
        print(lowbit.summary(packed))
        print(f"trained in {train_s:.1f} s; test accuracy: latent-weight model {latent_acc:.4f}, "
              f"packed binary kernels {packed_acc:.4f}; logits identical: {same}")
    return {"latent_acc": latent_acc, "packed_acc": packed_acc, "identical": same, "train_s": train_s,
            "model": model, "packed": packed}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--float-activations", action="store_true", help="binary weights only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # The layers are tiny (batch 64, width 256): a second thread's wake-up costs more than it
    # saves, and on a loaded machine it made training 20x slower.
    torch.set_num_threads(1)
    main(args.epochs, args.hidden, not args.float_activations, args.seed)
