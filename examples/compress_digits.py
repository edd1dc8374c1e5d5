"""Compression on real data: scikit-learn's digits (1797 8x8 images, shipped with the package).

    python examples/compress_digits.py            # full run, ~1-2 min on 2 cores
    python examples/compress_digits.py --quick    # the reduced run the tests use

A small CNN is trained in fp32, then compressed in several ways; each row reports test accuracy
and the bytes needed to store the model (lowbit.compress.compressed_size: quantized layers as
codes + scales, mostly-zero weights as bitmap + nonzeros, Huffman rows as coded streams).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lowbit of this checkout

import lowbit  # noqa: E402
from lowbit.compress import (Distiller, GradualPruner, compressed_size, decompose_convs, huffman, low_rank,
                             prune_channels, remove, sandwich_step, set_width, taylor_importance)  # noqa: E402
from lowbit.compress import slimmable as S  # noqa: E402

SEED = 0


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return xtr, ytr, xte, yte


class Net(nn.Module):
    def __init__(self, c1=32, c2=64, hidden=128):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.fc1, self.fc2 = nn.Linear(c2 * 16, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def batches(x, y, bs, gen):
    idx = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x), bs):
        j = idx[i:i + bs]
        yield x[j], y[j]


def train(model, data, epochs, lr=2e-3, step_fn=None, after_step=None):
    xtr, ytr = data[0], data[1]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(xtr) // 64))
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(xtr, ytr, 64, gen):
            if step_fn is None:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                step_fn(model, xb, yb, opt)
            sched.step()
            if after_step is not None:
                after_step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, data):
    model.eval()
    return float((model(data[2]).argmax(1) == data[3]).float().mean())


def size(model) -> float:
    return compressed_size(model).total_bytes


def huffman_size(model) -> float:
    """compressed_size with every int8 code tensor stored Huffman-coded (what lowbit.save(...,
    entropy_coding=True) writes)."""
    rep = compressed_size(model)
    total = rep.total_bytes
    for m in model.modules():
        if isinstance(m, lowbit.nn.Int8Linear) or isinstance(m, lowbit.nn.Int8WeightOnlyLinear):
            coded = huffman.encode((m.qweight.to(torch.int16) + 127).numpy())
            total += coded.nbytes() - m.qweight.numel()
    return total


def latency_ratio(a, b, x, reps=7) -> float:
    """median time(b) / time(a), measured in interleaved pairs (the machine is shared)."""
    ratios = []
    with torch.no_grad():
        for m in (a, b):
            m(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(5):
                a(x)
            t1 = time.perf_counter()
            for _ in range(5):
                b(x)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


def run(quick: bool = False, log=print) -> list[dict]:
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    data = load_digits_split()
    E = 3 if quick else 30  # training epochs
    FT = 1 if quick else 10  # fine-tuning epochs
    rows = []

    def add(name, model, note="", acc=None, nbytes=None):
        rows.append({"name": name, "acc": accuracy(model, data) if acc is None else acc,
                     "bytes": size(model) if nbytes is None else nbytes, "note": note})
        log(f"  {name:42s} acc {rows[-1]['acc']:.4f}  {rows[-1]['bytes'] / 1024:8.1f} KiB  {note}")

    t0 = time.perf_counter()
    base = train(Net(), data, E)
    add("fp32 baseline", base)
    fp32_bytes = rows[0]["bytes"]

    q = copy.deepcopy(base)
    lowbit.quantize(q, "int8")
    add("int8 (lowbit.quantize, Linear layers)", q)

    # unstructured: gradual magnitude pruning to 80 % while fine-tuning, then int8 and Huffman
    p = copy.deepcopy(base)
    steps = FT * -(-len(data[0]) // 64)
    pruner = GradualPruner(p, 0.8, steps=int(steps * 0.7), scope="layer",
                           filter_fn=lambda m, n: n != "conv1")
    train(p, data, FT, lr=1e-3, after_step=pruner.step)
    remove(p)
    add("magnitude-pruned 80 % + fine-tune", p, "bitmap + nonzeros")
    pq = copy.deepcopy(p)
    lowbit.quantize(pq, "int8")
    add("  ... + int8 + Huffman", pq, "entropy-coded int8 codes", nbytes=huffman_size(pq))

    # structured: half the channels / neurons by first-order Taylor importance, then fine-tune
    s = copy.deepcopy(base)
    calib = [(data[0][i:i + 128], data[1][i:i + 128]) for i in range(0, 512, 128)]
    scores = taylor_importance(s, ["bn1", "bn2", "fc1"], calib, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    s.train()
    prune_channels(s, "conv1", ["conv2"], norm="bn1", amount=0.5, scores=scores["bn1"])
    prune_channels(s, "conv2", ["fc1"], norm="bn2", amount=0.5, scores=scores["bn2"])
    s.eval()
    scores = taylor_importance(s, ["fc1"], calib, lambda m, b: F.cross_entropy(m(b[0]), b[1]), channel_dim=-1)
    prune_channels(s, "fc1", ["fc2"], amount=0.5, scores=scores["fc1"])
    acc_before_ft = accuracy(s, data)
    train(s, data, FT, lr=1e-3)
    speed = latency_ratio(base, s, data[2])
    add("structured 50 % channels (Taylor) + fine-tune", s,
        f"no fine-tune {acc_before_ft:.4f}; latency x{speed:.2f} of fp32")

    # decomposition: SVD on fc1, Tucker-2 on conv2, fine-tune; then int8 on the factors
    d = copy.deepcopy(base)
    lr_res = low_rank(d, size_ratio=0.2, filter_fn=lambda m, n: n == "fc1")
    tk = decompose_convs(d, "tucker", size_ratio=0.3)
    acc_before_ft = accuracy(d, data)
    train(d, data, FT, lr=1e-3)
    add("SVD fc1 (20 % size) + Tucker-2 conv2 (30 %) + ft", d,
        f"rank {lr_res['fc1'].rank} (err {lr_res['fc1'].relative_error:.2f}), Tucker ranks {tk['conv2'].ranks} "
        f"(err {tk['conv2'].relative_error:.2f}); "
        f"no fine-tune {acc_before_ft:.4f}")
    dq = copy.deepcopy(d)
    lowbit.quantize(dq, "int8")
    add("  ... + int8 on the factors", dq)

    c = copy.deepcopy(base)
    cp = decompose_convs(c, "cp", size_ratio=0.3, n_iter=50 if quick else 500, restarts=1 if quick else 3)
    acc_before_ft = accuracy(c, data)
    train(c, data, FT, lr=1e-3)
    add("CP conv2 (30 % of its weights) + ft", c,
        f"rank {cp['conv2'].ranks[0]}, err {cp['conv2'].relative_error:.2f}; no fine-tune {acc_before_ft:.4f}")

    # distillation: a 4x narrower student, from scratch with and without the teacher
    torch.manual_seed(SEED)
    alone = train(Net(8, 16, 32), data, E)
    torch.manual_seed(SEED)
    student = Net(8, 16, 32)
    kd = Distiller(base, student, temperature=4.0, alpha=0.7)

    def kd_step(model, xb, yb, opt):
        loss, _ = kd(xb, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train(student, data, E, step_fn=kd_step)
    add("small student (8/16/32), labels only", alone)
    add("small student, distilled from fp32 (T=4)", student)

    # slimmable: one network, four widths, sandwich rule with in-place distillation
    W = (0.25, 0.5, 0.75, 1.0)
    torch.manual_seed(SEED)
    slim = nn.Sequential(
        S.SlimmableConv2d(1, 32, 3, padding=1, widths=W, slim_in=False), S.SwitchableBatchNorm2d(32, W), nn.ReLU(),
        S.SlimmableConv2d(32, 64, 3, padding=1, widths=W), S.SwitchableBatchNorm2d(64, W), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), S.SlimmableLinear(64 * 16, 128, widths=W), nn.ReLU(),
        S.SlimmableLinear(128, 10, widths=W, slim_out=False))
    rng = random.Random(SEED)
    train(slim, data, E, step_fn=lambda m, xb, yb, opt: sandwich_step(m, xb, yb, opt, W, n_random=1, rng=rng))
    full_bytes = size(slim)
    for w in reversed(W):
        set_width(slim, w)
        active = S.active_weights(slim, w)
        add(f"slimmable, width {w}", slim, f"{active} active weights",
            nbytes=4 * active + (fp32_bytes - 4 * sum(p.numel() for n, p in base.named_parameters()
                                                      if p.dim() > 1)))
    rows[-1]["note"] += f"; all widths stored together: {full_bytes / 1024:.1f} KiB"
    log(f"total {time.perf_counter() - t0:.1f} s")
    for r in rows:
        r["ratio"] = fp32_bytes / r["bytes"]
    return rows


def markdown(rows) -> str:
    out = ["| model | test accuracy | size | vs fp32 | notes |", "|---|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {100 * r['acc']:.2f} % | {r['bytes'] / 1024:.1f} KiB | "
                   f"{r['ratio']:.1f}x | {r['note']} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs (what the tests run)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.quick)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
