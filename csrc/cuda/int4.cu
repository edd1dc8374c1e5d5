// INT4 family, CUDA kernels for `_cuda_int4_weight_only_mm` (W4A16: group-wise int4 weights,
// format lowbit/formats/int4.py, spec lowbit/backends/reference/int4.py).
//
// Which kernel serves a call:
//   M <= 8            int4_wo_gemv_kernel: decode is memory-bound, so every packed weight byte
//                     is read once (one 128-bit load per lane) for all rows of x, which are
//                     staged in shared memory as fp32. fp32 FMA for every x dtype.
//   M > 8, f16/bf16   int4_wo_mma_kernel: 64x64 tiles, x and the *packed* weights staged by
//                     cp.async (double-buffered), nibbles dequantized in registers straight into
//                     mma.sync m16n8k16 B fragments, fp32 accumulate.
//   M > 8, f32        int4_wo_simt_f32_kernel: fp32 FMA (f16/bf16/TF32 tensor cores would round x).
//
// Numerics, all kernels: d = float(u) - zero is computed in fp32 exactly as the reference does;
// the group's partial sum  sum_k x[k] * d[k]  is accumulated in fp32 and multiplied by the
// group's scale once (the reference multiplies every weight by it: same products up to one
// fp32 rounding each, different summation order; tests/test_int4_cuda.py bounds the difference).
// The tensor-core kernel feeds d to the MMA in x's 16-bit type. That is exact whenever d is: for
// every integer zero (what lowbit's quantizer stores, and the implicit 8 of symmetric weights),
// |d| <= 15 is a small integer. A fractional zero makes d one f16/bf16 rounding away from the
// reference's fp32 d; the tests state that bound separately.
//
// Lane and byte maps are in lowbit/int4_layout.h (tested on the CPU against the Python format).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "lowbit/checks.h"
#include "lowbit/cuda/common.cuh"
#include "lowbit/cuda/host.cuh"
#include "lowbit/cuda/int4_mma.cuh"
#include "lowbit/int4_layout.h"

namespace lowbit {
namespace cuda {
namespace {

namespace L = ::lowbit::int4_layout;
using namespace ::lowbit::cuda::int4_mma;

// ============================================================================ group parameters
// scale and zero share one dtype (checked at the op boundary). A runtime switch, uniform across
// the grid, instead of a template parameter: it costs a few instructions per group and saves
// 3x the kernel instantiations (compile time on 2-core CI).
enum class ParamKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct GroupParams {
  const void* scale;  // [N, groups]
  const void* zero;   // [N, groups] or nullptr (symmetric: zero 8)
  ParamKind kind;
  int64_t groups;
  int64_t bpg;  // packed blocks per group (L::blocks_per_group)
};

__device__ __forceinline__ float load_param(const void* p, ParamKind kind, int64_t i) {
  switch (kind) {
    case ParamKind::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case ParamKind::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ float scale_at(const GroupParams& gp, int64_t n, int64_t g) {
  return load_param(gp.scale, gp.kind, n * gp.groups + g);
}
__device__ __forceinline__ float zero_at(const GroupParams& gp, int64_t n, int64_t g) {
  return gp.zero != nullptr ? load_param(gp.zero, gp.kind, n * gp.groups + g) : float(L::kSymmetricZero);
}
__device__ __forceinline__ bool group_ends(const GroupParams& gp, int64_t b, int64_t nblocks) {
  return (b + 1) % gp.bpg == 0 || b + 1 == nblocks;
}

// The reference adds float(bias) to the fp32 product, then rounds to x's dtype.
template <typename T>
__device__ __forceinline__ T finish(float acc, const float* bias, int64_t n) {
  return Num<T>::from_f32(bias != nullptr ? __fadd_rn(acc, bias[n]) : acc);
}

// ============================================================================ M <= 8: GEMV
// 8 warps, 2 weight rows per warp: a block serves 16 outputs n for up to kRows rows of x.
// Per 1024-column chunk the block stages x once (shared by its 16 weight rows); lane l then
// takes packed block l of the chunk of each of its warp's weight rows.
template <typename T, int kRows>
__global__ void __launch_bounds__(L::gemv::kWarps * 32)
    int4_wo_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const GroupParams gp,
                        const float* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  using namespace L::gemv;
  static_assert(kRows <= kMaxRows, "x staging is sized for kMaxRows");
  constexpr int kThreads = kWarps * 32;
  __shared__ float xs[kRows * L::kBlock * kLd];

  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  const int rows = int(M - m0 < kRows ? M - m0 : kRows);
  const int64_t n_first = (int64_t(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  const int64_t nblocks = L::num_blocks(K), rb = L::row_bytes(K);

  float acc[kRowsPerWarp][kRows] = {};
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    // Zeros past K (and past M) meet the padding codes and the absent rows: they add nothing.
    for (int i = t; i < kRows * kChunk; i += kThreads) {
      const int r = i / kChunk, c = i % kChunk;
      const int64_t k = c0 + c;
      xs[L::gemv::x_index(r, c)] = (r < rows && k < K) ? Num<T>::to_f32(x[(m0 + r) * K + k]) : 0.f;
    }
    __syncthreads();
    const int64_t b = c0 / L::kBlock + lane;
    if (b < nblocks) {
      const int64_t g = L::group_of_block(b, gp.bpg);
#pragma unroll
      for (int p = 0; p < kRowsPerWarp; ++p) {
        const int64_t n = n_first + p;
        if (n < N) {
          const uint4 v = *reinterpret_cast<const uint4*>(w + n * rb + b * L::kBlockBytes);
          const float z = zero_at(gp, n, g);
          // The block's 32 weights first, then one row of x at a time: this bounds the live
          // registers to d[32] plus the accumulators (decoding per column and sweeping all rows
          // let ptxas hoist 32 x kRows shared loads and spill at kRows = 8).
          float d[L::kBlock];
#pragma unroll
          for (int wi = 0; wi < 4; ++wi) {
            const uint32_t word = wi == 0 ? v.x : wi == 1 ? v.y : wi == 2 ? v.z : v.w;
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int e = 0; e < 4; ++e)  // the reference's float(u) - zero, one fp32 rounding
                d[L::gemv::col_in_block(wi, e, h)] = L::code_byte_to_float(L::nibbles(word, h), e) - z;
          }
          // One block lies in one group (groups are whole blocks or all of K): scale once per block.
          const float s = scale_at(gp, n, g);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            float part = 0.f;
#pragma unroll
            for (int c = 0; c < L::kBlock; ++c) part = fmaf(xs[L::gemv::x_index(r, lane * L::kBlock + c)], d[c], part);
            acc[p][r] = fmaf(part, s, acc[p][r]);
          }
        }
      }
    }
    __syncthreads();  // before the next chunk overwrites xs
  }
#pragma unroll
  for (int p = 0; p < kRowsPerWarp; ++p) {
    const int64_t n = n_first + p;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = warp_sum(acc[p][r]);
      if (lane == 0 && n < N && r < rows) out[(m0 + r) * N + n] = finish<T>(sum, bias, n);
    }
  }
}

// ============================================================================ M > 8, f16/bf16
// Per K step (one packed block of 32 columns) and warp (32 x 32 outputs): two ldmatrix.x4 per
// k16 half for A, and for each of its four n8 tiles one 32-bit gather of packed bytes that
// yields the B fragments of both k16 halves (L::mma::b_pair_offset). Weights stay packed in
// shared memory (16 bytes per row per step, 1/4 of f16), so the cp.async stream is mostly x.
//
// Scales: each group's MMAs accumulate into `part`, folded into `acc` with the group's scale
// when the group ends. TODO(perf): pipelining beyond two stages, larger tiles / split-K for
// skinny M, and Marlin's offline weight reshuffle + lop3 dequant; this kernel dequantizes every
// B fragment in both warps of a column (2x redundant ALU work) and is correctness-first.
template <typename T, bool kVec>
__global__ void __launch_bounds__(L::tiled::kThreads)
    int4_wo_mma_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const GroupParams gp,
                       const float* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  using namespace L::tiled;
  __shared__ __align__(128) T xs[kStages][kBM][kXLd];
  __shared__ __align__(128) uint8_t ws[kStages][kBN][L::kBlockBytes];

  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t nblocks = L::num_blocks(K), rb = L::row_bytes(K);

  auto load_tile = [&](int stage, int64_t b) {
#pragma unroll
    for (int i = t; i < kXChunks; i += kThreads) {
      const Chunk c = x_chunk(i);
      const int64_t m = m0 + c.row, k = b * L::kBlock + c.col;
      T* dst = &xs[stage][c.row][c.col];
      if constexpr (kVec) {
        // K % 8 == 0: a chunk of 8 is entirely inside or outside [0, K).
        const bool ok = m < M && k < K;
        cp_async16(dst, ok ? x + m * K + k : x, ok);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = (m < M && k + e < K) ? x[m * K + k + e] : Num<T>::from_f32(0.f);
      }
    }
    if (t < kBN) {
      // Packed rows are whole 16-byte blocks and the base is 16-byte aligned (host): always cp.async.
      const int64_t n = n0 + t;
      cp_async16(&ws[stage][t][0], n < N ? w + n * rb + b * L::kBlockBytes : w, n < N);
    }
    cp_async_commit();
  };

  float acc[2][4][4] = {};
  float part[2][4][4] = {};
  load_tile(0, 0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int stage = int(b % kStages);
    if (b + 1 < nblocks) load_tile(stage ^ 1, b + 1);
    else cp_async_commit();  // an empty group keeps "wait until 1 pending" meaning "tile b landed"
    cp_async_wait<1>();
    __syncthreads();

    const int64_t g = L::group_of_block(b, gp.bpg);
    float z[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + wn * 32 + j * 8 + L::mma::b_n(lane);
      z[j] = n < N ? zero_at(gp, n, g) : 0.f;  // absent rows hold code 0: d = 0
    }
    // The packed bytes of both k16 halves, gathered once; A is loaded one half at a time, which
    // keeps the live set small enough for sm_90a's ptxas (it capped this kernel at 128
    // registers and spilled when all four A fragments were loaded up front).
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint8_t* row = ws[stage][wn * 32 + j * 8 + L::mma::b_n(lane)];
      words[j] = L::mma::b_word(*reinterpret_cast<const uint16_t*>(row + L::mma::b_pair_offset(lane, 0)),
                                *reinterpret_cast<const uint16_t*>(row + L::mma::b_pair_offset(lane, 1)));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a[2][4];  // [m16 tile]
#pragma unroll
      for (int i = 0; i < 2; ++i)
        ldmatrix_x4(a[i], &xs[stage][wm * 32 + i * 16 + L::mma::a_row(lane)][h * 16 + L::mma::a_col(lane)]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t u = L::nibbles(words[j], h);
        // fp32 d exactly as the reference, then to T (exact for integer zeros, see the top).
        const uint32_t b0 = pack2<T>(L::code_byte_to_float(u, 0) - z[j], L::code_byte_to_float(u, 1) - z[j]);
        const uint32_t b1 = pack2<T>(L::code_byte_to_float(u, 2) - z[j], L::code_byte_to_float(u, 3) - z[j]);
#pragma unroll
        for (int i = 0; i < 2; ++i) mma_16816<T>(part[i][j], a[i], b0, b1);
      }
    }
    if (group_ends(gp, b, nblocks)) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float s[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t n = n0 + wn * 32 + j * 8 + L::mma::c_n(lane, e);
          s[e] = n < N ? scale_at(gp, n, g) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            acc[i][j][c] = fmaf(part[i][j][c], s[c % 2], acc[i][j][c]);
            part[i][j][c] = 0.f;
          }
      }
    }
    __syncthreads();  // everyone is done with `stage` before the next iteration refills it
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t m = m0 + wm * 32 + i * 16 + L::mma::c_m(lane, c);
        const int64_t n = n0 + wn * 32 + j * 8 + L::mma::c_n(lane, c);
        if (m < M && n < N) out[m * N + n] = finish<T>(acc[i][j][c], bias, n);
      }
}

// ============================================================================ M > 8, f32
// Both tiles stored k-major ([32][64 + 4]) so the inner loop reads one row of each per k.
__global__ void __launch_bounds__(L::tiled::kThreads32)
    int4_wo_simt_f32_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w, const GroupParams gp,
                            const float* __restrict__ bias, float* __restrict__ out, int64_t M, int64_t N,
                            int64_t K) {
  using namespace L::tiled;
  __shared__ float Xs[L::kBlock][kBM + 4];
  __shared__ float Ws[L::kBlock][kBN + 4];
  const int t = threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int64_t nblocks = L::num_blocks(K), rb = L::row_bytes(K);
  const Chunk xr = x_run32(t);
  const int64_t xm = m0 + xr.row, wn = n0 + w_row32(t);

  float acc[4][4] = {}, part[4][4] = {};
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t g = L::group_of_block(b, gp.bpg);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int64_t k = b * L::kBlock + xr.col + e;
      Xs[xr.col + e][xr.row] = (xm < M && k < K) ? x[xm * K + k] : 0.f;
    }
    // Bytes 4q..4q+3 of the block: aligned 32-bit load (rows and blocks are 16-byte multiples).
    // Absent rows: d = 0 (x past K is already 0, which covers the padding codes).
    if (wn < N) {
      const uint32_t word = *reinterpret_cast<const uint32_t*>(w + wn * rb + b * L::kBlockBytes + w_byte32(t));
      const float z = zero_at(gp, wn, g);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) Ws[w_col32(t, e, h)][w_row32(t)] = L::code_byte_to_float(L::nibbles(word, h), e) - z;
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int e = 0; e < 4; ++e) Ws[w_col32(t, e, h)][w_row32(t)] = 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < L::kBlock; ++kk) {
      fma_4x4(Xs, Ws, kk, [&](int i) { return out_row32(t, i); }, [&](int j) { return out_col32(t, j); }, part);
    }
    if (group_ends(gp, b, nblocks)) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t n = n0 + out_col32(t, j);
        const float s = n < N ? scale_at(gp, n, g) : 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[i][j] = fmaf(part[i][j], s, acc[i][j]);
          part[i][j] = 0.f;
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + out_row32(t, i), n = n0 + out_col32(t, j);
      if (m < M && n < N) out[m * N + n] = finish<float>(acc[i][j], bias, n);
    }
}

// ============================================================================ host side
using namespace ::lowbit::cuda::host;

ParamKind param_kind(c10::ScalarType t) {
  return t == c10::ScalarType::Half ? ParamKind::kF16 : t == c10::ScalarType::BFloat16 ? ParamKind::kBF16 : ParamKind::kF32;
}

template <typename T, int kRows>
void launch_gemv(const at::Tensor& x, const at::Tensor& w, const GroupParams& gp, const float* bias, at::Tensor& out,
                 int64_t N, cudaStream_t stream) {
  using namespace L::gemv;
  const int64_t M = x.size(0), K = x.size(1);
  const dim3 grid(ceil_div(N, kWarps * kRowsPerWarp), ceil_div(M, kRows));
  int4_wo_gemv_kernel<T, kRows><<<grid, kWarps * 32, 0, stream>>>(ptr<const T>(x), ptr<const uint8_t>(w), gp, bias,
                                                                   ptr<T>(out), M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor int4_weight_only_mm_cuda(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scale_in,
                                    const std::optional<at::Tensor>& zero_in, int64_t group_size,
                                    const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "int4_weight_only_mm";
  check_int4_weight_only_mm(op, x_in, packed_in, scale_in, zero_in, group_size, bias_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous();
  // The kernels read whole 16-byte packed blocks: a contiguous view at an odd offset is copied.
  at::Tensor w = packed_in.contiguous();
  if (!aligned16(w.data_ptr())) w = w.clone();
  const at::Tensor scale = scale_in.contiguous();
  at::Tensor zero;
  if (zero_in.has_value()) zero = zero_in->contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;

  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const GroupParams gp{scale.data_ptr(), zero.defined() ? zero.data_ptr() : nullptr, param_kind(scale.scalar_type()),
                       (K + group_size - 1) / group_size, L::blocks_per_group(group_size, K)};
  at::Tensor out = at::empty({M, N}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (M <= L::gemv::kMaxRows) {
      dispatch_gemv_rows(M, [&](auto rows) {
        launch_gemv<T, decltype(rows)::value>(x, w, gp, bias_ptr, out, N, stream);
      });
      return;
    }
    const dim3 grid(ceil_div(N, L::tiled::kBN), ceil_div(M, L::tiled::kBM));
    if constexpr (std::is_same_v<T, float>) {
      int4_wo_simt_f32_kernel<<<grid, L::tiled::kThreads32, 0, stream>>>(ptr<const float>(x), ptr<const uint8_t>(w),
                                                                          gp, bias_ptr, ptr<float>(out), M, N, K);
    } else {
      const bool vec = K % 8 == 0 && aligned16(x.data_ptr());
      auto kernel = vec ? int4_wo_mma_kernel<T, true> : int4_wo_mma_kernel<T, false>;
      kernel<<<grid, L::tiled::kThreads, 0, stream>>>(ptr<const T>(x), ptr<const uint8_t>(w), gp, bias_ptr,
                                                       ptr<T>(out), M, N, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { m.impl("_cuda_int4_weight_only_mm", &cuda::int4_weight_only_mm_cuda); }

}  // namespace lowbit
