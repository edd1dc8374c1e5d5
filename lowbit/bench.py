"""Benchmark harness shared by ``lowbit bench`` and ``pytest benchmarks --benchmark-only``.

What a result means
-------------------
Every candidate (a lowbit op, a baseline from torch, or a peer library's layer:
lowbit.bench_peers) computes the same GEMM problem
``y[M, N] = x[M, K] @ w[N, K].T`` in its own formats. For each we report

* the median time of one call, with the caches evicted before every call (cold, the default:
  a model's weights are read once per token and are not cached from one call of a layer to the
  next) or, with ``--warm``, back to back;
* achieved GOP/s = 2*M*N*K / t, and GB/s = the bytes the problem must move at least
  (weights incl. scales + activations + outputs, in the candidate's own dtypes) / t.
  Intermediates a candidate creates (a quantized copy of x, say) are its own cost and are
  not counted as traffic;
* % of roofline = achieved / min(peak, bandwidth * intensity), with bandwidth and peaks
  measured in the same run, at its start and at its end, keeping the best of each
  (``measure_roofline``, ``Roofline.best``). With ``--warm``, weights that fit in the
  last-level cache can legitimately exceed 100% of the DRAM roofline;
* the speed ratio against the strongest baseline of the same family (and the control, fp32 on CPU / bf16 on
  GPU) of the same run. All candidates of a shape are timed in rounds: each round calls
  every candidate once (rotating the order), and a ratio is the median over rounds of the
  per-round ratio. On a shared, noisy machine that cancels most of the drift that two
  separately measured medians would carry;
* rel.err of the output against fp32 ``F.linear`` with the unquantized weight (float
  outputs) or against the exact integer product (raw int8 -> int32 ops, must be 0).

Families of candidates register in ``FAMILIES`` (``int8`` here); ``lowbit bench --ops``
takes its choices from it.
"""

from __future__ import annotations

import dataclasses
import functools
import datetime
import math
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Shape:
    m: int
    n: int
    k: int

    @property
    def flops(self) -> int:
        # One multiply and one add per (m, n, k): the convention every GEMM benchmark uses,
        # for integer ops too (then the unit is "OP/s").
        return 2 * self.m * self.n * self.k

    def __str__(self) -> str:
        return f"M={self.m} N={self.n} K={self.k}"


def parse_nk(text: str) -> tuple[int, int]:
    """'11008x4096' -> (N, K): output features x input features, the nn.Linear weight shape."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise ValueError(f"shape must look like NxK with positive integers (e.g. 4096x11008), got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Traffic:
    """Minimum bytes a GEMM must move, split so the accounting can be read and tested."""

    weight: int
    activation: int
    output: int

    @property
    def total(self) -> int:
        return self.weight + self.activation + self.output


def gemm_traffic(shape: Shape, *, weight_bits: float, act_bytes: int, out_bytes: int,
                 scale_bytes: int = 0, scales: int | None = None) -> Traffic:
    """Bytes for weights (packed at `weight_bits` per element, plus `scales` scale values of
    `scale_bytes` each, default one per output channel), activations and outputs."""
    scales = shape.n if scales is None else scales
    weight = math.ceil(shape.n * shape.k * weight_bits / 8) + scales * scale_bytes
    return Traffic(weight=weight, activation=shape.m * shape.k * act_bytes, output=shape.m * shape.n * out_bytes)


# --------------------------------------------------------------------------- roofline


@dataclass
class Roofline:
    """Memory bandwidth and compute peaks of this device, measured in this run."""

    bandwidth_gbs: float
    peak_gops: dict[str, float]  # compute class ("float", "int8") -> GOP/s
    how: dict[str, str] = field(default_factory=dict)

    def bound_gops(self, compute: str, flops: int, nbytes: int) -> float:
        intensity = flops / nbytes  # OP per byte
        return min(self.peak_gops[compute], self.bandwidth_gbs * intensity)

    def percent(self, compute: str, flops: int, nbytes: int, seconds: float) -> float:
        achieved = flops / seconds / 1e9
        return 100.0 * achieved / self.bound_gops(compute, flops, nbytes)

    @staticmethod
    def best(*rooflines: "Roofline") -> "Roofline":
        """Per limit, the highest of several measurements. A roofline is what the machine can
        do; a low measurement only means other work shared the machine while it ran (one quick
        run on a loaded machine measured a third of the float peak, and every %roof was 3x)."""
        bw_i = max(range(len(rooflines)), key=lambda i: rooflines[i].bandwidth_gbs)
        peaks, how = {}, {"bandwidth": rooflines[bw_i].how.get("bandwidth", "")}
        for key in rooflines[0].peak_gops:
            i = max(range(len(rooflines)), key=lambda j: rooflines[j].peak_gops.get(key, 0.0))
            peaks[key], how[key] = rooflines[i].peak_gops[key], rooflines[i].how.get(key, "")
        return Roofline(bandwidth_gbs=rooflines[bw_i].bandwidth_gbs, peak_gops=peaks, how=how)


# --------------------------------------------------------------------------- timing


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache, from sysfs (Linux); None where it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "size")) as f:
                m = re.fullmatch(r"(\d+)([KMG]?)", f.read().strip().upper())
        except OSError:
            continue
        if m:
            sizes.append(int(m.group(1)) * units[m.group(2)])
    return max(sizes) if sizes else None


# Cold-cache timing evicts the caches before every timed call by touching a buffer FLUSH_FACTOR
# times the last-level cache (at least FLUSH_MIN_BYTES). A model's weights are read once per token
# and do not stay cached from one call of a layer to the next, so warm-cache timings flatter
# whichever candidate's weights happen to fit (4096 x 4096 at 4 bits is 8 MiB, well inside a
# 32 MiB L3 or a 50 MiB H100 L2) and, in interleaved rounds, whichever candidate happens to run
# right after another one that read the same weights.
FLUSH_FACTOR = 2
FLUSH_MIN_BYTES = 64 * 2**20


@functools.lru_cache(maxsize=None)
def _flush_buffer(device: torch.device) -> torch.Tensor:
    """One eviction buffer per device for the whole process: every shape's timer reads the same
    one, instead of allocating and first-touching 64+ MiB again."""
    if device.type == "cuda":
        return torch.empty(flush_buffer_bytes(device), dtype=torch.uint8, device=device)
    buf = torch.empty(flush_buffer_bytes(device) // 4, dtype=torch.float32)
    buf.fill_(1.0)  # first-touch page faults now, not inside a timed round
    return buf


def flush_buffer_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        llc = torch.cuda.get_device_properties(device).L2_cache_size
    else:
        llc = last_level_cache_bytes() or 0
    return max(FLUSH_MIN_BYTES, FLUSH_FACTOR * llc)


class CpuTimer:
    """Wall time of `inner` calls, per call. Cold (the default): the caches are evicted before
    each call, outside the timed region, and each call is timed on its own; warm: back to back."""

    device = torch.device("cpu")

    def __init__(self, cold: bool = True):
        self.cold = cold
        self._flush = _flush_buffer(self.device) if cold else None

    def sync(self):
        pass

    def evict(self):
        if self._flush is not None:
            self._flush.sum()  # reading every line evicts the (clean) weights; parallel, vectorized

    def __call__(self, fn: Callable[[], Any], inner: int) -> float:
        if not self.cold:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            return (time.perf_counter() - t0) / inner
        total = 0.0
        for _ in range(inner):
            self.evict()
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        return total / inner


class CudaTimer:
    """CUDA events bracket the calls, so launch queueing is included but host sync is not.
    Cold (the default): L2 is overwritten before each call, outside the events (as Triton's
    do_bench does), and each call has its own pair of events."""

    def __init__(self, device: torch.device, cold: bool = True):
        self.device = device
        self.cold = cold
        self._flush = _flush_buffer(device) if cold else None

    def sync(self):
        torch.cuda.synchronize(self.device)

    def evict(self):
        if self._flush is not None:
            self._flush.zero_()

    def __call__(self, fn: Callable[[], Any], inner: int) -> float:
        torch.cuda.synchronize(self.device)
        if not self.cold:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        events = []
        for _ in range(inner):
            self.evict()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return sum(a.elapsed_time(b) for a, b in events) / 1e3 / inner


def cold_call_floor(device: torch.device, reps: int = 21) -> float:
    """Median seconds of a one-element torch op timed cold, as every candidate is. On a CPU the
    eviction also evicts the interpreter's and the dispatcher's code and data, so any op call pays
    this much before its kernel reads a byte (measured ~0.11-0.14 ms on the 2-vCPU Xeon VM, where
    the same call takes 3 us warm). Every cold time includes it: int4 at M = 1, 4096^2 (~0.6 ms
    cold) spends about a fifth of its time here, fp32 F.linear (~2.4 ms) a twentieth, so speed
    ratios at M = 1 are capped by it. Reported beside the results, never subtracted from them."""
    timer = timer_for(device, cold=True)
    one = torch.zeros(1, device=device)
    fn = lambda: one.add_(0)  # noqa: E731
    fn()
    timer.sync()
    return median_time([timer(fn, 1) for _ in range(reps)])


def timer_for(device: torch.device, cold: bool = True):
    return CudaTimer(device, cold) if device.type == "cuda" else CpuTimer(cold)


@dataclass
class TimingPlan:
    warmup: int = 2
    reps: int = 11            # rounds
    min_reps: int = 3         # a slow candidate still gets this many samples
    budget_s: float = 5.0     # per candidate per shape, after warm-up
    min_sample_s: float = 2e-3  # short calls are repeated inside one sample so the clock resolves them
    cold: bool = True         # evict the caches before every timed call (see CpuTimer)

    @classmethod
    def quick(cls) -> "TimingPlan":
        return cls(warmup=1, reps=3, min_reps=1, budget_s=1.5, min_sample_s=1e-3)


def plan_reps(t_call: float, plan: TimingPlan) -> tuple[int, int, bool]:
    """(samples, calls per sample, slow?) for a candidate whose warm call took `t_call` s."""
    inner = max(1, math.ceil(plan.min_sample_s / max(t_call, 1e-9)))
    reps = plan.reps
    slow = t_call * inner * reps > plan.budget_s
    if slow:
        reps = max(plan.min_reps, int(plan.budget_s // (t_call * inner)))
    return min(reps, plan.reps), inner, slow


def time_interleaved(fns: dict[str, Callable[[], Any]], timer, plan: TimingPlan) -> tuple[dict[str, list], dict[str, bool]]:
    """Time every function in rounds; samples[name][r] is its time in round r, or None where a
    slow candidate sat the round out. Returns (samples, slow)."""
    names = list(fns)
    reps, inner, slow = {}, {}, {}
    for name in names:
        fn = fns[name]
        t0 = time.perf_counter()
        for _ in range(max(1, plan.warmup)):
            fn()
        timer.sync()
        t_call = (time.perf_counter() - t0) / max(1, plan.warmup)
        reps[name], inner[name], slow[name] = plan_reps(t_call, plan)
    samples: dict[str, list] = {n: [] for n in names}
    for r in range(plan.reps):
        # Rotate the order so no candidate always runs right after the same neighbour
        # (cache state, frequency ramps).
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for name in order:
            taken = sum(s is not None for s in samples[name])
            samples[name].append(timer(fns[name], inner[name]) if taken < reps[name] else None)
    return samples, slow


def median_time(samples: Sequence[float | None]) -> float | None:
    vals = [s for s in samples if s is not None]
    return statistics.median(vals) if vals else None


def paired_ratio(base: Sequence[float | None], cand: Sequence[float | None]) -> float | None:
    """Median over the rounds both ran of t_base / t_cand (> 1: the candidate is faster)."""
    vals = [b / c for b, c in zip(base, cand) if b is not None and c is not None and c > 0]
    return statistics.median(vals) if vals else None


def strongest(samples: dict[str, list], names: Iterable[str]) -> str | None:
    """The name with the lowest median time among `names` (those that produced samples)."""
    best, best_t = None, math.inf
    for n in names:
        t = median_time(samples.get(n, []))
        if t is not None and t < best_t:
            best, best_t = n, t
    return best


# --------------------------------------------------------------------------- candidates


@dataclass
class Inputs:
    """Inputs shared by all candidates of one (shape, device): built once, in the formats
    each family needs, from the same float x and w so outputs can be compared."""

    shape: Shape
    device: torch.device
    x: torch.Tensor          # float32 [M, K]
    w: torch.Tensor          # float32 [N, K]
    cache: dict = field(default_factory=dict)

    def get(self, key: str, make: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    # int8 formats (symmetric, per output channel for w, per token for x)
    @property
    def wq(self):
        return self.get("wq", lambda: _sym_int8(self.w))[0]

    @property
    def w_scale(self):
        return self.get("wq", lambda: _sym_int8(self.w))[1]

    @property
    def xq(self):
        return self.get("xq", lambda: _sym_int8(self.x))[0]

    @property
    def x_scale(self):
        return self.get("xq", lambda: _sym_int8(self.x))[1]

    def y_ref(self) -> torch.Tensor:
        return self.get("y_ref", lambda: F.linear(self.x.double(), self.w.double()))

    def acc_ref(self) -> torch.Tensor:
        # Exact: |sum| <= 127*127*K < 2**53 for any K a GEMM here can have.
        return self.get("acc_ref", lambda: self.xq.double() @ self.wq.double().T)


def _sym_int8(t: torch.Tensor):
    # Same formula as the lowbit spec (reference/int8.py), written out so the baselines get
    # identical int8 inputs even when lowbit is not importable.
    amax = t.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(t.float() / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape.m, shape.k, generator=g).to(device)
    w = (torch.randn(shape.n, shape.k, generator=g) / math.sqrt(shape.k)).to(device)
    return Inputs(shape, device, x, w)


@dataclass
class Candidate:
    name: str
    family: str
    role: str                 # "baseline" or "lowbit"
    act: str                  # activation dtype as the caller sees it
    compute: str              # roofline peak that applies: "float" or "int8"
    check: str                # "float": vs fp32 F.linear; "int": vs the exact int product
    build: Callable[[Inputs], Callable[[], torch.Tensor]]
    traffic: Callable[[Shape], Traffic]
    devices: tuple[str, ...] = ("cpu", "cuda")


def _bf16(inp: Inputs, key: str, t_fn):
    return inp.get(key, lambda: t_fn().to(torch.bfloat16).contiguous())


def _need(cond: bool, why: str):
    if not cond:
        raise RuntimeError(why)


def fp32_linear(inp: Inputs):
    """The control on the CPU: float32 F.linear on the same weights."""
    x, w = inp.x, inp.w
    return lambda: F.linear(x, w)


def bf16_linear(inp: Inputs):
    x, w = _bf16(inp, "x16", lambda: inp.x), _bf16(inp, "w16", lambda: inp.w)
    return lambda: F.linear(x, w)


def _quantize_dynamic_linear(inp: Inputs):
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # removed from newer torch releases
        raise RuntimeError(f"torch.ao.quantization unavailable ({e})") from None
    lin = torch.nn.Linear(inp.shape.k, inp.shape.n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(inp.w.cpu())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices, once per build
        q = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    x = inp.x
    return lambda: q(x)


def _lowbit_ops():
    import lowbit.ops as ops  # lazily: the harness itself must import without the package's kernels
    return ops


def _int8_candidates() -> list[Candidate]:
    t_f32 = lambda s: gemm_traffic(s, weight_bits=32, act_bytes=4, out_bytes=4)  # noqa: E731
    t_bf16 = lambda s: gemm_traffic(s, weight_bits=16, act_bytes=2, out_bytes=2)  # noqa: E731
    t_w8_f32 = lambda s: gemm_traffic(s, weight_bits=8, scale_bytes=4, act_bytes=4, out_bytes=4)  # noqa: E731
    t_w8_bf16 = lambda s: gemm_traffic(s, weight_bits=8, scale_bytes=2, act_bytes=2, out_bytes=2)  # noqa: E731
    t_w8_bf16_s32 = lambda s: gemm_traffic(s, weight_bits=8, scale_bytes=4, act_bytes=2, out_bytes=2)  # noqa: E731
    t_raw = lambda s: gemm_traffic(s, weight_bits=8, act_bytes=1, out_bytes=4)  # noqa: E731
    # quantize_dynamic's default qconfig quantizes the weight per tensor: one scale.
    t_qd = lambda s: gemm_traffic(s, weight_bits=8, scale_bytes=4, scales=1, act_bytes=4, out_bytes=4)  # noqa: E731

    def weight_int8pack(inp):
        _need(hasattr(torch, "_weight_int8pack_mm"), "torch._weight_int8pack_mm not in this torch")
        x = _bf16(inp, "x16", lambda: inp.x)
        wq, s = inp.wq, inp.w_scale.to(torch.bfloat16)  # it requires scales in the activation dtype
        return lambda: torch._weight_int8pack_mm(x, wq, s)

    def int_mm(inp):
        _need(hasattr(torch, "_int_mm"), "torch._int_mm not in this torch")
        a, bt = inp.xq, inp.wq.t()  # [K, N] view of the [N, K] weight: no copy
        return lambda: torch._int_mm(a, bt)

    def qdynamic(inp):
        _need(inp.device.type == "cpu", "CPU only")
        return _quantize_dynamic_linear(inp)

    def lb_weight_only(dtype):
        def build(inp):
            ops = _lowbit_ops()
            x = inp.x if dtype == torch.float32 else _bf16(inp, "x16", lambda: inp.x)
            wq, s = inp.wq, inp.w_scale
            return lambda: ops.int8_weight_only_mm(x, wq, s)
        return build

    def lb_w8a8(inp):
        ops = _lowbit_ops()
        x, wq, s = inp.x, inp.wq, inp.w_scale

        def run():
            q, sx = ops.int8_quantize_dynamic(x)
            return ops.int8_scaled_mm(q, wq, sx, s)
        return run

    def lb_int8_mm(inp):
        ops = _lowbit_ops()
        a, b = inp.xq, inp.wq
        return lambda: ops.int8_mm(a, b)

    C = Candidate
    return [
        C("fp32 F.linear", "int8", "baseline", "float32", "float", "float", fp32_linear, t_f32, ("cpu",)),
        C("bf16 F.linear", "int8", "baseline", "bfloat16", "float", "float", bf16_linear, t_bf16),
        C("torch._weight_int8pack_mm", "int8", "baseline", "bfloat16", "float", "float", weight_int8pack, t_w8_bf16),
        C("torch._int_mm (raw)", "int8", "baseline", "int8", "int8", "int", int_mm, t_raw),
        C("quantize_dynamic qint8", "int8", "baseline", "float32", "int8", "float", qdynamic, t_qd, ("cpu",)),
        C("int8_weight_only_mm", "int8", "lowbit", "float32", "float", "float", lb_weight_only(torch.float32), t_w8_f32),
        C("int8_weight_only_mm", "int8", "lowbit", "bfloat16", "float", "float", lb_weight_only(torch.bfloat16), t_w8_bf16_s32),
        C("w8a8 (quantize_dynamic+scaled_mm)", "int8", "lowbit", "float32", "int8", "float", lb_w8a8, t_w8_f32),
        C("int8_mm (raw)", "int8", "lowbit", "int8", "int8", "int", lb_int8_mm, t_raw),
    ]


def _int4_weight(inp: Inputs, group_size: int = 128):
    from lowbit.formats import int4 as fmt  # lazily, as for the ops
    return inp.get(f"w4g{group_size}", lambda: fmt.quantize_weight(inp.w, group_size, symmetric=False,
                                                                   scale_dtype=torch.float32))


def _int4_candidates() -> list[Candidate]:
    """W4A16, group 128, asymmetric: lowbit against torch's own int4 CPU/GPU kernels."""
    t_f32 = lambda s: gemm_traffic(s, weight_bits=32, act_bytes=4, out_bytes=4)  # noqa: E731
    t_bf16 = lambda s: gemm_traffic(s, weight_bits=16, act_bytes=2, out_bytes=2)  # noqa: E731
    # scale + zero per group of 128, as 2 x 4 bytes (lowbit) or 2 x 2 bytes (torch, bf16)
    t_w4 = lambda act_bytes, sz_bytes: (lambda s: gemm_traffic(  # noqa: E731
        s, weight_bits=4 + 8 * sz_bytes / 128, act_bytes=act_bytes, out_bytes=act_bytes))

    def torch_int4pack(inp):
        from lowbit.formats import int4 as fmt
        w4 = _int4_weight(inp)
        codes = fmt.unpack(w4.packed, inp.shape.k).to(torch.int32)
        # torch's convention: w = (u - 8) * scale + zero, with [K/group, N, 2] bf16 scales_and_zeros
        zero = (8 - w4.zero) * w4.scale
        sz = torch.stack([w4.scale.T, zero.T], dim=-1).contiguous().to(torch.bfloat16)
        x = _bf16(inp, "x16", lambda: inp.x)
        if inp.device.type == "cpu":
            _need(hasattr(torch, "_weight_int4pack_mm_for_cpu"), "torch._weight_int4pack_mm_for_cpu not in this torch")
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            return lambda: torch._weight_int4pack_mm_for_cpu(x, packed, 128, sz)
        # The CUDA kernel takes uint8 [N, K/2] with the even column in the high nibble.
        packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        return lambda: torch._weight_int4pack_mm(x, packed, 128, sz)

    def lb_int4(dtype):
        def build(inp):
            ops = _lowbit_ops()
            w4 = _int4_weight(inp)
            x = inp.x if dtype == torch.float32 else _bf16(inp, "x16", lambda: inp.x)
            return lambda: ops.int4_weight_only_mm(x, w4.packed, w4.scale, w4.zero, 128)
        return build

    C = Candidate
    return [
        C("fp32 F.linear", "int4", "baseline", "float32", "float", "float", fp32_linear, t_f32, ("cpu",)),
        C("bf16 F.linear", "int4", "baseline", "bfloat16", "float", "float", bf16_linear, t_bf16),
        C("torch._weight_int4pack_mm g128", "int4", "baseline", "bfloat16", "float", "float", torch_int4pack,
          t_w4(2, 2)),
        C("int4_weight_only_mm g128", "int4", "lowbit", "float32", "float", "float", lb_int4(torch.float32),
          t_w4(4, 4)),
        C("int4_weight_only_mm g128", "int4", "lowbit", "bfloat16", "float", "float", lb_int4(torch.bfloat16),
          t_w4(2, 4)),
    ]


def _fp8_weight(inp: Inputs, fmt_name: str = "e4m3"):
    from lowbit.formats import fp8 as fmt
    return inp.get(f"w8f{fmt_name}", lambda: fmt.quantize_weight(inp.w, fmt_name, "row"))


def _fp8_candidates() -> list[Candidate]:
    """FP8 E4M3, per-channel weights: weight-only and W8A8 (dynamic per-token activations)."""
    t_f32 = lambda s: gemm_traffic(s, weight_bits=32, act_bytes=4, out_bytes=4)  # noqa: E731
    t_w8 = lambda act_bytes: (lambda s: gemm_traffic(  # noqa: E731
        s, weight_bits=8, scale_bytes=4, act_bytes=act_bytes, out_bytes=act_bytes))

    def scaled_mm(inp):
        _need(inp.device.type == "cuda" and hasattr(torch, "_scaled_mm"), "torch._scaled_mm needs a CUDA GPU")
        w8 = _fp8_weight(inp)
        xq, sx = _lowbit_ops().fp8_quantize_dynamic(inp.x, "e4m3", "row")
        wt, sw = w8.qweight.t(), w8.scale.reshape(1, -1)
        return lambda: torch._scaled_mm(xq, wt, scale_a=sx.reshape(-1, 1), scale_b=sw, out_dtype=torch.bfloat16)

    def lb_weight_only(dtype):
        def build(inp):
            ops = _lowbit_ops()
            w8 = _fp8_weight(inp)
            x = inp.x if dtype == torch.float32 else _bf16(inp, "x16", lambda: inp.x)
            return lambda: ops.fp8_weight_only_mm(x, w8.qweight, w8.scale)
        return build

    def lb_scaled(inp):
        ops = _lowbit_ops()
        w8 = _fp8_weight(inp)
        x = inp.x

        def run():
            q, sx = ops.fp8_quantize_dynamic(x, "e4m3", "row")
            return ops.fp8_scaled_mm(q, w8.qweight, sx, w8.scale)
        return run

    C = Candidate
    return [
        C("fp32 F.linear", "fp8", "baseline", "float32", "float", "float", fp32_linear, t_f32, ("cpu",)),
        C("bf16 F.linear", "fp8", "baseline", "bfloat16", "float", "float", bf16_linear,
          lambda s: gemm_traffic(s, weight_bits=16, act_bytes=2, out_bytes=2)),
        C("torch._scaled_mm e4m3 row", "fp8", "baseline", "float32", "float", "float", scaled_mm, t_w8(4), ("cuda",)),
        C("fp8_weight_only_mm e4m3", "fp8", "lowbit", "float32", "float", "float", lb_weight_only(torch.float32), t_w8(4)),
        C("fp8_weight_only_mm e4m3", "fp8", "lowbit", "bfloat16", "float", "float", lb_weight_only(torch.bfloat16),
          t_w8(2)),
        C("fp8 w8a8 (quantize+scaled_mm)", "fp8", "lowbit", "float32", "float", "float", lb_scaled, t_w8(4)),
    ]


# ---- sparse24
def _sparse24_weight(inp: Inputs, values_dtype: torch.dtype):
    from lowbit.formats import sparse24 as fmt
    from lowbit.quant.nm_prune import nm_prune_mask
    mask = inp.get("s24mask", lambda: nm_prune_mask(inp.w, 2, 4))
    return inp.get(f"s24{values_dtype}", lambda: fmt.from_dense(inp.w, mask, values_dtype))


def _sparse24_candidates() -> list[Candidate]:
    """2:4 sparse (half the weights pruned by magnitude, compressed). Their rel_err against the
    dense F.linear includes the pruning itself (~0.5 on Gaussian weights): these rows measure
    speed, tests/test_sparse24.py measures correctness against the pruned weight."""
    t_f32 = lambda s: gemm_traffic(s, weight_bits=32, act_bytes=4, out_bytes=4)  # noqa: E731
    t_bf16 = lambda s: gemm_traffic(s, weight_bits=16, act_bytes=2, out_bytes=2)  # noqa: E731
    # kept values: half the weights at `bits`, plus 1 bit of metadata per weight
    t_s24 = lambda bits, act_bytes, scale_bytes=0: (lambda s: gemm_traffic(  # noqa: E731
        s, weight_bits=bits / 2 + 1, act_bytes=act_bytes, out_bytes=act_bytes if act_bytes > 1 else 4,
        scale_bytes=scale_bytes))

    def lb_float(values_dtype):
        def build(inp):
            W = _sparse24_weight(inp, values_dtype)
            x = inp.x if values_dtype == torch.float32 else _bf16(inp, "x16", lambda: inp.x)
            return lambda: _lowbit_ops().sparse24_mm(x, W.values, W.meta)
        return build

    def lb_int8(inp):
        W = _sparse24_weight(inp, torch.int8)
        ops = _lowbit_ops()

        def run():
            q, s = ops.int8_quantize_dynamic(inp.x, True)
            return ops.sparse24_int8_scaled_mm(q, W.values, W.meta, s, W.scale)
        return run

    def torch_semi_structured(inp):
        from lowbit.formats import sparse24 as fmt
        ok, why = fmt.semi_structured_available()
        _need(ok and inp.device.type == "cuda", why or "to_sparse_semi_structured needs a CUDA GPU")
        dense = _sparse24_weight(inp, torch.bfloat16)
        w = inp.get("s24torch", lambda: torch.sparse.to_sparse_semi_structured(
            fmt.dense_weight(dense, torch.bfloat16)))
        x = _bf16(inp, "x16", lambda: inp.x)
        return lambda: F.linear(x, w)

    C = Candidate
    return [
        C("fp32 F.linear", "sparse24", "baseline", "float32", "float", "float", fp32_linear, t_f32, ("cpu",)),
        C("bf16 F.linear", "sparse24", "baseline", "bfloat16", "float", "float", bf16_linear, t_bf16),
        C("torch to_sparse_semi_structured", "sparse24", "baseline", "bfloat16", "float", "float",
          torch_semi_structured, t_s24(16, 2), ("cuda",)),
        C("sparse24_mm fp32 values", "sparse24", "lowbit", "float32", "float", "float", lb_float(torch.float32),
          t_s24(32, 4)),
        C("sparse24_mm bf16 values", "sparse24", "lowbit", "bfloat16", "float", "float", lb_float(torch.bfloat16),
          t_s24(16, 2)),
        C("sparse24_int8_scaled_mm (W8A8)", "sparse24", "lowbit", "float32", "int8", "float", lb_int8,
          t_s24(8, 4, 4)),
    ]


# ---- codebook
def _codebook_weight(inp: Inputs, d: int, bits: int, C: int = 1):
    """A codebook-coded inp.w for kernel timing: codebooks sampled from w's own sub-vectors (then
    from the residuals), codes by greedy nearest entry. Cheap and deterministic; learned codebooks
    (lowbit.quant.codebook) are more accurate but cost minutes at these sizes, and the kernels'
    speed does not depend on the values."""
    from lowbit.formats import codebook as fmt

    def build():
        g = torch.Generator().manual_seed(0)
        w = inp.w.detach().to("cpu", torch.float32)
        N, K = w.shape
        v = w.reshape(-1, d)
        residual, books, codes = v.clone(), [], []
        for _ in range(C):
            book = residual[torch.randint(0, v.shape[0], (2**bits,), generator=g)].clone()
            code = torch.cat([torch.cdist(chunk, book).argmin(1) for chunk in residual.split(1 << 16)])
            residual -= book[code]
            books.append(book)
            codes.append(code)
        codebooks = torch.stack(books).reshape(1, 1, C, 2**bits, d)
        packed = fmt.from_codes(torch.stack(codes, 1).reshape(N, K // d, C), codebooks, codebook_dtype=torch.float16)
        return fmt.CodebookWeight(packed.packed.to(inp.device), packed.codebooks.to(inp.device), None, None, K)

    return inp.get(f"cb{d}x{bits}x{C}", build)


def _codebook_candidates() -> list[Candidate]:
    """Codebook weights (scalar 4/3-bit, PQ 2 bits/weight, AQ 2x8) against float F.linear."""
    t_f32 = lambda s: gemm_traffic(s, weight_bits=32, act_bytes=4, out_bytes=4)  # noqa: E731
    t_cb = lambda bpw, act_bytes: (lambda s: gemm_traffic(  # noqa: E731
        s, weight_bits=bpw, act_bytes=act_bytes, out_bytes=act_bytes))

    def lb(d, bits, C, dtype):
        def build(inp):
            ops = _lowbit_ops()
            cw = _codebook_weight(inp, d, bits, C)
            x = inp.x if dtype == torch.float32 else _bf16(inp, "x16", lambda: inp.x)
            return lambda: ops.codebook_mm(x, cw.packed, cw.codebooks, None)
        return build

    C = Candidate
    out = [
        C("fp32 F.linear", "codebook", "baseline", "float32", "float", "float", fp32_linear, t_f32, ("cpu",)),
        C("bf16 F.linear", "codebook", "baseline", "bfloat16", "float", "float", bf16_linear,
          lambda s: gemm_traffic(s, weight_bits=16, act_bytes=2, out_bytes=2)),
    ]
    for name, d, bits, nc in (("kmeans4", 1, 4, 1), ("kmeans3", 1, 3, 1), ("pq2 d4x8", 4, 8, 1),
                              ("aq2 d8 2x8", 8, 8, 2)):
        bpw = bits * nc / d
        out.append(C(f"codebook_mm {name}", "codebook", "lowbit", "float32", "float", "float",
                     lb(d, bits, nc, torch.float32), t_cb(bpw, 4)))
        out.append(C(f"codebook_mm {name}", "codebook", "lowbit", "bfloat16", "float", "float",
                     lb(d, bits, nc, torch.bfloat16), t_cb(bpw, 2)))
    return out


FAMILIES: dict[str, Callable[[], list[Candidate]]] = {
    "int8": _int8_candidates,
    "int4": _int4_candidates,
    "fp8": _fp8_candidates,
    "sparse24": _sparse24_candidates,
}
# ---- codebook
FAMILIES["codebook"] = _codebook_candidates


# ---- binary
def _binary_packed(inp: Inputs, which: str):
    ops = _lowbit_ops()
    return inp.get(f"bin_{which}", lambda: ops.binary_quantize(inp.x if which == "x" else inp.w))


def _binary_ref(inp: Inputs) -> torch.Tensor:
    """The exact ±1 dot products of sign(x) and sign(w) (float64 holds them exactly)."""
    sx = torch.where(inp.x < 0, -1.0, 1.0).double()
    sw = torch.where(inp.w < 0, -1.0, 1.0).double()
    return inp.get("bin_ref", lambda: sx @ sw.T)


def _binary_candidates() -> list[Candidate]:
    """±1 weights and activations packed 32 per int32 word: XNOR-popcount GEMMs against fp32."""
    t_f32 = lambda s: gemm_traffic(s, weight_bits=32, act_bytes=4, out_bytes=4)  # noqa: E731

    def t_packed(s: Shape, act_float: bool = False) -> Traffic:
        words = math.ceil(s.k / 32) * 4
        return Traffic(weight=s.n * words + 4 * s.n, activation=s.m * (4 * s.k if act_float else words),
                       output=s.m * s.n * 4)

    def torch_mm(inp):
        x, wt = inp.x, inp.w.T.contiguous().T  # same layout as F.linear reads
        return lambda: torch.mm(x, wt.T)

    def lb_binary_mm(inp):
        ops = _lowbit_ops()
        (px, _), (pw, _) = _binary_packed(inp, "x"), _binary_packed(inp, "w")
        K = inp.shape.k
        return lambda: ops.binary_mm(px, pw, K)

    def lb_scaled(inp):
        ops = _lowbit_ops()
        (px, sx), (pw, sw) = _binary_packed(inp, "x"), _binary_packed(inp, "w")
        K = inp.shape.k
        return lambda: ops.binary_scaled_mm(px, pw, K, sx, sw)

    def lb_xnor(inp):
        ops = _lowbit_ops()
        pw, sw = _binary_packed(inp, "w")
        x, K = inp.x, inp.shape.k

        def run():
            px, sx = ops.binary_quantize(x)
            return ops.binary_scaled_mm(px, pw, K, sx, sw)
        return run

    C = Candidate
    # compute "binary": no roofline peak is measured for popcount, so no roofline column.
    return [
        C("fp32 F.linear", "binary", "baseline", "float32", "float", "float", fp32_linear, t_f32, ("cpu",)),
        C("fp32 torch.mm", "binary", "baseline", "float32", "float", "float", torch_mm, t_f32, ("cpu",)),
        C("bf16 F.linear", "binary", "baseline", "bfloat16", "float", "float", bf16_linear,
          lambda s: gemm_traffic(s, weight_bits=16, act_bytes=2, out_bytes=2), ("cuda",)),
        C("binary_mm (prepacked)", "binary", "lowbit", "packed", "binary", "binary", lb_binary_mm, t_packed),
        C("binary_scaled_mm (prepacked)", "binary", "lowbit", "packed", "binary", "float", lb_scaled, t_packed),
        C("binary xnor (quantize+scaled_mm)", "binary", "lowbit", "float32", "binary", "float", lb_xnor,
          lambda s: t_packed(s, act_float=True)),
    ]


FAMILIES["binary"] = _binary_candidates


def candidates(families: Sequence[str], device: torch.device, peers: bool = False) -> list[Candidate]:
    """The families' candidates for `device`; with `peers`, also the installed peer libraries'
    layers as baselines (lowbit.bench_peers)."""
    out = []
    for fam in families:
        fam_cands = FAMILIES[fam]()
        if peers:
            from . import bench_peers
            fam_cands += bench_peers.peer_candidates(fam)
        out += [c for c in fam_cands if device.type in c.devices]
    return out


def candidate_id(c: Candidate) -> str:
    return f"{c.role}:{c.name}[{c.act}]"


def control_name(device: torch.device) -> str:
    """The plain-float row every other row is also compared to."""
    return "fp32 F.linear" if device.type == "cpu" else "bf16 F.linear"


# --------------------------------------------------------------------------- measurement


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    d = (y.double() - ref).norm()
    r = ref.norm()
    return float(d / r) if r > 0 else float(d)


def measure_roofline(device: torch.device, quick: bool = False) -> Roofline:
    """Bandwidth from reading a tensor far larger than the caches; peaks from large GEMMs
    (the best the machine's own libraries reach, which is what a kernel can be held to)."""
    timer = timer_for(device, cold=False)  # peaks: the libraries' best, caches warm
    reps = 3 if quick else 5

    def best_of(fn):
        fn()
        timer.sync()
        return min(timer(fn, 1) for _ in range(reps))

    with torch.inference_mode():
        if device.type == "cpu":
            big = torch.ones((32 if quick else 64) * 2**20, dtype=torch.float32)  # 128/256 MiB
            t = best_of(lambda: big.sum())
            bw = big.numel() * 4 / t / 1e9
            how = {"bandwidth": f"sum over {big.numel() * 4 >> 20} MiB fp32 (read)"}
            del big
        else:
            big = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
            dst = torch.empty_like(big)
            t = best_of(lambda: dst.copy_(big))
            bw = 2 * big.numel() / t / 1e9
            how = {"bandwidth": "device copy of 256 MiB (read + write)"}
            del big, dst
        peaks = {}
        if device.type == "cpu":
            m, n, k = (256, 1024, 1024) if quick else (512, 2048, 2048)
            a, b = torch.randn(m, k), torch.randn(n, k)
            t = best_of(lambda: F.linear(a, b))
            peaks["float"] = 2 * m * n * k / t / 1e9
            how["float"] = f"fp32 F.linear {m}x{n}x{k}"
            try:
                inp = Inputs(Shape(m, n, k), device, a, b)
                fn = _quantize_dynamic_linear(inp)
                t = best_of(fn)
                peaks["int8"] = 2 * m * n * k / t / 1e9
                how["int8"] = f"quantize_dynamic qint8 Linear {m}x{n}x{k} (fbgemm/onednn)"
            except Exception as e:  # noqa: BLE001 - fall back to the float peak, and say so
                peaks["int8"] = peaks["float"]
                how["int8"] = f"= float peak (int8 GEMM unavailable: {e})"
        else:
            s = 8192 if not quick else 4096
            a = torch.randn(s, s, device=device, dtype=torch.bfloat16)
            t = best_of(lambda: a @ a)
            peaks["float"] = 2 * s**3 / t / 1e9
            how["float"] = f"bf16 mm {s}^3"
            ai = torch.randint(-127, 127, (s, s), device=device, dtype=torch.int8)
            try:
                t = best_of(lambda: torch._int_mm(ai, ai))
                peaks["int8"] = 2 * s**3 / t / 1e9
                how["int8"] = f"torch._int_mm {s}^3"
            except Exception as e:  # noqa: BLE001
                peaks["int8"] = peaks["float"]
                how["int8"] = f"= float peak (torch._int_mm failed: {e})"
    return Roofline(bandwidth_gbs=bw, peak_gops=peaks, how=how)


@dataclass
class Row:
    family: str
    impl: str
    role: str
    act: str
    m: int
    n: int
    k: int
    ms: float | None = None
    gops: float | None = None
    gbs: float | None = None
    roofline_pct: float | None = None
    vs_control: float | None = None
    vs_best: float | None = None
    rel_err: float | None = None
    samples: int = 0
    slow: bool = False
    error: str | None = None
    best_baseline: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(shape: Shape, cands: Sequence[Candidate], samples: dict[str, list], slow: dict[str, bool],
              errors: dict[str, str], rel_errs: dict[str, float], roof: Roofline | None,
              control: str) -> list[Row]:
    """Turn per-round samples into rows (pure: unit-tested with fake timings)."""
    ids = [candidate_id(c) for c in cands]
    # The strongest baseline per family: a row's "vs best" must not depend on which other
    # families shared the run (an int4 row once read against quantize_dynamic's int8 layer).
    best_of = {fam: strongest(samples, [candidate_id(c) for c in cands if c.role == "baseline" and c.family == fam])
               for fam in dict.fromkeys(c.family for c in cands)}
    ctrl = next((candidate_id(c) for c in cands if c.role == "baseline" and c.name == control), None)
    rows = []
    for c, cid in zip(cands, ids):
        best = best_of[c.family]
        row = Row(c.family, c.name, c.role, c.act, shape.m, shape.n, shape.k,
                  error=errors.get(cid), best_baseline=best)
        t = median_time(samples.get(cid, []))
        if t is not None:
            nbytes = c.traffic(shape).total
            row.ms = t * 1e3
            row.gops = shape.flops / t / 1e9
            row.gbs = nbytes / t / 1e9
            row.roofline_pct = (roof.percent(c.compute, shape.flops, nbytes, t)
                                if roof and c.compute in roof.peak_gops else None)
            row.samples = sum(s is not None for s in samples[cid])
            row.slow = slow.get(cid, False)
            if best is not None:
                row.vs_best = paired_ratio(samples[best], samples[cid])
            if ctrl is not None and ctrl in samples:
                row.vs_control = paired_ratio(samples[ctrl], samples[cid])
        row.rel_err = rel_errs.get(cid)
        rows.append(row)
    return rows


def with_roofline(rows: Sequence[Row], roof: Roofline, computes: dict[str, str]) -> None:
    """Recompute rows' %roof against `roof` (e.g. the best of the start and end measurements);
    `computes` maps candidate_id_row(row) to the row's compute class."""
    for r in rows:
        compute = computes.get(candidate_id_row(r))
        if r.gops is None or r.gbs is None or compute not in roof.peak_gops:
            continue
        flops = Shape(r.m, r.n, r.k).flops
        nbytes = flops / r.gops * r.gbs  # the run's own traffic count, recovered from the row
        r.roofline_pct = roof.percent(compute, flops, nbytes, flops / r.gops / 1e9)


def run_shape(shape: Shape, cands: Sequence[Candidate], device: torch.device, plan: TimingPlan,
              roof: Roofline | None) -> list[Row]:
    inp = make_inputs(shape, device)
    fns, errors, rel_errs = {}, {}, {}
    with torch.inference_mode():
        for c in cands:
            cid = candidate_id(c)
            try:
                fn = c.build(inp)
                y = fn()
                if isinstance(y, tuple):
                    y = y[0]
                ref = inp.acc_ref() if c.check == "int" else _binary_ref(inp) if c.check == "binary" else inp.y_ref()
                rel_errs[cid] = rel_err(y, ref)
                fns[cid] = fn
            except Exception as e:  # noqa: BLE001 - a failing candidate becomes a row saying why
                errors[cid] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
        inp.cache.pop("y_ref", None)
        inp.cache.pop("acc_ref", None)
        inp.cache.pop("bin_ref", None)
        samples, slow = time_interleaved(fns, timer_for(device, plan.cold), plan)
    return summarize(shape, cands, samples, slow, errors, rel_errs, roof, control_name(device))


# --------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def lowbit_cpu_isa(flags: set[str] | frozenset[str] | None = None) -> str:
    """The tier lowbit's C++ kernels run at here: the same decision as cpu::has_avx2() in
    csrc/include/lowbit/cpu/isa.h. Said beside torch's own capability because torch's CPU kernels
    use AVX-512 where the CPU has it and lowbit's mostly do not, which moves every speed ratio
    there; also which products lowbit hands to torch's GEMMs on such CPUs."""
    flags = cpu_flags() if flags is None else flags
    if os.environ.get("LOWBIT_CPU_ISA") == "scalar":
        return "portable (LOWBIT_CPU_ISA=scalar)"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "portable"
    if not flags:
        return "unknown (CPU flags unreadable)"
    if all(f in flags for f in ("avx2", "fma", "f16c")):
        # cpu::has_avx512f() / has_amx_bf16() and decoded_gemm_route() in csrc/include/lowbit/cpu/,
        # kSmallMAvx512 in csrc/cpu/int4.cpp, use_int8_dense() in csrc/cpu/sparse24.cpp
        avx512 = "avx512f" in flags and os.environ.get("LOWBIT_CPU_ISA") != "avx2"
        decoded = os.environ.get("LOWBIT_DECODED_GEMM", "")[:1] != "0"
        amx_bf16 = decoded and "amx_bf16" in flags
        onednn_int8 = "amx_int8" in flags and os.environ.get("LOWBIT_INT8_ONEDNN", "")[:1] != "0"
        notes = []
        if "avx512f" in flags and not avx512:
            notes.append("AVX-512 present, hidden by LOWBIT_CPU_ISA=avx2")
        elif avx512:
            notes.append("AVX-512 for the int4 and fp8 small-M kernels" + (" and bf16 panels" if amx_bf16 else "")
                         + (", binary vpopcntq" if "avx512_vpopcntdq" in flags
                            and os.environ.get("LOWBIT_BINARY_LOOP") is None else ""))
        # cpu::amx_bf16_ready() and use_amx_bf16() in csrc/include/lowbit/cpu/amx.h, with the
        # families' thresholds (kAmxMinM/kAmxMaxM in int4.cpp, codebook.cpp and sparse24.cpp,
        # kWoAmxMinM in int8.cpp, kFp8AmxMinM in fp8.cpp)
        amx_ready = avx512 and {"amx_bf16", "amx_tile", "avx512bw", "avx512_bf16", "avx512_vbmi2"} <= flags
        forced_route = os.environ.get("LOWBIT_DECODED_GEMM", "")[:1] == "1"
        int4_amx_env = os.environ.get("LOWBIT_INT4_AMX", "")[:1]
        int8_amx_env = os.environ.get("LOWBIT_INT8_WO_AMX", "")[:1]
        fp8_amx_env = os.environ.get("LOWBIT_FP8_AMX", "")[:1]
        cb_amx_env = os.environ.get("LOWBIT_CODEBOOK_AMX", "")[:1]
        s24_amx_env = os.environ.get("LOWBIT_SPARSE24_AMX", "")[:1]
        cb_amx = amx_ready and cb_amx_env != "0" and (cb_amx_env == "1" or not forced_route)
        s24_amx = amx_ready and s24_amx_env != "0" and (s24_amx_env == "1" or not forced_route)
        int4_amx = amx_ready and int4_amx_env != "0" and (int4_amx_env == "1" or not forced_route)
        int8_amx = amx_ready and int8_amx_env != "0" and (int8_amx_env == "1" or not forced_route)
        fp8_amx = amx_ready and fp8_amx_env != "0" and (fp8_amx_env == "1" or not forced_route)
        amx_kernels = [f"{name} {'at every M' if env == '1' else rows}" for on, env, name, rows in (
            (int4_amx, int4_amx_env, "int4 bf16", "M = 5-256"),
            (int8_amx, int8_amx_env, "int8 weight-only bf16", "from M = 5"),
            (fp8_amx, fp8_amx_env, "fp8 (bf16 weight-only, W8A8; vector scales)", "from M = 2"),
            (cb_amx, cb_amx_env, "codebook bf16", "M = 10-96 (kmeans4-like: 2-256)"),
            (s24_amx, s24_amx_env, "sparse24 bf16 x (bf16/int8 values)", "M = 3-223" if decoded else "from M = 3")) if on]
        if amx_kernels:
            notes.append(" and ".join(amx_kernels) + " on lowbit's AMX kernels")
        if amx_bf16:
            from_m = [] if int4_amx_env == "1" else [f"int4 bf16 from M = {257 if int4_amx else 33}"]
            from_m += [] if cb_amx_env == "1" else [f"codebook bf16 from M = {97 if cb_amx else 24}"]
            from_m += [] if s24_amx_env == "1" or not amx_ready else ["sparse24 bf16 x from M = 224"]
            if from_m:
                notes.append(", ".join(from_m) + " on torch's AMX bf16 GEMM")
        if decoded and avx512:
            notes.append("int4/codebook fp32/fp16 and int8 weight-only" + (" fp32/fp16" if int8_amx else "")
                         + " from M = 96 on torch's AVX-512 GEMM")
        if onednn_int8:
            notes.append("W8A8 from M = 10, sparse24 W8A8 from M = 20 on torch's AMX int8 GEMM")
        return "AVX2+FMA+F16C" + (f" ({'; '.join(notes)})" if notes else "")
    return "portable (no AVX2/FMA/F16C)"


def device_meta(device: torch.device) -> dict:
    meta = {
        "device": device.type,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lowbit_isa": lowbit_cpu_isa(),
        "date": datetime.date.today().isoformat(),
        # Other processes share the CPU: a load above the core count means every number of the
        # run is suspect, so the result file says what the load was.
        "load_start": _loadavg(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        meta["gpu"] = p.name
        meta["capability"] = f"sm_{p.major}{p.minor}"
    return meta


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def device_slug(meta: dict) -> str:
    """File-name stem for a results file: <device>_<date>, e.g. cpu-amd-epyc-2c_2026-11-23."""
    if meta["device"] == "cuda":
        name = meta.get("gpu", "cuda")
    else:
        name = f"cpu-{meta['cpu']}-{meta['cores']}c"
    name = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{name}_{meta['date']}"


COLUMNS = ("op", "impl", "act", "M", "N", "K", "ms", "GOP/s", "GB/s", "%roof", "vs ctrl", "vs best", "rel.err", "note")


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def row_cells(r: Row) -> list[str]:
    note = r.error or ""
    if r.slow:
        note = (note + " " if note else "") + f"slow: {r.samples} samples"
    if r.role == "lowbit":
        impl = f"lowbit {r.impl}"
    else:
        impl = r.impl + (" *" if r.best_baseline and candidate_id_row(r) == r.best_baseline else "")
    return [r.family, impl, r.act, str(r.m), str(r.n), str(r.k), _fmt(r.ms, ".3f"), _fmt(r.gops, ".1f"),
            _fmt(r.gbs, ".1f"), _fmt(r.roofline_pct, ".0f"),
            _fmt(r.vs_control, ".2f") + ("x" if r.vs_control is not None else ""),
            _fmt(r.vs_best, ".2f") + ("x" if r.vs_best is not None else ""),
            _fmt(r.rel_err, ".2g"), note]


def candidate_id_row(r: Row) -> str:
    return f"{r.role}:{r.impl}[{r.act}]"


def format_table(rows: Sequence[Row]) -> str:
    cells = [list(COLUMNS)] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    right = {"M", "N", "K", "ms", "GOP/s", "GB/s", "%roof", "vs ctrl", "vs best", "rel.err"}
    lines = []
    for j, c in enumerate(cells):
        parts = [c[i].rjust(widths[i]) if COLUMNS[i] in right else c[i].ljust(widths[i]) for i in range(len(c))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row], meta: dict, roof: Roofline | None, control: str) -> str:
    dev = meta.get("gpu") or f"{meta['cpu']}, {meta['cores']} cores ({meta['threads']} threads)"
    out = [f"# lowbit bench: {dev}", "",
           f"- device: {meta['device']}{' ' + meta['capability'] if 'capability' in meta else ''}; "
           f"CPU {meta['cpu']}, {meta['cores']} cores, lowbit kernels {meta.get('lowbit_isa', '?')}; "
           f"torch {meta['torch']}; lowbit {meta.get('lowbit', '?')}; "
           f"{meta['date']}; 1-min load average {meta.get('load_start')} at start, {meta.get('load_end')} at end "
           f"({meta['cores']} cores: a higher load means other processes took CPU time from this run)",
           f"- caches: {meta.get('cache', 'warm: calls back to back')}"]
    if "peers" in meta:
        out.append(f"- peer libraries (baselines beside torch's): {meta['peers']}")
    if roof:
        out.append(f"- roofline: bandwidth {roof.bandwidth_gbs:.1f} GB/s ({roof.how.get('bandwidth')}); peaks "
                   + ", ".join(f"{k} {v:.0f} GOP/s ({roof.how.get(k)})" for k, v in roof.peak_gops.items()))
    out += [f"- vs ctrl = speed over {control}; vs best = speed over the fastest baseline of the same family and shape "
            "(marked *); both are medians of per-round ratios, all candidates timed in interleaved rounds",
            "- rel.err: against fp32 F.linear with the float weight (float outputs) or the exact integer "
            "product (raw int8 ops)", ""]
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |")
    return "\n".join(out) + "\n"


# ---- int4 cutlass_sm90 (GPU only; the CUTLASS kernel is unverified, so it is forced here)
def _int4_sm90_candidates() -> list[Candidate]:
    """W4A16 g128 on the cutlass_sm90 layout (CUTLASS's sm_90 mixed-input GEMM), forced to the
    CUDA C++ backend, and the same op's Triton kernel (its default on CUDA), beside bf16 F.linear
    on the same weights."""
    t_bf16 = lambda s: gemm_traffic(s, weight_bits=16, act_bytes=2, out_bytes=2)  # noqa: E731
    # scale + zero' per group of 128 as 2 x 2 bytes
    t_w4 = lambda s: gemm_traffic(s, weight_bits=4 + 8 * 4 / 128, act_bytes=2, out_bytes=2)  # noqa: E731

    def lb_sm90(inp, backend="cuda"):
        import lowbit.backends as lb_backends
        from lowbit.formats import int4 as fmt
        _need(inp.shape.k % fmt.CUTLASS_SM90_K_ALIGN == 0 and inp.shape.n % fmt.CUTLASS_SM90_N_ALIGN == 0,
              "needs K % 32 == 0 and N % 8 == 0")
        ops = _lowbit_ops()
        w4 = _int4_weight(inp)
        packed, scale, zero = fmt.to_cutlass_sm90(w4.packed, w4.scale, w4.zero, 128, inp.shape.k, torch.bfloat16)
        x = _bf16(inp, "x16", lambda: inp.x)

        def run():
            with lb_backends.use(backend):
                return ops.int4_cutlass_sm90_mm(x, packed, scale, zero, 128)
        return run

    C = Candidate
    return [
        C("bf16 F.linear", "int4-cutlass-sm90", "baseline", "bfloat16", "float", "float", bf16_linear, t_bf16,
          ("cuda",)),
        C("int4_cutlass_sm90_mm g128 (unverified)", "int4-cutlass-sm90", "lowbit", "bfloat16", "float", "float",
          lb_sm90, t_w4, ("cuda",)),
        C("int4_cutlass_sm90_mm g128 Triton", "int4-cutlass-sm90", "lowbit", "bfloat16", "float", "float",
          lambda inp: lb_sm90(inp, "triton"), t_w4, ("cuda",)),
    ]


FAMILIES["int4-cutlass-sm90"] = _int4_sm90_candidates
