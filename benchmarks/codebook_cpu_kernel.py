"""Codebook CPU kernel vs fp32 F.linear: interleaved pairs in one process, median ratio.

python benchmarks/codebook_cpu_kernel.py [--m 1 16] [--reps 15] [--layouts kmeans4 pq2]
Prints per layout and M: median time of F.linear and codebook_mm, the median of the per-pair
ratios, and the kernel's cost in CPU cycles per weight (at --ghz, both threads counted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import lowbit  # noqa: F401
from lowbit import ops
from lowbit.formats import codebook as fmt

# name: (d, bits, C, R, G, scale)
LAYOUTS = {
    "kmeans4": (1, 4, 1, 1, 1, True),
    "kmeans3": (1, 3, 1, 1, 1, True),
    "pq2": (4, 8, 1, 1, 8, True),
    "pq2-G1": (4, 8, 1, 1, 1, False),
    "pq1-d8": (8, 8, 1, 1, 8, True),
    "pq4-d2": (2, 8, 1, 1, 8, True),
    "aq2": (8, 8, 2, 1, 1, True),
}


def weight(N, K, d, bits, C, R, G, has_scale):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (N, K // d, C), generator=g)
    cb = torch.randn(R, G, C, 2**bits, d, generator=g).half()
    s = torch.rand(N, generator=g) + 0.5 if has_scale else None
    return fmt.from_codes(codes, cb, s)


CLOCK = time.perf_counter


def timeit(fn, inner):
    t = CLOCK()
    for _ in range(inner):
        fn()
    return (CLOCK() - t) / inner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--layouts", nargs="+", default=["kmeans4", "pq2"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ghz", type=float, default=3.0)
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, timed by its own CPU time (time.thread_time), min over reps: "
                         "A/B comparisons that a loaded machine barely disturbs")
    a = ap.parse_args()
    global CLOCK
    if a.cpu_time:
        CLOCK = time.thread_time
    torch.set_num_threads(1 if a.cpu_time else 2)
    agg = min if a.cpu_time else statistics.median
    dt = getattr(torch, a.dtype)
    N, K = a.n, a.k
    w32 = torch.randn(N, K)
    print(f"load average before: {os.getloadavg()[0]:.2f}  N={N} K={K} x={a.dtype}")
    for name in a.layouts:
        w = weight(N, K, *LAYOUTS[name])
        for M in a.m:
            x = torch.randn(M, K)
            xd = x.to(dt)
            lin = lambda: F.linear(x, w32)  # noqa: E731
            cb = lambda: ops.codebook_mm(xd, w.packed, w.codebooks, w.scale)  # noqa: E731
            inner = max(1, int(0.05 / max(timeit(lin, 1), 1e-5)))
            lin(); cb()
            tl, tc, ratio = [], [], []
            for _ in range(a.reps):
                t1 = timeit(lin, inner)
                t2 = timeit(cb, inner)
                tl.append(t1); tc.append(t2); ratio.append(t1 / t2)
            med = agg(tc)
            cyc = med * a.ghz * 1e9 * (1 if a.cpu_time else 2) / (N * K)
            r = agg(tl) / med if a.cpu_time else statistics.median(ratio)
            print(f"{name:8s} M={M:<4d} linear {agg(tl)*1e3:7.3f} ms  codebook {med*1e3:7.3f} ms  "
                  f"ratio {r:5.2f}x  ({cyc:.3f} cyc/weight, {cyc/M:.3f} per weight and row of x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
