"""Problem sizes for the GEMM benchmarks: weights as (N, K) = (out_features, in_features).

The Llama-7B projections (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008) are the
sizes the CPU anchors (/work/shared/CPU-ANCHORS.md) and most published int8/int4 kernels
report, so numbers stay comparable. M = tokens per call: 1 (decode), 16 (small batch or
speculative decode), 256 (prefill chunk); GPUs add 4096 (large prefill, compute-bound).
"""

LLAMA_7B = ((4096, 4096), (11008, 4096), (4096, 11008))
M_CPU = (1, 16, 256)
M_CUDA = (1, 16, 256, 4096)

# What `pytest benchmarks --benchmark-only` runs by default: one shape, the memory-bound M
# values, a few minutes on 2 CPU cores. LOWBIT_BENCH_FULL=1 selects the full grid.
QUICK_SHAPES = ((4096, 4096),)
QUICK_M = (1, 16)
