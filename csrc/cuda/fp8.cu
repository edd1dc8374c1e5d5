// FP8 family (E4M3FN, E5M2), CUDA kernels for the `_cuda_<op>` twins declared in lowbit/_ops.py.
// Semantics: lowbit/backends/reference/fp8.py.
//
// Which kernel serves a call:
//   fp8_quantize_*       one warp (groups of <= 1024 elements) or one 256-thread block per scale
//                        group (a row, a 1x128 block or a 128x128 tile): finite amax, scale =
//                        amax / fmax (IEEE division, 1.0 where 0), q = encode(x / scale) with
//                        lowbit/fp8.h's RNE and saturation policy, so bit-exact with the reference.
//                        Per-tensor scales: a grid-wide amax (atomicMax on the float bits), then a
//                        flat pass.
//   fp8_scaled_mm        Native FP8 tensor cores, for M > 16 without block scales, e4m3 x e4m3
//                        or e5m2 x e5m2, K % 16 == 0 and N % 8 == 0 (lowbit/cuda/fp8_native.h):
//                        sm_90a: CUTLASS 3.x TMA + wgmma kernel (csrc/cuda/fp8_sm90.cu);
//                        sm_89: CUTLASS 2.x mma.sync e4m3/e5m2 kernel (csrc/cuda/fp8_sm89.cu);
//                        both with the scale/bias epilogue fused as a visitor tree, both
//                        accumulating in fp32 with CUTLASS's per-K-tile promotion (see those
//                        headers). Every other call, and every call on sm_80, takes the
//                        dequantizing kernels below.
//   fp8_scaled_mm        small M (<= 16 scaled_mm without block scales, <= 8 weight-only): one
//   fp8_weight_only_mm   warp per row of the fp8 matrix, both operands decoded in registers, fp32
//                        FMA (memory-bound decode). Larger M: 64x64 tiles, the fp8 tile decoded
//                        in shared memory to fp16 (scaled_mm: both operands) or to x's type
//                        (weight-only, f16/bf16 x), multiplied on tensor cores (WMMA, fp32
//                        accumulate); f32 x uses fp32 FMA (TF32 would round x). Block scales
//                        (1x128 x 128x128) multiply each 128-wide K block's fp32 partial sum.
// The dequantizing kernels serve sm_80, sm_89 and sm_90a.
//
// Why the dequantizing kernels stay for block scales, mixed pairings and weight-only:
// decoding to fp16 is exact (every fp8 value is an fp16, products are exact in fp32), so the
// only error is the fp32 accumulation. The FP8 tensor cores keep fewer bits inside one
// instruction chain (the DeepSeek-V3 report measured ~14 on Hopper); CUTLASS promotes to fp32
// once per K tile, which the tests bound separately (tests/test_fp8_cuda.py). CUTLASS's sm_90
// blockwise-scaled FP8 kernel (KernelTmaWarpSpecializedCooperativeFP8Blockwise) is not used
// yet; each native instantiation costs ~30 CPU-seconds in CI, so there are six per arch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lowbit/checks.h"
#include "lowbit/cuda/common.cuh"
#include "lowbit/cuda/host.cuh"
#include "lowbit/cuda/wmma_2x2.cuh"
#include "lowbit/cuda/fp8_native.h"
#include "lowbit/cuda/fp8_tiles.cuh"
#include "lowbit/fp8.h"

namespace lowbit {
namespace cuda {
namespace {

using namespace ::lowbit::cuda::fp8k;
constexpr int64_t kBlk = ::lowbit::fp8::kBlock;

// ============================================================================ quantize
constexpr int kQuantThreads = 256;

// Infinities and NaN do not enter amax (the reference's torch.where(isfinite(a), |a|, 0)).
__device__ __forceinline__ float finite_abs(float v) {
  const float a = fabsf(v);
  return a < INFINITY ? a : 0.f;  // false for NaN too
}

__device__ __forceinline__ float scale_from_amax(float amax, bool e4m3) {
  const float s = __fdiv_rn(amax, e4m3 ? ::lowbit::fp8::kE4M3Max : ::lowbit::fp8::kE5M2Max);
  return s > 0.f ? s : 1.f;  // amax 0 (or an underflowing quotient): 1, never a division by 0
}

// x / scale, IEEE, with the NaN the CPU reference gets: the sign of a NaN picks the code (0x7f
// or 0xff), and x86 returns a NaN operand (x first) or 0xffc00000 for an invalid operation
// (inf/inf, 0/0), where the GPU returns its canonical 0x7fffffff.
__device__ __forceinline__ float div_like_cpu(float x, float scale) {
  const float q = __fdiv_rn(x, scale);
  if (q == q) return q;
  return x != x ? x : (scale != scale ? scale : __uint_as_float(0xffc00000u));
}

__device__ __forceinline__ uint8_t quantize_one(float x, float scale, bool e4m3, bool saturate) {
  return encode(div_like_cpu(x, scale), e4m3, saturate);
}

// Max over a group of kGroup threads (a warp or the block); the inputs are finite and >= 0.
template <int kGroup>
__device__ __forceinline__ float group_max(float v) {
  return group_reduce<kGroup, kQuantThreads>(v, [](float a, float b) { return fmaxf(a, b); });
}

// Scale groups of group_rows x group_cols elements of x [rows, K]; group g covers rows
// (g / kb) * group_rows.. and columns (g % kb) * group_cols.., kb = ceil(K / group_cols).
// Scale g is scale[g] for every granularity: [rows], [rows, kb] and [ceil(rows/128), kb]
// are all laid out that way. kDynamic: compute (and write) it, else read it.
template <typename T, int kGroup, bool kDynamic>
__global__ void __launch_bounds__(kQuantThreads)
    fp8_quantize_groups_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                               int64_t rows, int64_t K, int group_rows, int64_t group_cols, int64_t kb,
                               int64_t groups, bool e4m3, bool saturate) {
  constexpr int kGroupsPerBlock = kQuantThreads / kGroup;
  const int64_t g = int64_t(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  // Uniform per group; for kGroup == block the whole block leaves before the __syncthreads.
  if (g >= groups) return;
  const int64_t r0 = (g / kb) * group_rows, c0 = (g % kb) * group_cols;
  const int nr = int(min(int64_t(group_rows), rows - r0));
  const uint32_t nc = uint32_t(min(group_cols, K - c0));
  const uint32_t n = uint32_t(nr) * nc;  // <= 128 * 128 or one row: fits 32 bits
  const T* xg = x + r0 * K + c0;
  uint8_t* qg = q + r0 * K + c0;
  float s;
  if constexpr (kDynamic) {
    float amax = 0.f;
    for (uint32_t i = lane; i < n; i += kGroup) amax = fmaxf(amax, finite_abs(Num<T>::to_f32(xg[(i / nc) * K + i % nc])));
    s = scale_from_amax(group_max<kGroup>(amax), e4m3);
    if (lane == 0) scale[g] = s;
  } else {
    s = scale[g];
  }
  for (uint32_t i = lane; i < n; i += kGroup) {
    const int64_t off = (i / nc) * K + i % nc;
    qg[off] = quantize_one(Num<T>::to_f32(xg[off]), s, e4m3, saturate);
  }
}

// Finite |x| max over the whole tensor. Non-negative finite floats order like their bit
// patterns as unsigned ints, so atomicMax on the bits is a float max. *amax_bits starts at 0.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    fp8_amax_kernel(const T* __restrict__ x, int64_t numel, unsigned int* __restrict__ amax_bits) {
  float amax = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * kQuantThreads + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * kQuantThreads)
    amax = fmaxf(amax, finite_abs(Num<T>::to_f32(x[i])));
  amax = group_max<kQuantThreads>(amax);
  if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(amax));
}

// One scale for the whole tensor: from a scalar tensor (static) or from the amax bits
// (dynamic; block 0 also writes the scale out).
template <typename T, bool kFromAmax>
__global__ void __launch_bounds__(kQuantThreads)
    fp8_quantize_flat_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, const void* scale_src,
                             float* __restrict__ scale_out, int64_t numel, bool e4m3, bool saturate) {
  float s;
  if constexpr (kFromAmax) {
    s = scale_from_amax(__uint_as_float(*static_cast<const unsigned int*>(scale_src)), e4m3);
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = s;
  } else {
    s = *static_cast<const float*>(scale_src);
  }
  for (int64_t i = int64_t(blockIdx.x) * kQuantThreads + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * kQuantThreads)
    q[i] = quantize_one(Num<T>::to_f32(x[i]), s, e4m3, saturate);
}

// ============================================================================ small M
// 16 consecutive fp8 codes decoded to fp32 (the A operand of fp8_scaled_mm).
__device__ __forceinline__ void load16_codes(const uint8_t* p, bool e4m3, float (&f)[16]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const uint8_t* c = reinterpret_cast<const uint8_t*>(&v);
#pragma unroll
  for (int e = 0; e < 16; ++e) f[e] = decode(c[e], e4m3);
}

template <typename XT>
__device__ __forceinline__ float load_one(const XT* p, bool e4m3) {
  if constexpr (std::is_same_v<XT, uint8_t>) return decode(*p, e4m3);
  else return Num<XT>::to_f32(*p);
}

// One warp per row n of the fp8 matrix w [N, K], streamed once for up to kRows rows of x
// (fp32/f16/bf16 for weight-only, fp8 codes for scaled_mm). bscale: the 128x128 block scales
// of w ([ceil(N/128), ceil(K/128)], nullable), applied to each decoded weight as the
// reference's w * scale. Sums start from -0.0 so an all -0.0 row stays -0.0.
// kVec: K % 16 == 0 and 16-byte-aligned x and w.
template <typename XT, typename OutT, int kRows, bool kVec>
__global__ void __launch_bounds__(gemv::kWarpsPerBlock * 32, 1)
    fp8_gemv_kernel(const XT* __restrict__ x, const uint8_t* __restrict__ w, int64_t M, int64_t N, int64_t K,
                    bool x_e4m3, bool w_e4m3, const float* __restrict__ bscale, Epilogue<OutT> epi) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * gemv::kWarpsPerBlock + threadIdx.x / 32;
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  if (n >= N) return;  // uniform per warp; no block-level synchronisation follows
  const int rows = int(M - m0 < kRows ? M - m0 : kRows);
  const uint8_t* wr = w + n * K;
  const XT* xr = x + m0 * K;
  const float* bs = bscale != nullptr ? bscale + (n / kBlk) * ((K + kBlk - 1) / kBlk) : nullptr;

  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = -0.f;
  if constexpr (kVec) {
    for (int64_t k = int64_t(lane) * gemv::kVec; k < K; k += 32 * gemv::kVec) {
      float wf[16];
      load16_codes(wr + k, w_e4m3, wf);
      if (bs != nullptr) {
        const float s = bs[k / kBlk];  // a run of 16 never straddles a 128 block
#pragma unroll
        for (int e = 0; e < 16; ++e) wf[e] = __fmul_rn(wf[e], s);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        // Rows past M re-read the last row (in bounds, results dropped): no branch, so the
        // loop unrolls and acc[] stays in registers.
        const XT* xk = xr + int64_t(r < rows ? r : rows - 1) * K + k;
        if constexpr (std::is_same_v<XT, float>) {
          // Four float4 loads consumed one at a time: 16 live floats fewer than load16.
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const float4 x4 = reinterpret_cast<const float4*>(xk)[v];
            acc[r] = fmaf(x4.x, wf[4 * v], acc[r]);
            acc[r] = fmaf(x4.y, wf[4 * v + 1], acc[r]);
            acc[r] = fmaf(x4.z, wf[4 * v + 2], acc[r]);
            acc[r] = fmaf(x4.w, wf[4 * v + 3], acc[r]);
          }
        } else {
          float xf[16];
          if constexpr (std::is_same_v<XT, uint8_t>) load16_codes(xk, x_e4m3, xf);
          else load16(xk, xf);
#pragma unroll
          for (int e = 0; e < 16; ++e) acc[r] = fmaf(xf[e], wf[e], acc[r]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      float wf = decode(wr[k], w_e4m3);
      if (bs != nullptr) wf = __fmul_rn(wf, bs[k / kBlk]);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        acc[r] = fmaf(load_one(xr + int64_t(r < rows ? r : rows - 1) * K + k, x_e4m3), wf, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float sum = warp_sum(acc[r]);
    if (lane == 0 && r < rows) epi(m0 + r, n, sum);
  }
}

// ============================================================================ tensor-core tiles
// out = A [M, K] x B [N, K]^T with B fp8 and A either fp8 (scaled_mm, MT = fp16) or x's own
// 16-bit type (weight-only, MT = x's type); both staged in shared memory as MT.
// kBlock: sa_blk ([M, ceil(K/128)], nullable = 1) and sb_blk ([ceil(N/128), ceil(K/128)])
// multiply each 128-wide K block's fp32 partial sum, accumulated in shared memory; the
// epilogue then only adds the bias. Otherwise the epilogue applies the per-row/column scales.
template <typename MT, typename AT, bool kVec, bool kBlock, typename OutT>
__global__ void __launch_bounds__(wmma_tile::kThreads)
    fp8_mm_wmma_kernel(const AT* __restrict__ a, const uint8_t* __restrict__ b, int64_t M, int64_t N, int64_t K,
                       bool a_e4m3, bool b_e4m3, const float* __restrict__ sa_blk,
                       const float* __restrict__ sb_blk, Epilogue<OutT> epi) {
  using namespace wmma_tile;
  namespace wmma = nvcuda::wmma;
  struct Tiles {
    MT a[kBM][kLd];
    MT b[kBN][kLd];
  };
  union Smem {
    Tiles tiles;
    float c[kBM][kLdC];  // the partial / final sums reuse the operand tiles' space
  };
  __shared__ __align__(128) Smem smem;
  // Block-scaled only: the running sum over K blocks and the current block's scales.
  struct BlockSums {
    float total[kBlock ? kBM : 1][kLdC];
    float sa[kBM], sb[kBN];
  };
  __shared__ BlockSums sums;

  const int t = threadIdx.x, warp = t / 32;
  const int wm = warp / 2, wn = warp % 2;  // 2x2 warps, 32x32 each
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int rr = run_row(t), rc = run_col(t);
  const bool a_ok = m0 + rr < M, b_ok = n0 + rr < N;
  const AT* arow = a + (a_ok ? (m0 + rr) * K : 0);
  const uint8_t* brow = b + (b_ok ? (n0 + rr) * K : 0);
  const int64_t kb = (K + kBlk - 1) / kBlk;

  wmma_2x2::Acc acc[2][2];
  // -0.0: the additive identity (see stage_run), so exact -0.0 results survive.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], -0.f);
  if constexpr (kBlock) {
    for (int idx = t; idx < kBM * kBN; idx += kThreads) sums.total[idx / kBN][idx % kBN] = -0.f;
  }

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    stage_run<MT, kVec, kRun>(arow, a_ok, k0 + rc, K, a_e4m3, -0.f, &smem.tiles.a[rr][rc]);
    stage_run<MT, kVec, kRun>(brow, b_ok, k0 + rc, K, b_e4m3, 0.f, &smem.tiles.b[rr][rc]);
    __syncthreads();
    // B tile is [n][k], i.e. B^T stored column-major.
    wmma_2x2::mma_tile<kBK>(acc, smem.tiles.a, smem.tiles.b, wm, wn);
    __syncthreads();
    if constexpr (kBlock) {
      if ((k0 + kBK) % kBlk == 0 || k0 + kBK >= K) {  // end of a 128-wide K block
        // The fragments' element map is opaque: go through shared memory, where the scale of
        // each (row, column) is known, and keep the running total there (not in registers).
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            wmma::store_matrix_sync(&smem.c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kLdC,
                                    wmma::mem_row_major);
            wmma::fill_fragment(acc[i][j], -0.f);
          }
        const int64_t blk = k0 / kBlk;
        if (t < kBM) {
          const int64_t m = m0 + t;
          sums.sa[t] = (sa_blk != nullptr && m < M) ? sa_blk[m * kb + blk] : 1.f;
        } else {
          const int64_t n = n0 + (t - kBM);
          sums.sb[t - kBM] = n < N ? sb_blk[(n / kBlk) * kb + blk] : 0.f;
        }
        __syncthreads();
#pragma unroll 4
        for (int idx = t; idx < kBM * kBN; idx += kThreads) {
          const int r = idx / kBN, c = idx % kBN;
          sums.total[r][c] = fmaf(smem.c[r][c], __fmul_rn(sums.sa[r], sums.sb[c]), sums.total[r][c]);
        }
        __syncthreads();  // smem.c aliases the next step's operand tiles
      }
    }
  }
  if constexpr (!kBlock) {
    wmma_2x2::store_tile(smem.c, acc, wm, wn);
    __syncthreads();
  }
  for (int idx = t; idx < kBM * kBN; idx += kThreads) {
    const int r = idx / kBN, c = idx % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) epi(m, n, kBlock ? sums.total[r][c] : smem.c[r][c]);
  }
}

// f32 x, fp8 w: fp32 FMA on 64x64 tiles, w decoded (and multiplied by its 128x128 block scale
// where there is one) into shared memory. Tiles are k-major so the inner loop reads a row of
// each. kVec: K % 4 == 0 and 16-byte-aligned x and w.
template <bool kVec>
__global__ void __launch_bounds__(simt_tile::kThreads)
    fp8_wo_simt_f32_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w, int64_t M, int64_t N,
                           int64_t K, bool w_e4m3, const float* __restrict__ bscale, Epilogue<float> epi) {
  using namespace simt_tile;
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int t = threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int rr = run_row(t), rc = run_col(t);
  const int64_t xm = m0 + rr, wn = n0 + rr;
  const int64_t kb = (K + kBlk - 1) / kBlk;
  const float* bs = (bscale != nullptr && wn < N) ? bscale + (wn / kBlk) * kb : nullptr;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = -0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    const int64_t k = k0 + rc;
    // Padding: -0.0 for x, +0.0 for w (see stage_run).
    float xv[kRun], wv[kRun];
    if constexpr (kVec) {
      float4 v = make_float4(-0.f, -0.f, -0.f, -0.f);
      uchar4 c = make_uchar4(0, 0, 0, 0);
      const bool in_k = k < K;
      if (xm < M && in_k) v = *reinterpret_cast<const float4*>(x + xm * K + k);
      if (wn < N && in_k) c = *reinterpret_cast<const uchar4*>(w + wn * K + k);
      xv[0] = v.x, xv[1] = v.y, xv[2] = v.z, xv[3] = v.w;
      const uint8_t cc[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
      for (int e = 0; e < kRun; ++e) wv[e] = (wn < N && in_k) ? decode(cc[e], w_e4m3) : 0.f;
    } else {
#pragma unroll
      for (int e = 0; e < kRun; ++e) {
        const bool in_k = k + e < K;
        xv[e] = (xm < M && in_k) ? x[xm * K + k + e] : -0.f;
        wv[e] = (wn < N && in_k) ? decode(w[wn * K + k + e], w_e4m3) : 0.f;
      }
    }
    if (bs != nullptr) {
#pragma unroll
      for (int e = 0; e < kRun; ++e)
        if (k + e < K) wv[e] = __fmul_rn(wv[e], bs[(k + e) / kBlk]);
    }
#pragma unroll
    for (int e = 0; e < kRun; ++e) {
      As[rc + e][rr] = xv[e];
      Bs[rc + e][rr] = wv[e];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      fma_4x4(As, Bs, kk, [&](int i) { return out_row(t, i); }, [&](int j) { return out_col(t, j); }, acc);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + out_row(t, i), n = n0 + out_col(t, j);
      if (m < M && n < N) epi(m, n, acc[i][j]);
    }
}

// ============================================================================ host side
using namespace ::lowbit::cuda::host;

bool is_e4m3(c10::ScalarType t) { return t == c10::ScalarType::Float8_e4m3fn; }

c10::ScalarType fp8_dtype(bool e4m3) {
  return e4m3 ? c10::ScalarType::Float8_e4m3fn : c10::ScalarType::Float8_e5m2;
}

int64_t flat_blocks(int64_t numel) {
  // Grid-stride loops; a few waves of blocks are enough to saturate memory bandwidth.
  return std::min<int64_t>(ceil_div(numel, kQuantThreads), 4096);
}

// ---------------------------------------------------------------------------- quantize
void launch_quantize_groups(const at::Tensor& x, at::Tensor& q, const at::Tensor& scale, bool dynamic,
                            int group_rows, int64_t group_cols, bool e4m3, bool saturate, cudaStream_t stream) {
  const int64_t K = x.size(-1), rows = x.numel() / K;
  const int64_t kb = ceil_div(K, group_cols), groups = ceil_div(rows, group_rows) * kb;
  // Small groups: a warp each keeps all 8 warps of a block busy on different groups.
  const bool warp_per_group = int64_t(group_rows) * std::min(group_cols, K) <= 1024;
  const int64_t blocks = warp_per_group ? ceil_div(groups, kQuantThreads / 32) : groups;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = warp_per_group
                      ? (dynamic ? fp8_quantize_groups_kernel<T, 32, true> : fp8_quantize_groups_kernel<T, 32, false>)
                      : (dynamic ? fp8_quantize_groups_kernel<T, kQuantThreads, true>
                                 : fp8_quantize_groups_kernel<T, kQuantThreads, false>);
    kernel<<<blocks, kQuantThreads, 0, stream>>>(ptr<const T>(x), ptr<uint8_t>(q), ptr<float>(scale), rows, K,
                                                 group_rows, group_cols, kb, groups, e4m3, saturate);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_dynamic_cuda(const at::Tensor& x_in, c10::string_view format,
                                                             c10::string_view granularity, bool saturate) {
  constexpr const char* op = "fp8_quantize_dynamic";
  const std::string fmt(format), gran(granularity);
  check_fp8_quantize_dynamic(op, x_in, fmt, gran);
  const bool e4m3 = check_fp8_format(op, fmt);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(fp8_dtype(e4m3)));
  const int64_t K = x.size(-1), rows = x.numel() / K, kb = ceil_div(K, kBlk);
  std::vector<int64_t> rows_shape(x.sizes().begin(), x.sizes().end() - 1);

  if (gran == "tensor") {
    at::Tensor scale = at::empty({}, x.options().dtype(at::kFloat));
    at::Tensor amax_bits = at::empty({1}, x.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(amax_bits.data_ptr(), 0, sizeof(int32_t), stream));
    const int64_t numel = x.numel();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      fp8_amax_kernel<T><<<flat_blocks(numel), kQuantThreads, 0, stream>>>(ptr<const T>(x), numel,
                                                                          ptr<unsigned int>(amax_bits));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fp8_quantize_flat_kernel<T, true><<<flat_blocks(numel), kQuantThreads, 0, stream>>>(
          ptr<const T>(x), ptr<uint8_t>(q), amax_bits.data_ptr(), ptr<float>(scale), numel, e4m3, saturate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {q, scale};
  }
  at::Tensor scale;
  if (gran == "row") {
    scale = at::empty(rows_shape, x.options().dtype(at::kFloat));
    launch_quantize_groups(x, q, scale, true, 1, K, e4m3, saturate, stream);
  } else if (gran == "block1x128") {
    rows_shape.push_back(kb);
    scale = at::empty(rows_shape, x.options().dtype(at::kFloat));
    launch_quantize_groups(x, q, scale, true, 1, kBlk, e4m3, saturate, stream);
  } else {  // block128x128 (x is 2-D)
    scale = at::empty({ceil_div(rows, kBlk), kb}, x.options().dtype(at::kFloat));
    launch_quantize_groups(x, q, scale, true, int(kBlk), kBlk, e4m3, saturate, stream);
  }
  return {q, scale};
}

at::Tensor fp8_quantize_static_cuda(const at::Tensor& x_in, const at::Tensor& scale_in, c10::string_view format,
                                    bool saturate) {
  constexpr const char* op = "fp8_quantize_static";
  const std::string fmt(format);
  check_fp8_quantize_static(op, x_in, scale_in, fmt);
  const bool e4m3 = check_fp8_format(op, fmt);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(fp8_dtype(e4m3)));
  const int64_t K = x.size(-1);
  if (fp8_is_scalar(scale)) {
    const int64_t numel = x.numel();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      fp8_quantize_flat_kernel<T, false><<<flat_blocks(numel), kQuantThreads, 0, stream>>>(
          ptr<const T>(x), ptr<uint8_t>(q), scale.data_ptr(), nullptr, numel, e4m3, saturate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    // The check admits x.shape[:-1] (per row) or x.shape[:-1] + [ceil(K/128)] (per 1x128 block).
    const bool per_row = scale.dim() == x.dim() - 1;
    launch_quantize_groups(x, q, scale, false, 1, per_row ? K : kBlk, e4m3, saturate, stream);
  }
  return q;
}

// ---------------------------------------------------------------------------- GEMMs
template <typename XT, typename OutT, int kRows>
void launch_gemv_rows(const XT* x, const uint8_t* w, int64_t M, int64_t N, int64_t K, bool x_e4m3, bool w_e4m3,
                      const float* bscale, const Epilogue<OutT>& epi, bool vec, cudaStream_t stream) {
  const dim3 grid(ceil_div(N, gemv::kWarpsPerBlock), ceil_div(M, kRows));
  auto kernel = vec ? fp8_gemv_kernel<XT, OutT, kRows, true> : fp8_gemv_kernel<XT, OutT, kRows, false>;
  kernel<<<grid, gemv::kWarpsPerBlock * 32, 0, stream>>>(x, w, M, N, K, x_e4m3, w_e4m3, bscale, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename XT, typename OutT>
void launch_gemv(const XT* x, const uint8_t* w, int64_t M, int64_t N, int64_t K, bool x_e4m3, bool w_e4m3,
                 const float* bscale, const Epilogue<OutT>& epi, cudaStream_t stream) {
  const bool vec = K % gemv::kVec == 0 && aligned16(x) && aligned16(w);
  if (M == 1) launch_gemv_rows<XT, OutT, 1>(x, w, M, N, K, x_e4m3, w_e4m3, bscale, epi, vec, stream);
  else if (M <= 4) launch_gemv_rows<XT, OutT, 4>(x, w, M, N, K, x_e4m3, w_e4m3, bscale, epi, vec, stream);
  else launch_gemv_rows<XT, OutT, 8>(x, w, M, N, K, x_e4m3, w_e4m3, bscale, epi, vec, stream);
}

template <typename MT, typename AT, typename OutT>
void launch_wmma(const AT* a, const uint8_t* b, int64_t M, int64_t N, int64_t K, bool a_e4m3, bool b_e4m3,
                 const float* sa_blk, const float* sb_blk, bool block, const Epilogue<OutT>& epi,
                 cudaStream_t stream) {
  const dim3 grid(ceil_div(N, wmma_tile::kBN), ceil_div(M, wmma_tile::kBM));
  const bool vec = K % wmma_tile::kRun == 0 && aligned16(a) && aligned16(b);
  auto kernel = block ? (vec ? fp8_mm_wmma_kernel<MT, AT, true, true, OutT> : fp8_mm_wmma_kernel<MT, AT, false, true, OutT>)
                      : (vec ? fp8_mm_wmma_kernel<MT, AT, true, false, OutT>
                             : fp8_mm_wmma_kernel<MT, AT, false, false, OutT>);
  kernel<<<grid, wmma_tile::kThreads, 0, stream>>>(a, b, M, N, K, a_e4m3, b_e4m3, sa_blk, sb_blk, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A scalar-or-vector scale as (pointer, stride): stride 0 broadcasts a scalar.
int64_t vector_stride(const at::Tensor& s) { return s.numel() == 1 ? 0 : 1; }

at::Tensor aligned_copy_if_needed(const at::Tensor& t) { return aligned16(t.data_ptr()) ? t : t.clone(); }

// 90 or 89 when the device runs this library's native FP8 kernel for its architecture (a
// 9.0 / 8.9 GPU and a build that has that architecture's object), else 0. Cached per device:
// it costs three driver queries.
int native_arch(int device) {
  static std::atomic<int> cached[64] = {};  // 0: not asked yet; else arch + 1
  auto ask = [device] {
    if (fp8_native::sm90_available(device)) return 90;
    if (fp8_native::sm89_available(device)) return 89;
    return 0;
  };
  if (device < 0 || device >= 64) return ask();
  int v = cached[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = ask() + 1;
    cached[device].store(v, std::memory_order_relaxed);
  }
  return v - 1;
}

at::Tensor fp8_scaled_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale_a_in,
                              const at::Tensor& scale_b_in, const std::optional<at::Tensor>& bias_in,
                              std::optional<c10::ScalarType> out_dtype_in) {
  constexpr const char* op = "fp8_scaled_mm";
  bool block = false;
  const c10::ScalarType out_dtype =
      check_fp8_scaled_mm(op, a_in, b_in, scale_a_in, scale_b_in, bias_in, out_dtype_in, &block);
  c10::cuda::CUDAGuard guard(a_in.device());
  require_sm80(op);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor sa = scale_a_in.contiguous(), sb = scale_b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  // The reference adds float(bias): convert once here, the kernels read fp32.
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;
  const bool a_e4m3 = is_e4m3(a.scalar_type()), b_e4m3 = is_e4m3(b.scalar_type());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (!block && M > 2 * gemv::kMaxRows && fp8_native::native_pairing(a.scalar_type(), b.scalar_type()) &&
      fp8_native::shape_ok(N, K)) {
    const int arch = native_arch(a.get_device());
    if (arch != 0) {
      // The visitor trees read full, 16-byte-aligned vectors: expand scalar scales (M or N
      // floats, negligible) and copy a misaligned operand once.
      const at::Tensor an = aligned_copy_if_needed(a), bn = aligned_copy_if_needed(b);
      const at::Tensor sa_vec = sa.reshape({-1}).expand({M}).contiguous();
      const at::Tensor sb_vec = aligned_copy_if_needed(sb.reshape({-1}).expand({N}).contiguous());
      at::Tensor bias_vec;
      if (bias.defined()) bias_vec = aligned_copy_if_needed(bias);
      const float* bias_vec_ptr = bias_vec.defined() ? ptr<const float>(bias_vec) : nullptr;
      if (arch == 90) fp8_native::scaled_mm_sm90(an, bn, sa_vec, sb_vec, bias_vec_ptr, out, stream);
      else fp8_native::scaled_mm_sm89(an, bn, sa_vec, sb_vec, bias_vec_ptr, out, stream);
      return out;
    }
  }

  dispatch_float(out_dtype, [&](auto tag) {
    using OutT = typename decltype(tag)::type;
    Epilogue<OutT> epi{ptr<OutT>(out), N, nullptr, 0, nullptr, 0, bias_ptr};
    if (!block) {
      epi.sa = ptr<const float>(sa), epi.sa_stride = vector_stride(sa);
      epi.sb = ptr<const float>(sb), epi.sb_stride = vector_stride(sb);
    }
    const float* sa_blk = block ? ptr<const float>(sa) : nullptr;
    const float* sb_blk = block ? ptr<const float>(sb) : nullptr;
    const uint8_t* ap = ptr<const uint8_t>(a);
    const uint8_t* bp = ptr<const uint8_t>(b);
    // Up to 16 rows: two passes of the streaming kernel still read b far less than a tile.
    if (M <= 2 * gemv::kMaxRows && !block) {
      launch_gemv<uint8_t, OutT>(ap, bp, M, N, K, a_e4m3, b_e4m3, nullptr, epi, stream);
    } else {
      launch_wmma<__half, uint8_t, OutT>(ap, bp, M, N, K, a_e4m3, b_e4m3, sa_blk, sb_blk, block, epi, stream);
    }
  });
  return out;
}

at::Tensor fp8_weight_only_mm_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& scale_in,
                                   const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "fp8_weight_only_mm";
  check_fp8_weight_only_mm(op, x_in, w_in, scale_in, bias_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), scale = scale_in.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  // 2-D scales are 128x128 blocks ([1, 1] for a single block means the same as a scalar).
  const bool block = scale.dim() == 2;
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;
  at::Tensor out = at::empty({M, N}, x.options());
  const bool w_e4m3 = is_e4m3(w.scalar_type());
  const uint8_t* wp = ptr<const uint8_t>(w);
  const float* bscale = block ? ptr<const float>(scale) : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Epilogue<T> epi{ptr<T>(out), N, nullptr, 0, block ? nullptr : ptr<const float>(scale),
                    block ? 0 : vector_stride(scale), bias_ptr};
    const T* xp = ptr<const T>(x);
    if (M <= gemv::kMaxRows) {
      launch_gemv<T, T>(xp, wp, M, N, K, false, w_e4m3, bscale, epi, stream);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      const dim3 grid(ceil_div(N, simt_tile::kBN), ceil_div(M, simt_tile::kBM));
      const bool vec = K % simt_tile::kRun == 0 && aligned16(xp) && aligned16(wp);
      auto kernel = vec ? fp8_wo_simt_f32_kernel<true> : fp8_wo_simt_f32_kernel<false>;
      kernel<<<grid, simt_tile::kThreads, 0, stream>>>(xp, wp, M, N, K, w_e4m3, bscale, epi);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      // The weight-only block scale belongs to w alone: no A-side block scale.
      launch_wmma<T, T, T>(xp, wp, M, N, K, false, w_e4m3, nullptr, bscale, block, epi, stream);
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("_cuda_fp8_quantize_dynamic", &cuda::fp8_quantize_dynamic_cuda);
  m.impl("_cuda_fp8_quantize_static", &cuda::fp8_quantize_static_cuda);
  m.impl("_cuda_fp8_scaled_mm", &cuda::fp8_scaled_mm_cuda);
  m.impl("_cuda_fp8_weight_only_mm", &cuda::fp8_weight_only_mm_cuda);
}

}  // namespace lowbit
