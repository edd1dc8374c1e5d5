"""Per-layer sensitivity to quantization, and a mixed-precision search built on it.

    table = lowbit.sensitivity(model, batches, ["int8", "int4"])
    print(table); table.plot("sensitivity.png")
    plan = lowbit.mixed_precision(table, max_bytes=0.3 * table.float_bytes)
    lowbit.quantize(model, plan.config)          # {layer name: preset or None}

:func:`sensitivity` quantizes one Linear at a time (every other layer float), runs the batches and
compares the model's output with the float model's: the SQNR in dB (signal power over the
power of the difference, over all batches) and, given ``loss_fn(output, batch)``, the change of
the mean loss. The layer is restored before the next one, so the model is left as it was.

:func:`mixed_precision` picks one option per layer (float or one of the table's schemes) to meet
a size budget (``max_bytes``, weights and scales of the Linear layers) or a quality budget
(``min_sqnr_db``). It assumes the layers' quantization errors add up as independent noise, so
the model's noise-to-signal ratio is the sum of the per-layer ones from the table,
``NSR = sum_i 10**(-SQNR_i / 10)``. Greedy: starting from all float, repeatedly take the move
(one layer to a smaller option) with the least added NSR per byte saved, until the size budget
is met, or while the quality budget still holds. The plan's prediction is only as good as the
additivity assumption; :meth:`MixedPrecisionPlan.apply` and a measurement tell the truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .api import quantize
from .calibrate import linear_layers, run_model
from .configs import Config, resolve

OutputFn = Callable[[Any, Any], torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]


def _default_output(out, batch) -> torch.Tensor:
    from .report import _hidden

    return _hidden(out)


def _scheme_name(scheme: Config | str) -> str:
    return scheme if isinstance(scheme, str) else repr(scheme)


def _weight_bytes(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.weight.numel() * m.weight.element_size()
    return int(m.weight_nbytes())


@dataclass
class SensitivityTable:
    """``rows``: one dict per (layer, scheme): ``name``, ``scheme``, ``sqnr_db``, ``loss_delta``
    (None without a loss_fn), ``float_bytes``, ``quant_bytes``, ``shape`` (N, K); ``schemes``:
    the scheme objects by name; ``converted`` False when lowbit.quantize kept the layer float."""

    rows: list[dict]
    schemes: dict[str, Config | str] = field(default_factory=dict)
    float_loss: float | None = None

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["name"] for r in self.rows))

    @property
    def float_bytes(self) -> int:
        seen = {}
        for r in self.rows:
            seen[r["name"]] = r["float_bytes"]
        return sum(seen.values())

    def row(self, name: str, scheme: str) -> dict:
        for r in self.rows:
            if r["name"] == name and r["scheme"] == scheme:
                return r
        raise KeyError((name, scheme))

    def _cells(self):
        head = ("layer", "scheme", "SQNR dB", "loss delta", "bytes float", "bytes quant")
        cells = [(r["name"], r["scheme"], f"{r['sqnr_db']:.2f}",
                  "" if r["loss_delta"] is None else f"{r['loss_delta']:+.4g}",
                  str(r["float_bytes"]), str(r["quant_bytes"])) for r in self.rows]
        return head, cells

    def __str__(self) -> str:
        head, cells = self._cells()
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
        line = lambda c: "  ".join(v.ljust(w) if i < 2 else v.rjust(w)  # noqa: E731
                                   for i, (v, w) in enumerate(zip(c, widths))).rstrip()
        return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])

    def to_markdown(self) -> str:
        head, cells = self._cells()
        out = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|"]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in cells])

    def plot(self, path: str, title: str | None = None) -> str:
        """Bar chart of per-layer SQNR for each scheme (higher is less sensitive), saved to `path`."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        layers, schemes = self.layers, list(self.schemes)
        fig, ax = plt.subplots(figsize=(min(24.0, max(6.0, 0.25 * len(layers) * max(1, len(schemes)))), 5.5))
        width = 0.8 / max(1, len(schemes))
        for j, s in enumerate(schemes):
            ys = [self.row(n, s)["sqnr_db"] for n in layers]
            ys = [y if math.isfinite(y) else float("nan") for y in ys]
            ax.bar([i + (j - (len(schemes) - 1) / 2) * width for i in range(len(layers))], ys, width, label=s)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=90, fontsize=7)
        ax.set_ylabel("output SQNR (dB), layer alone quantized")
        ax.set_title(title or "lowbit.sensitivity: lower bar = more sensitive layer")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _sqnr_db(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    sig = sum(float(r.double().pow(2).sum()) for r in ref)
    noise = sum(float((r.double() - o.double()).pow(2).sum()) for r, o in zip(ref, out))
    if noise == 0:
        return math.inf
    return 10 * math.log10(sig / noise) if sig > 0 else -math.inf


@torch.no_grad()
def sensitivity(model: nn.Module, data: Iterable, schemes: Sequence[Config | str] = ("int8", "int4"), *,
                layers: Sequence[str] | None = None, output_fn: OutputFn | None = None,
                loss_fn: LossFn | None = None, progress: bool = True) -> SensitivityTable:
    """Quantize each Linear alone with each scheme and measure the model output (see the module doc).

    `layers`: names to test (default every nn.Linear); `output_fn(model_output, batch)` picks the
    tensor to compare (default: the output tensor, ``last_hidden_state`` or ``logits``);
    `loss_fn(model_output, batch)` adds the loss change. The model is restored afterwards.
    """
    from tqdm.auto import tqdm

    output_fn = output_fn or _default_output
    batches = list(data)
    if not batches:
        raise ValueError("lowbit.sensitivity: data yielded no batches")
    scheme_objs = {_scheme_name(s): s for s in schemes}
    for s in scheme_objs.values():
        resolve(s)
    was_training = model.training
    model.eval()

    def run():
        outs, losses = [], []
        for b in batches:
            o = run_model(model, b)
            outs.append(output_fn(o, b).detach().float())
            if loss_fn is not None:
                losses.append(float(loss_fn(o, b)))
        return outs, (sum(losses) / len(losses) if losses else None)

    ref, ref_loss = run()
    all_layers = linear_layers(model)
    names = [n for n, *_ in all_layers] if layers is None else list(layers)
    by_name = {n: (p, c, lin) for n, p, c, lin in all_layers}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"lowbit.sensitivity: no nn.Linear named {unknown[:3]}")
    rows = []
    try:
        for name in tqdm(names, desc="lowbit sensitivity", disable=not progress, leave=False):
            _, _, lin = by_name[name]
            places = [(p, c) for _, p, c, other in all_layers if other is lin]
            for sname, scheme in scheme_objs.items():
                q = quantize(lin, scheme)
                converted = q is not lin
                for p, c in places:
                    setattr(p, c, q)
                try:
                    outs, loss = run()
                finally:
                    for p, c in places:
                        setattr(p, c, lin)
                rows.append({"name": name, "scheme": sname, "sqnr_db": _sqnr_db(ref, outs),
                             "loss_delta": None if loss is None else loss - ref_loss,
                             "float_bytes": _weight_bytes(lin), "quant_bytes": _weight_bytes(q),
                             "shape": (lin.out_features, lin.in_features), "converted": converted})
    finally:
        model.train(was_training)
    return SensitivityTable(rows, scheme_objs, ref_loss)


@dataclass
class MixedPrecisionPlan:
    """``choice``: layer name -> scheme name or None (float); ``config``: the mapping for
    :func:`lowbit.quantize`; predicted SQNR (additive-noise model) and bytes of the Linear weights."""

    choice: dict[str, str | None]
    config: dict[str, Config | str | None]
    bytes: int
    float_bytes: int
    predicted_sqnr_db: float
    met_budget: bool

    def apply(self, model: nn.Module) -> nn.Module:
        return quantize(model, self.config)

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for v in self.choice.values():
            counts[v or "float"] = counts.get(v or "float", 0) + 1
        return (f"mixed precision: {self.bytes} of {self.float_bytes} bytes "
                f"({self.bytes / self.float_bytes:.1%}), predicted SQNR {self.predicted_sqnr_db:.2f} dB, "
                f"layers {counts}{'' if self.met_budget else ' (budget NOT met)'}")


def mixed_precision(table: SensitivityTable, *, max_bytes: float | None = None,
                    min_sqnr_db: float | None = None) -> MixedPrecisionPlan:
    """Greedy layer-wise scheme choice meeting `max_bytes` or `min_sqnr_db` (see the module doc).

    With both: the size budget drives, and the plan says whether the quality budget held.
    Layers whose scheme could not be applied (``converted`` False) keep float for that option.
    """
    if max_bytes is None and min_sqnr_db is None:
        raise ValueError("lowbit.mixed_precision: give max_bytes or min_sqnr_db (or both)")
    options: dict[str, list[tuple[str | None, int, float]]] = {}  # name -> [(scheme, bytes, nsr)]
    for r in table.rows:
        opts = options.setdefault(r["name"], [(None, r["float_bytes"], 0.0)])
        if r["converted"]:
            nsr = 0.0 if r["sqnr_db"] == math.inf else 10 ** (-r["sqnr_db"] / 10)
            opts.append((r["scheme"], r["quant_bytes"], nsr))
    current = {name: opts[0] for name, opts in options.items()}
    total_bytes = sum(o[1] for o in current.values())
    total_nsr = 0.0

    def sqnr(nsr: float) -> float:
        return math.inf if nsr <= 0 else -10 * math.log10(nsr)

    def size_ok():
        return max_bytes is None or total_bytes <= max_bytes

    while True:
        if max_bytes is not None and size_ok():
            break
        best = None
        for name, opts in options.items():
            cur = current[name]
            for o in opts:
                saved = cur[1] - o[1]
                if saved <= 0:
                    continue
                added = o[2] - cur[2]
                if max_bytes is None and sqnr(total_nsr + added) < min_sqnr_db:
                    continue  # quality-driven: never cross the quality budget
                key = (added / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, name, o)
        if best is None:
            break
        _, name, o = best
        total_bytes += o[1] - current[name][1]
        total_nsr += o[2] - current[name][2]
        current[name] = o
    met = size_ok() and (min_sqnr_db is None or sqnr(total_nsr) >= min_sqnr_db)
    choice = {name: o[0] for name, o in current.items()}
    config = {name: (None if s is None else table.schemes[s]) for name, s in choice.items()}
    return MixedPrecisionPlan(choice, config, total_bytes, table.float_bytes, sqnr(total_nsr), met)
