"""Codebook learning: time and quality of every learner on one layer, and the quality bars.

    python benchmarks/codebook_learning.py                  # 4096 x 4096, every method
    python benchmarks/codebook_learning.py --n 1024 --k 1024 --methods kmeans4 pq2
    python benchmarks/codebook_learning.py --compare         # + sklearn / FAISS comparisons

The weight is synthetic but layer-like (Gaussian with per-column scales and heavy tails;
no model weights are downloaded). Times are wall clock with ``torch.set_num_threads(threads)``;
on a shared machine they are noisy: say so when reporting. MSE is per weight; "rtn" is
round-to-nearest asymmetric per-channel quantization at the same bits per weight (codebook
storage not counted in either).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lowbit.quant import codebook as cb
from lowbit.quant.affine import fake_quantize

# name -> (bits per weight, learner call)
METHODS = {
    "kmeans4": (4, lambda w, p: cb.scalar_kmeans_quantize(w, 4, progress=p)),
    "kmeans4-rows256": (4, lambda w, p: cb.scalar_kmeans_quantize(w, 4, row_groups=256, progress=p)),
    "kmeans3": (3, lambda w, p: cb.scalar_kmeans_quantize(w, 3, progress=p)),
    "pq2": (2, lambda w, p: cb.product_quantize(w, 8, 4, groups=8, progress=p)),
    # The 2-bit PQ a vpshufb register table could decode (16 entries of d = 2), against pq2's
    # 256 entries of d = 4: why pq2 keeps d = 4 (csrc/cpu/codebook.cpp).
    "pq2-d2x16": (2, lambda w, p: cb.product_quantize(w, 4, 2, groups=8, progress=p)),
    "opq2": (2, lambda w, p: cb.optimized_product_quantize(w, 8, 4, groups=8, block=128, progress=p)),
    "rq2": (2, lambda w, p: cb.residual_quantize(w, 8, 8, 2, progress=p)),
    "aq2": (2, lambda w, p: cb.additive_quantize(w, 8, 8, 2, progress=p)),
    "two-level2": (2, lambda w, p: cb.two_level_quantize(w, 8, 8, groups=4, progress=p)),
    "lattice-d4-2": (2, lambda w, p: cb.lattice_quantize(w, 8, 4)),
}


def layer_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.5, 1.5, k)
    return (w + 0.3 * torch.randn(n, k, generator=g) ** 3 / 3) * 0.02


def rtn_mse(w: torch.Tensor, bits: int) -> float:
    return (fake_quantize(w, bits, symmetric=False, granularity="channel") - w).square().mean().item()


def run_methods(n: int, k: int, names: list[str], progress: bool) -> list[dict]:
    w = layer_weight(n, k)
    rows = []
    for name in names:
        bpw, learn = METHODS[name]
        t0 = time.perf_counter()
        fit = learn(w, progress)
        dt = time.perf_counter() - t0
        mse = (cb.decode(fit) - w).square().mean().item()
        rows.append(dict(method=name, bpw=bpw, seconds=dt, mse=mse, rtn=rtn_mse(w, bpw)))
        r = rows[-1]
        print(f"{name:16s} {bpw} bpw  {dt:7.1f} s  mse {mse:.3e}  rtn {r['rtn']:.3e}  ratio {mse / r['rtn']:.3f}", flush=True)
    return rows


def run_finetune(n: int, k: int, tokens: int) -> dict:
    w = layer_weight(n, k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, k, generator=g) * torch.linspace(0.1, 3, k)
    fit = cb.scalar_kmeans_quantize(w, 4)
    t0 = time.perf_counter()
    tuned = cb.finetune_codebooks(fit, w, x, steps=25)
    dt = time.perf_counter() - t0
    before, after = cb.output_error(fit, w, x), cb.output_error(tuned, w, x)
    print(f"finetune kmeans4 on {tokens} tokens: {dt:.1f} s, output error {before:.4e} -> {after:.4e}", flush=True)
    return dict(seconds=dt, before=before, after=after)


def run_compare() -> list[str]:
    """sklearn inertia and FAISS MSE on the same data, same code size."""
    import faiss
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    out = []
    X = torch.tensor(load_digits().data, dtype=torch.float32)
    for k in (10, 32, 64):
        ours = sum(float(cb.kmeans(X, k, iters=300, return_result=True, seed=s).inertia) for s in range(4)) / 4
        ref = sum(KMeans(k, random_state=s).fit(X.numpy()).inertia_ for s in range(4)) / 4
        out.append(f"| k-means digits k={k} | inertia {ours:.4e} | sklearn {ref:.4e} | {ours / ref:.4f} |")
    g = torch.Generator().manual_seed(0)
    A = torch.randn(32, 32, generator=g) / 32**0.5
    D = (torch.randn(8192, 32, generator=g) @ A) * torch.linspace(0.2, 2, 32)
    Dn = D.numpy()

    def mse(fit):
        return (cb.decode(fit) - D).square().mean().item()

    for M, nbits in ((8, 8), (16, 6)):
        pq = faiss.ProductQuantizer(32, M, nbits)
        pq.train(Dn)
        ref = float(((pq.decode(pq.compute_codes(Dn)) - Dn) ** 2).mean())
        ours = mse(cb.product_quantize(D, nbits, 32 // M, groups=M))
        out.append(f"| PQ M={M} x {nbits} bit | mse {ours:.4e} | faiss {ref:.4e} | {ours / ref:.4f} |")
        opq = faiss.OPQMatrix(32, M)
        opq.train(Dn)
        Dr = opq.apply_py(Dn)
        pq2 = faiss.ProductQuantizer(32, M, nbits)
        pq2.train(Dr)
        ref = float(((opq.reverse_transform(pq2.decode(pq2.compute_codes(Dr))) - Dn) ** 2).mean())
        ours = mse(cb.optimized_product_quantize(D, nbits, 32 // M, groups=M, block=32))
        out.append(f"| OPQ M={M} x {nbits} bit | mse {ours:.4e} | faiss {ref:.4e} | {ours / ref:.4f} |")
    for C, nbits in ((2, 8), (4, 6)):
        rq = faiss.ResidualQuantizer(32, C, nbits)
        rq.train(Dn)
        ref = float(((rq.decode(rq.compute_codes(Dn)) - Dn) ** 2).mean())
        ours = mse(cb.residual_quantize(D, nbits, 32, C))
        out.append(f"| RQ {C} x {nbits} bit | mse {ours:.4e} | faiss {ref:.4e} | {ours / ref:.4f} |")
        ours = mse(cb.additive_quantize(D, nbits, 32, C))
        out.append(f"| AQ {C} x {nbits} bit (vs faiss RQ) | mse {ours:.4e} | faiss {ref:.4e} | {ours / ref:.4f} |")
    for line in out:
        print(line, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens for the fine-tuning timing")
    ap.add_argument("--compare", action="store_true", help="also run the sklearn / FAISS comparisons")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# codebook learning, {args.n}x{args.k}, torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    run_methods(args.n, args.k, args.methods, args.progress)
    if args.tokens:
        run_finetune(args.n, args.k, args.tokens)
    if args.compare:
        run_compare()


if __name__ == "__main__":
    main()
