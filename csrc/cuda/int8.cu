// INT8 family, CUDA kernels for the `_cuda_<op>` twins declared in lowbit/_ops.py.
//
// Which kernel serves a call:
//   int8_quantize_*      one block (K > 1024) or one warp (K <= 1024) per row: amax, then
//                        q = clamp(rint(x / scale), -127, 127) with IEEE division; per-tensor
//                        scales use a grid-wide amax (atomicMax on the float bits) and a flat pass.
//   int8_mm              CUTLASS 2.x tensor-core GEMM when K % 16 == 0 and N % 4 == 0, else a
//   int8_scaled_mm       SIMT dp4a GEMM (64x64 tile) that takes any shape. Both are exact; the
//                        scaled epilogue is fused in both (CUTLASS: epilogue visitor tree).
//   int8_weight_only_mm  M <= 8: one warp per weight row, streaming it once for all rows of x
//                        (memory-bound decode). M > 8: 64x64 tiles, the int8 tile converted to
//                        x's type in shared memory; f16/bf16 use WMMA tensor cores (products are
//                        exact in f16/bf16: |w| <= 128), f32 uses fp32 FMA so as not to lose bits.
//
// The thread-to-tile maps of the hand-written kernels are in lowbit/int8_layout.h (tested on
// the CPU); the CUTLASS types are in lowbit/cuda/int8_cutlass.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "lowbit/checks.h"
#include "lowbit/cuda/common.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/host.cuh"
#include "lowbit/cuda/wmma_2x2.cuh"
#include "lowbit/cuda/int8_cutlass.cuh"
#include "lowbit/int8_layout.h"

namespace lowbit {
namespace cuda {
namespace {

namespace L = ::lowbit::int8_layout;

constexpr float kQMax = 127.f;

// ============================================================================ quantize
// torch.amax propagates NaN; fmaxf would drop it. Matching it keeps scale == 1.0 for a row
// with a NaN (the reference's where(amax > 0, ...) is false for NaN).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// The reference's torch.round(x32 / scale) is IEEE division then round-half-even. A NaN
// quotient becomes 0, which is what the reference's float->int8 cast gives on CPU and GPU.
__device__ __forceinline__ int8_t quantize_one(float x, float scale) {
  float q = rintf(__fdiv_rn(x, scale));
  if (q != q) return 0;
  return static_cast<int8_t>(fminf(fmaxf(q, -kQMax), kQMax));
}

__device__ __forceinline__ float scale_from_amax(float amax) { return amax > 0.f ? __fdiv_rn(amax, kQMax) : 1.f; }

constexpr int kQuantThreads = 256;

// Max over a group of kGroup threads: a warp, or the whole block.
template <int kGroup>
__device__ __forceinline__ float group_amax(float v) {
  return group_reduce<kGroup, kQuantThreads>(v, [](float a, float b) { return nan_max(a, b); });
}

// Rows of length K; a group of kGroup threads owns one row. kDynamic: compute the row's scale
// (and write it); otherwise read it from scale[row] (per-row static scales).
template <typename T, int kGroup, bool kDynamic>
__global__ void __launch_bounds__(kQuantThreads)
    int8_quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                              int64_t rows, int64_t K) {
  constexpr int kRowsPerBlock = kQuantThreads / kGroup;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  // Uniform per group; for kGroup == block the whole block leaves before the __syncthreads.
  if (row >= rows) return;
  const T* xr = x + row * K;
  int8_t* qr = q + row * K;
  float s;
  if constexpr (kDynamic) {
    float amax = 0.f;
    for (int64_t k = lane; k < K; k += kGroup) amax = nan_max(amax, fabsf(Num<T>::to_f32(xr[k])));
    amax = group_amax<kGroup>(amax);
    s = scale_from_amax(amax);
    if (lane == 0) scale[row] = s;
  } else {
    s = scale[row];
  }
  for (int64_t k = lane; k < K; k += kGroup) qr[k] = quantize_one(Num<T>::to_f32(xr[k]), s);
}

// |x| max over the whole tensor. Non-negative floats (and the positive NaN fabsf makes) order
// like their bit patterns as unsigned ints, NaN above +inf, so atomicMax on the bits is a
// NaN-propagating float max. *amax_bits starts at 0 (= +0.0f).
template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    int8_amax_kernel(const T* __restrict__ x, int64_t numel, unsigned int* __restrict__ amax_bits) {
  float amax = 0.f;
  for (int64_t i = int64_t(blockIdx.x) * kQuantThreads + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * kQuantThreads)
    amax = nan_max(amax, fabsf(Num<T>::to_f32(x[i])));
  amax = group_amax<kQuantThreads>(amax);
  if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(amax));
}

// One scale for the whole tensor: from a scalar tensor (static) or from the amax bits
// (dynamic, per_row=False; block 0 also writes the scale out).
template <typename T, bool kFromAmax>
__global__ void __launch_bounds__(kQuantThreads)
    int8_quantize_flat_kernel(const T* __restrict__ x, int8_t* __restrict__ q, const void* scale_src,
                              float* __restrict__ scale_out, int64_t numel) {
  float s;
  if constexpr (kFromAmax) {
    s = scale_from_amax(__uint_as_float(*static_cast<const unsigned int*>(scale_src)));
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = s;
  } else {
    s = *static_cast<const float*>(scale_src);
  }
  for (int64_t i = int64_t(blockIdx.x) * kQuantThreads + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * kQuantThreads)
    q[i] = quantize_one(Num<T>::to_f32(x[i]), s);
}

// ============================================================================ SIMT int8 GEMM
// The fallback for shapes the CUTLASS path cannot take. Exact (dp4a accumulates in int32).
struct EpiInt32 {
  int32_t* out;
  int64_t N;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int32_t acc) const { out[m * N + n] = acc; }
};

// Strides of 0 broadcast a scalar scale.
template <typename OutT>
struct EpiScaled {
  OutT* out;
  int64_t N;
  const float* scale_a;
  int64_t scale_a_stride;
  const float* scale_b;
  int64_t scale_b_stride;
  const float* bias;  // nullable
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, int32_t acc) const {
    // Same rounding steps as the reference and the CUTLASS visitor tree.
    float y = __fmul_rn(__fmul_rn(__int2float_rn(acc), scale_a[m * scale_a_stride]), scale_b[n * scale_b_stride]);
    if (bias != nullptr) y = __fadd_rn(y, bias[n]);
    out[m * N + n] = Num<OutT>::from_f32(y);
  }
};

template <class Epi>
__global__ void __launch_bounds__(L::simt::kThreads)
    int8_gemm_simt_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ b, int64_t M, int64_t N,
                          int64_t K, Epi epi) {
  using namespace L::simt;
  // +1 word of padding: rows 9 words apart put the 16 columns a half-warp reads in 16 banks.
  __shared__ int32_t As[kBM][kWords + 1];
  __shared__ int32_t Bs[kBN][kWords + 1];
  const int t = threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const L::TileRun run = load_map(t);

  int32_t acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    // Byte loads with bounds checks (zero outside): any K, any alignment.
    uint32_t wa[kRun / 4] = {}, wb[kRun / 4] = {};
#pragma unroll
    for (int e = 0; e < kRun; ++e) {
      const int64_t k = k0 + run.col + e;
      const int64_t ma = m0 + run.row, nb = n0 + run.row;
      const uint32_t va = (ma < M && k < K) ? uint8_t(a[ma * K + k]) : 0u;
      const uint32_t vb = (nb < N && k < K) ? uint8_t(b[nb * K + k]) : 0u;
      wa[e / 4] |= va << (8 * (e % 4));
      wb[e / 4] |= vb << (8 * (e % 4));
    }
#pragma unroll
    for (int w = 0; w < kRun / 4; ++w) {
      As[run.row][run.col / 4 + w] = int32_t(wa[w]);
      Bs[run.row][run.col / 4 + w] = int32_t(wb[w]);
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      int32_t av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[out_row(t, i)][w];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[out_col(t, j)][w];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(av[i], bv[j], acc[i][j]);
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

template <class Epi>
void launch_int8_gemm_simt(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, Epi epi,
                           cudaStream_t stream) {
  const dim3 grid(ceil_div(N, L::simt::kBN), ceil_div(M, L::simt::kBM));
  int8_gemm_simt_kernel<Epi><<<grid, L::simt::kThreads, 0, stream>>>(a, b, M, N, K, epi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ============================================================================ weight-only, M <= 8
// kVec: K % 16 == 0 and 16-byte-aligned x and w, so every 16-element chunk is in bounds and
// one 128-bit load. Otherwise element loads with any K.
template <typename T, int kRows, bool kVec>
__global__ void __launch_bounds__(L::gemv::kWarpsPerBlock * 32)
    int8_wo_gemv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ scale,
                        const float* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  using namespace L::gemv;
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  if (n >= N) return;  // uniform per warp; no block-level synchronisation follows
  const int rows = int(M - m0 < kRows ? M - m0 : kRows);
  const int8_t* wr = w + n * K;
  const T* xr = x + m0 * K;

  float acc[kRows] = {};
  if constexpr (kVec) {
    for (int64_t step = 0;; ++step) {
      const int64_t k = vec_k(step, lane);
      if (k >= K) break;
      const int4 packed = *reinterpret_cast<const int4*>(wr + k);
      const int8_t* w8 = reinterpret_cast<const int8_t*>(&packed);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          float xf[16];
          load16(xr + r * K + k, xf);
#pragma unroll
          for (int e = 0; e < 16; ++e) acc[r] = fmaf(xf[e], float(w8[e]), acc[r]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float wf = float(wr[k]);
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) acc[r] = fmaf(Num<T>::to_f32(xr[r * K + k]), wf, acc[r]);
    }
  }
  const float s = scale[n];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float sum = warp_sum(acc[r]);
    if (lane == 0 && r < rows) out[(m0 + r) * N + n] = Num<T>::from_f32(scale_then_bias(sum, s, bias, n));
  }
}

// ============================================================================ weight-only, M > 8
// f16/bf16: dequantize the weight tile into shared memory as T and multiply on tensor cores
// (WMMA 16x16x16, fp32 accumulate). Products of an f16/bf16 value and an int8 are exact, so
// only the fp32 accumulation (its order, and the tensor core's internal rounding) differs
// from the reference.
template <typename T, bool kVec>
__global__ void __launch_bounds__(L::tiled::kThreads)
    int8_wo_wmma_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ scale,
                        const float* __restrict__ bias, T* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  using namespace L::tiled;
  namespace wmma = nvcuda::wmma;
  // Rows padded to 40 elements (80 bytes): keeps WMMA's 32-byte fragment alignment and
  // ldm % 8 == 0, and spreads consecutive rows over banks.
  constexpr int kLd = kBK + 8;
  constexpr int kLdC = kBN + 4;
  struct Tiles {
    T a[kBM][kLd];
    T b[kBN][kLd];
  };
  union Smem {
    Tiles tiles;
    float c[kBM][kLdC];  // the epilogue reuses the operand tiles' space
  };
  __shared__ __align__(128) Smem smem;

  const int t = threadIdx.x, warp = t / 32;
  const int wm = warp / 2, wn = warp % 2;  // 2x2 warps, 32x32 each
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const L::TileRun run = load_map(t);
  const int64_t xm = m0 + run.row, wnr = n0 + run.row;

  wmma_2x2::Acc acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    const int64_t k = k0 + run.col;
    T* sa = &smem.tiles.a[run.row][run.col];
    T* sb = &smem.tiles.b[run.row][run.col];
    if constexpr (kVec) {
      // K % 16 == 0: a run of 16 is entirely in or out of bounds.
      uint4 xa0 = make_uint4(0, 0, 0, 0), xa1 = xa0;
      if (xm < M && k < K) {
        const uint4* p = reinterpret_cast<const uint4*>(x + xm * K + k);
        xa0 = p[0], xa1 = p[1];
      }
      reinterpret_cast<uint4*>(sa)[0] = xa0;
      reinterpret_cast<uint4*>(sa)[1] = xa1;
      int4 wv = make_int4(0, 0, 0, 0);
      if (wnr < N && k < K) wv = *reinterpret_cast<const int4*>(w + wnr * K + k);
      const int8_t* w8 = reinterpret_cast<const int8_t*>(&wv);
#pragma unroll
      for (int e = 0; e < kRun; ++e) sb[e] = Num<T>::from_f32(float(w8[e]));
    } else {
#pragma unroll
      for (int e = 0; e < kRun; ++e) {
        const bool in_k = k + e < K;
        sa[e] = (xm < M && in_k) ? x[xm * K + k + e] : Num<T>::from_f32(0.f);
        sb[e] = Num<T>::from_f32((wnr < N && in_k) ? float(w[wnr * K + k + e]) : 0.f);
      }
    }
    __syncthreads();
    // The weight tile is [n][k], i.e. B = W^T stored column-major.
    wmma_2x2::mma_tile<kBK>(acc, smem.tiles.a, smem.tiles.b, wm, wn);
    __syncthreads();
  }
  wmma_2x2::store_tile(smem.c, acc, wm, wn);
  __syncthreads();
  for (int idx = t; idx < kBM * kBN; idx += kThreads) {
    const int r = idx / kBN, c = idx % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) out[m * N + n] = Num<T>::from_f32(scale_then_bias(smem.c[r][c], scale[n], bias, n));
  }
}

// f32: fp32 FMA (TF32 or f16 tensor cores would round x). Tiles are stored k-major so the
// inner loop reads a row of A and a row of B per k.
template <bool kVec>
__global__ void __launch_bounds__(L::tiled::kThreads32)
    int8_wo_simt_f32_kernel(const float* __restrict__ x, const int8_t* __restrict__ w,
                            const float* __restrict__ scale, const float* __restrict__ bias, float* __restrict__ out,
                            int64_t M, int64_t N, int64_t K) {
  using namespace L::tiled;
  __shared__ float As[kBK32][kBM + 4];
  __shared__ float Bs[kBK32][kBN + 4];
  const int t = threadIdx.x;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const L::TileRun run = load_map32(t);
  const int64_t xm = m0 + run.row, wnr = n0 + run.row;

  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBK32) {
    const int64_t k = k0 + run.col;
    float xv[kRun32], wv[kRun32];
    if constexpr (kVec) {
      // K % 4 == 0: a run of 4 is entirely in or out of bounds.
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      char4 c = make_char4(0, 0, 0, 0);
      if (xm < M && k < K) v = *reinterpret_cast<const float4*>(x + xm * K + k);
      if (wnr < N && k < K) c = *reinterpret_cast<const char4*>(w + wnr * K + k);
      xv[0] = v.x, xv[1] = v.y, xv[2] = v.z, xv[3] = v.w;
      wv[0] = c.x, wv[1] = c.y, wv[2] = c.z, wv[3] = c.w;
    } else {
#pragma unroll
      for (int e = 0; e < kRun32; ++e) {
        const bool in_k = k + e < K;
        xv[e] = (xm < M && in_k) ? x[xm * K + k + e] : 0.f;
        wv[e] = (wnr < N && in_k) ? float(w[wnr * K + k + e]) : 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < kRun32; ++e) {
      As[run.col + e][run.row] = xv[e];
      Bs[run.col + e][run.row] = wv[e];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK32; ++kk) {
      fma_4x4(As, Bs, kk, [&](int i) { return out_row32(t, i); }, [&](int j) { return out_col32(t, j); }, acc);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + out_row32(t, i), n = n0 + out_col32(t, j);
      if (m < M && n < N) out[m * N + n] = scale_then_bias(acc[i][j], scale[n], bias, n);
    }
}

// ============================================================================ host side
using namespace ::lowbit::cuda::host;

// A contiguous view can start at any byte; CUTLASS's 16-byte accesses need an aligned base.
at::Tensor aligned_copy_if_needed(const at::Tensor& t) { return aligned16(t.data_ptr()) ? t : t.clone(); }

bool cutlass_shape_ok(int64_t N, int64_t K) {
  return K % int8_cutlass::kAlignAB == 0 && N % int8_cutlass::kAlignOut == 0;
}

// ---------------------------------------------------------------------------- quantize
void launch_quantize_rows(const at::Tensor& x, at::Tensor& q, const at::Tensor& scale, bool dynamic,
                          cudaStream_t stream) {
  const int64_t K = x.size(-1), rows = x.numel() / K;
  // Short rows: a warp per row keeps all 8 warps of a block busy on different rows.
  const bool warp_per_row = K <= 1024;
  const int64_t blocks = warp_per_row ? ceil_div(rows, kQuantThreads / 32) : rows;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = warp_per_row ? (dynamic ? int8_quantize_rows_kernel<T, 32, true> : int8_quantize_rows_kernel<T, 32, false>)
                               : (dynamic ? int8_quantize_rows_kernel<T, kQuantThreads, true>
                                          : int8_quantize_rows_kernel<T, kQuantThreads, false>);
    kernel<<<blocks, kQuantThreads, 0, stream>>>(ptr<const T>(x), ptr<int8_t>(q), ptr<float>(scale), rows, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int64_t flat_blocks(int64_t numel) {
  // Grid-stride loops; a few waves of blocks are enough to saturate memory bandwidth.
  return std::min<int64_t>(ceil_div(numel, kQuantThreads), 4096);
}

std::tuple<at::Tensor, at::Tensor> int8_quantize_dynamic_cuda(const at::Tensor& x_in, bool per_row) {
  constexpr const char* op = "int8_quantize_dynamic";
  check_int8_quantize_dynamic(op, x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  if (per_row) {
    at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
    launch_quantize_rows(x, q, scale, /*dynamic=*/true, stream);
    return {q, scale};
  }
  at::Tensor scale = at::empty({}, x.options().dtype(at::kFloat));
  at::Tensor amax_bits = at::empty({1}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(amax_bits.data_ptr(), 0, sizeof(int32_t), stream));
  const int64_t numel = x.numel();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    int8_amax_kernel<T><<<flat_blocks(numel), kQuantThreads, 0, stream>>>(ptr<const T>(x), numel,
                                                                           ptr<unsigned int>(amax_bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    int8_quantize_flat_kernel<T, true><<<flat_blocks(numel), kQuantThreads, 0, stream>>>(
        ptr<const T>(x), ptr<int8_t>(q), amax_bits.data_ptr(), ptr<float>(scale), numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, scale};
}

at::Tensor int8_quantize_static_cuda(const at::Tensor& x_in, const at::Tensor& scale_in) {
  constexpr const char* op = "int8_quantize_static";
  check_int8_quantize_static(op, x_in, scale_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  // A [1]- or []-shaped scale with one row is both "scalar" and "per row": either way is right.
  if (scale.numel() == 1) {
    const int64_t numel = x.numel();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      int8_quantize_flat_kernel<T, false><<<flat_blocks(numel), kQuantThreads, 0, stream>>>(
          ptr<const T>(x), ptr<int8_t>(q), scale.data_ptr(), nullptr, numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    launch_quantize_rows(x, q, scale, /*dynamic=*/false, stream);
  }
  return q;
}

// ---------------------------------------------------------------------------- int8_mm
at::Tensor int8_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  constexpr const char* op = "int8_mm";
  check_int8_mm(op, a_in, b_in);
  c10::cuda::CUDAGuard guard(a_in.device());
  require_sm80(op);
  at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (cutlass_shape_ok(N, K)) {
    a = aligned_copy_if_needed(a);
    b = aligned_copy_if_needed(b);
    using Gemm = int8_cutlass::Int8Gemm;
    typename Gemm::Arguments args({int(M), int(N), int(K)}, {ptr<int8_t>(a), K}, {ptr<int8_t>(b), K},
                                  {ptr<int32_t>(out), N}, {ptr<int32_t>(out), N}, {});
    cutlass_host::run<Gemm>(args, a, op, stream);
    return out;
  }
  launch_int8_gemm_simt(ptr<const int8_t>(a), ptr<const int8_t>(b), M, N, K, EpiInt32{ptr<int32_t>(out), N}, stream);
  return out;
}

// ---------------------------------------------------------------------------- int8_scaled_mm
template <typename ElementD>
void run_scaled_cutlass(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                        const at::Tensor& scale_b, const float* bias, at::Tensor& out, cudaStream_t stream) {
  using Scaled = int8_cutlass::Int8ScaledGemm<ElementD>;
  using Gemm = typename Scaled::Gemm;
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  const auto evt = Scaled::Epilogue::arguments({}, ptr<const float>(scale_a), ptr<const float>(scale_b), bias,
                                                ptr<ElementD>(out), M, N);
  cutlass_host::run<Gemm>(cutlass_evt::sm80::arguments<Gemm>(evt, a.data_ptr(), b.data_ptr(), M, N, K), a,
                          "int8_scaled_mm", stream);
}

at::Tensor int8_scaled_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale_a_in,
                               const at::Tensor& scale_b_in, const std::optional<at::Tensor>& bias_in,
                               std::optional<c10::ScalarType> out_dtype_in) {
  constexpr const char* op = "int8_scaled_mm";
  const c10::ScalarType out_dtype =
      check_int8_scaled_mm(op, a_in, b_in, scale_a_in, scale_b_in, bias_in, out_dtype_in);
  c10::cuda::CUDAGuard guard(a_in.device());
  require_sm80(op);
  at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  // The reference adds float(bias): convert once here, the kernels read fp32.
  at::Tensor bias;
  if (bias_in.has_value()) bias = aligned_copy_if_needed(bias_in->to(at::kFloat).contiguous());
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (cutlass_shape_ok(N, K)) {
    a = aligned_copy_if_needed(a);
    b = aligned_copy_if_needed(b);
    // The visitor tree reads full vectors: expand scalar scales (M or N floats, negligible).
    const at::Tensor sa = scale_a_in.reshape({-1}).expand({M}).contiguous();
    const at::Tensor sb = aligned_copy_if_needed(scale_b_in.reshape({-1}).expand({N}).contiguous());
    cutlass_host::dispatch_output(out_dtype, [&](auto tag) {
      run_scaled_cutlass<typename decltype(tag)::type>(a, b, sa, sb, bias_ptr, out, stream);
    });
    return out;
  }
  const at::Tensor sa = scale_a_in.reshape({-1}).contiguous();
  const at::Tensor sb = scale_b_in.reshape({-1}).contiguous();
  dispatch_float(out_dtype, [&](auto tag) {
    using OutT = typename decltype(tag)::type;
    EpiScaled<OutT> epi{ptr<OutT>(out), N, ptr<const float>(sa), sa.numel() == 1 ? 0 : 1,
                        ptr<const float>(sb), sb.numel() == 1 ? 0 : 1, bias_ptr};
    launch_int8_gemm_simt(ptr<const int8_t>(a), ptr<const int8_t>(b), M, N, K, epi, stream);
  });
  return out;
}

// ---------------------------------------------------------------------------- int8_weight_only_mm
template <typename T, int kRows>
void launch_gemv(const at::Tensor& x, const at::Tensor& w, const float* scale, const float* bias, at::Tensor& out,
                 bool vec, cudaStream_t stream) {
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  const dim3 grid(ceil_div(N, L::gemv::kWarpsPerBlock), ceil_div(M, kRows));
  auto kernel = vec ? int8_wo_gemv_kernel<T, kRows, true> : int8_wo_gemv_kernel<T, kRows, false>;
  kernel<<<grid, L::gemv::kWarpsPerBlock * 32, 0, stream>>>(ptr<const T>(x), ptr<const int8_t>(w), scale, bias,
                                                             ptr<T>(out), M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor int8_weight_only_mm_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& scale_in,
                                    const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "int8_weight_only_mm";
  check_int8_weight_only_mm(op, x_in, w_in, scale_in, bias_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  // The reference multiplies by float(scale) and adds float(bias).
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;
  at::Tensor out = at::empty({M, N}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (M <= L::gemv::kMaxRows) {
      const bool vec = K % L::gemv::kVec == 0 && aligned16(x.data_ptr()) && aligned16(w.data_ptr());
      const float* s = ptr<const float>(scale);
      dispatch_gemv_rows(M, [&](auto rows) {
        launch_gemv<T, decltype(rows)::value>(x, w, s, bias_ptr, out, vec, stream);
      });
      return;
    }
    const dim3 grid(ceil_div(N, L::tiled::kBN), ceil_div(M, L::tiled::kBM));
    if constexpr (std::is_same_v<T, float>) {
      const bool vec = K % L::tiled::kRun32 == 0 && aligned16(x.data_ptr()) && aligned16(w.data_ptr());
      auto kernel = vec ? int8_wo_simt_f32_kernel<true> : int8_wo_simt_f32_kernel<false>;
      kernel<<<grid, L::tiled::kThreads32, 0, stream>>>(ptr<const float>(x), ptr<const int8_t>(w),
                                                         ptr<const float>(scale), bias_ptr, ptr<float>(out), M, N, K);
    } else {
      const bool vec = K % L::tiled::kRun == 0 && aligned16(x.data_ptr()) && aligned16(w.data_ptr());
      auto kernel = vec ? int8_wo_wmma_kernel<T, true> : int8_wo_wmma_kernel<T, false>;
      kernel<<<grid, L::tiled::kThreads, 0, stream>>>(ptr<const T>(x), ptr<const int8_t>(w), ptr<const float>(scale),
                                                       bias_ptr, ptr<T>(out), M, N, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("_cuda_int8_quantize_dynamic", &cuda::int8_quantize_dynamic_cuda);
  m.impl("_cuda_int8_quantize_static", &cuda::int8_quantize_static_cuda);
  m.impl("_cuda_int8_mm", &cuda::int8_mm_cuda);
  m.impl("_cuda_int8_scaled_mm", &cuda::int8_scaled_mm_cuda);
  m.impl("_cuda_int8_weight_only_mm", &cuda::int8_weight_only_mm_cuda);
}

}  // namespace lowbit
