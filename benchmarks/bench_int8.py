"""INT8 GEMMs under pytest-benchmark: every lowbit candidate and torch baseline of the int8
family (lowbit/bench.py) over shapes x M.

    pytest benchmarks --benchmark-only                     # QUICK_SHAPES x QUICK_M
    LOWBIT_BENCH_FULL=1 pytest benchmarks --benchmark-only # Llama-7B shapes x all M
    pytest benchmarks --benchmark-only --benchmark-json out.json

pytest-benchmark times each test separately; the interleaved, same-run ratios against the
strongest baseline come from `lowbit bench`, which is the number to report.
"""

import functools
import os

import pytest
import torch

from lowbit import bench
from shapes import LLAMA_7B, M_CPU, M_CUDA, QUICK_M, QUICK_SHAPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("LOWBIT_BENCH_FULL") == "1"
SHAPES = LLAMA_7B if FULL else QUICK_SHAPES
MS = (M_CUDA if DEVICE.type == "cuda" else M_CPU) if FULL else QUICK_M
CANDIDATES = bench.candidates(["int8"], DEVICE)
# pytest-benchmark's own calibration would run a 1 s call dozens of times: cap each test.
BUDGET_S = 2.0


@functools.lru_cache(maxsize=2)
def _inputs(m, n, k):
    # Shared by every candidate of a shape: building 4096x11008 inputs costs more than most calls.
    return bench.make_inputs(bench.Shape(m, n, k), DEVICE)


@pytest.mark.parametrize("nk", SHAPES, ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("m", MS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("cand", CANDIDATES, ids=lambda c: f"{c.role}-{c.name}-{c.act}".replace(" ", "_"))
def test_int8(benchmark, cand, m, nk):
    shape = bench.Shape(m, *nk)
    inp = _inputs(m, *nk)
    timer = bench.timer_for(DEVICE)
    with torch.inference_mode():
        try:
            fn = cand.build(inp)
        except Exception as e:  # noqa: BLE001 - e.g. a torch baseline this torch lacks
            pytest.skip(f"{cand.name} unavailable: {type(e).__name__}: {e}")
        t_call = timer(fn, 1)  # first call: warm-up and a time estimate in one
        rounds = max(3, min(50, int(BUDGET_S / max(t_call, 1e-6))))

        def run():
            fn()
            timer.sync()  # on CUDA, time the kernel, not the launch

        benchmark.pedantic(run, setup=timer.evict, rounds=rounds, iterations=1, warmup_rounds=1)  # cold, as lowbit bench
    nbytes = cand.traffic(shape).total
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        family=cand.family, impl=cand.name, role=cand.role, act=cand.act, m=m, n=nk[0], k=nk[1],
        gops=shape.flops / median / 1e9, gbs=nbytes / median / 1e9, bytes=nbytes, device=DEVICE.type)
