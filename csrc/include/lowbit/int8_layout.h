// Index maps of the INT8 CUDA kernels (csrc/cuda/int8.cu), as plain __host__ __device__ functions.
//
// The INT8 family has no packed format: weights are nn.Linear's row-major [N, K] int8 and the
// GEMM main loops for aligned shapes are CUTLASS's. What is ours is how the hand-written
// kernels split a tile among threads. A wrong map drops or double-counts a K slice, which
// no compile check sees; kept here, the maps compile without CUDA and
// tests/test_cuda_build.py checks on the CPU that each covers its tile exactly once.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit {
namespace int8_layout {

// Where one thread's contiguous run of `kRun` elements lies in a [rows, cols] tile that
// `kThreads` threads load together in a single pass (rows * cols == kThreads * kRun).
// Consecutive threads take consecutive runs of one row, so a warp reads whole row segments
// (coalesced), and a run starting at a multiple of kRun stays inside one 16-byte vector.
struct TileRun {
  int row;
  int col;
};

template <int kCols, int kRun>
LOWBIT_HD TileRun tile_run(int thread) {
  static_assert(kCols % kRun == 0, "a run must not straddle two rows");
  constexpr int kRunsPerRow = kCols / kRun;
  return TileRun{thread / kRunsPerRow, (thread % kRunsPerRow) * kRun};
}

// ---------------------------------------------------------------------------- SIMT int8 GEMM
// Fallback for shapes CUTLASS's 16-byte-aligned iterators cannot take (K % 16 or N % 4 != 0).
// A 64x64 output tile, 256 threads in a 16x16 grid, each owning a 4x4 sub-tile. Thread (ty, tx)
// owns rows ty + 16 * i and columns tx + 16 * j: interleaved, so that the 16 threads of a
// half-warp read 16 different B words from shared memory (no bank conflict) while sharing
// the A word (broadcast).
namespace simt {
constexpr int kBM = 64, kBN = 64, kBK = 32;  // kBK in bytes (int8 elements)
constexpr int kThreads = 256;
constexpr int kRun = 8;                       // bytes per thread per tile load: 64 * 32 / 256
constexpr int kWords = kBK / 4;               // dp4a consumes 4 int8 per 32-bit word

LOWBIT_HD TileRun load_map(int thread) { return tile_run<kBK, kRun>(thread); }
LOWBIT_HD int out_row(int thread, int i) { return thread / 16 + 16 * i; }
LOWBIT_HD int out_col(int thread, int j) { return thread % 16 + 16 * j; }
}  // namespace simt

// ---------------------------------------------------------------------------- weight-only, small M
// One warp per output column n streams the weight row w[n, :] once for up to kMaxRows rows
// of x. With vector loads lane l reads the 16 weights [16 * (32 * step + l), +16): a warp
// reads 512 contiguous bytes per step.
namespace gemv {
constexpr int kWarpsPerBlock = 8;
constexpr int kVec = 16;       // int8 weights per 128-bit load
constexpr int kMaxRows = 8;    // rows of x that share one pass over the weights

LOWBIT_HD int64_t vec_k(int64_t step, int lane) { return (step * 32 + lane) * kVec; }
}  // namespace gemv

// ---------------------------------------------------------------------------- weight-only, tiled
// 64x64 output tile, K step 32. Both operand tiles are [64 rows, 32 k]: x rows (m) and weight
// rows (n). 128 threads; each loads a run of 16 k-values of one row of each tile (16 int8 =
// one 128-bit load of the weight; 16 f16/bf16 = two of x). For float x the tile is [64, 16]
// with 256 threads and runs of 4.
namespace tiled {
constexpr int kBM = 64, kBN = 64;
// tensor-core (f16/bf16) variant
constexpr int kBK = 32;
constexpr int kThreads = 128;
constexpr int kRun = 16;
LOWBIT_HD TileRun load_map(int thread) { return tile_run<kBK, kRun>(thread); }
// SIMT fp32 variant
constexpr int kBK32 = 16;
constexpr int kThreads32 = 256;
constexpr int kRun32 = 4;
LOWBIT_HD TileRun load_map32(int thread) { return tile_run<kBK32, kRun32>(thread); }
LOWBIT_HD int out_row32(int thread, int i) { return thread / 16 + 16 * i; }
LOWBIT_HD int out_col32(int thread, int j) { return thread % 16 + 16 * j; }
}  // namespace tiled

}  // namespace int8_layout
}  // namespace lowbit
