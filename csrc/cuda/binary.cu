// Binary (XNOR-popcount) family, CUDA kernels (format: lowbit/formats/binary.py, spec:
// lowbit/backends/reference/binary.py). Unverified: nothing here has run on a GPU yet.
//
// * binary_mma_kernel (M > kGemvMaxRows): 1-bit tensor cores, mma.sync.m16n8k256 b1 with
//   .and.popc. PTX has .xor.popc only on sm_80..sm_89, so one path serves sm_80..sm_90:
//   popc(a ^ b) = popc(a) + popc(b) - 2 popc(a & b), with popc(a) / popc(b) of each row counted
//   by the threads that stage the tiles (binary_layout.h, dot_from_and_count).
// * binary_gemv_kernel (small M): __popc on CUDA cores, one warp per output column, lanes over
//   K words (coalesced reads of the weight row), up to kGemvMaxRows rows of a per warp.
// * binary_quantize_kernel: one warp per row, 32 consecutive values per step; __ballot_sync of
//   !(x < 0) is the LSB-first word itself.
// Every kernel masks the last word of a row, so padding bits never count. The scaled epilogue
// uses __fmul_rn / __fadd_rn: no FMA contraction, the reference's roundings exactly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "lowbit/binary_layout.h"
#include "lowbit/checks.h"
#include "lowbit/cuda/host.cuh"

namespace lowbit {
namespace cuda {
namespace {

namespace bl = binary_layout;
using namespace host;

// ----------------------------------------------------------------------------- epilogue
struct Scales {
  const float* a;  // [M] or [1]
  const float* b;  // [N] or [1]
  bool a_per_row, b_per_col;
  const float* bias;  // fp32 [N] or nullptr
};

__device__ __forceinline__ void store_float(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_float(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// OutT int32_t: the dot product; a float type: float(dot) * sa * sb + bias, rounded per operation.
template <typename OutT>
__device__ __forceinline__ void store_dot(OutT* out, int64_t M, int64_t N, int64_t m, int64_t n, int32_t dot,
                                          const Scales& s) {
  if (m >= M || n >= N) return;
  if constexpr (std::is_same_v<OutT, int32_t>) {
    out[m * N + n] = dot;
  } else {
    float v = __fmul_rn(static_cast<float>(dot), s.a[s.a_per_row ? m : 0]);
    v = __fmul_rn(v, s.b[s.b_per_col ? n : 0]);
    if (s.bias != nullptr) v = __fadd_rn(v, s.bias[n]);
    store_float(out + m * N + n, v);
  }
}

// ----------------------------------------------------------------------------- tensor cores
namespace mma {
constexpr int kBM = 64, kBN = 64;   // block tile
constexpr int kWords = 8;           // 256 bits: one mma k-step
constexpr int kStride = 12;         // smem row stride in words: (8 g + t) -> (12 g + t) is bank-conflict free
constexpr int kThreads = 128;       // 4 warps, 2 x 2, each 32 x 32 = 2 m16 x 4 n8 mma tiles
constexpr int kWordsPerThread = kBM * kWords / kThreads;  // 4 (same for B: kBN == kBM)
}  // namespace mma

__device__ __forceinline__ void mma_b1_and_popc(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Thread t stages row t / 2, words 4 (t % 2) .. + 3 of each k-step, for A and for B: a fixed
// row per thread, so it can count that row's set bits on the way (for the AND -> XOR identity).
__device__ __forceinline__ void load_words(const uint32_t* base, int64_t rows, int64_t row, int64_t W, int64_t K,
                                           int64_t w0, uint32_t (&v)[mma::kWordsPerThread]) {
#pragma unroll
  for (int i = 0; i < mma::kWordsPerThread; ++i) {
    const int64_t w = w0 + i;
    v[i] = (row < rows && w < W) ? (base[row * W + w] & bl::word_mask(K, w)) : 0u;
  }
}

// minBlocks 1: with __launch_bounds__(128) alone, ptxas for sm_90a capped the kernel at 72
// registers and spilled 64 bytes; it needs 80, and 128 threads x 80 registers still leave room
// for 6 blocks per SM.
template <typename OutT>
__global__ void __launch_bounds__(mma::kThreads, 1)
    binary_mma_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, OutT* __restrict__ out,
                      int64_t M, int64_t N, int64_t K, int64_t W, Scales scales) {
  using namespace mma;
  __shared__ uint32_t As[2][kBM * kStride];
  __shared__ uint32_t Bs[2][kBN * kStride];
  __shared__ int32_t pop_a[kBM], pop_b[kBN];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = int64_t(blockIdx.y) * kBM, n0 = int64_t(blockIdx.x) * kBN;
  const int stage_row = tid / 2, stage_word = (tid % 2) * kWordsPerThread;
  if (tid < kBM) pop_a[tid] = 0;
  if (tid < kBN) pop_b[tid] = 0;

  int32_t acc[2][4][4] = {};
  int32_t my_pop_a = 0, my_pop_b = 0;
  uint32_t va[kWordsPerThread], vb[kWordsPerThread];
  const int64_t steps = (W + kWords - 1) / kWords;

  // Registers hold the next step's words while the tensor cores work on the current one.
  load_words(a, M, m0 + stage_row, W, K, stage_word, va);
  load_words(b, N, n0 + stage_row, W, K, stage_word, vb);
  for (int64_t s = 0; s < steps; ++s) {
    const int buf = s % 2;
#pragma unroll
    for (int i = 0; i < kWordsPerThread; ++i) {
      As[buf][stage_row * kStride + stage_word + i] = va[i];
      Bs[buf][stage_row * kStride + stage_word + i] = vb[i];
      my_pop_a += __popc(va[i]);
      my_pop_b += __popc(vb[i]);
    }
    __syncthreads();
    if (s + 1 < steps) {
      load_words(a, M, m0 + stage_row, W, K, (s + 1) * kWords + stage_word, va);
      load_words(b, N, n0 + stage_row, W, K, (s + 1) * kWords + stage_word, vb);
    }
    uint32_t af[2][4], bf[4][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bl::RowWord f = bl::mma_b1_a_frag(lane, i);
        af[mt][i] = As[buf][(wm * 32 + mt * 16 + f.row) * kStride + f.word];
      }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bl::RowWord f = bl::mma_b1_b_frag(lane, i);
        bf[nt][i] = Bs[buf][(wn * 32 + nt * 8 + f.row) * kStride + f.word];
      }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma_b1_and_popc(acc[mt][nt], af[mt], bf[nt]);
    // Double-buffered smem: the next step writes the other buffer, so one barrier per step.
  }
  atomicAdd(&pop_a[stage_row], my_pop_a);
  atomicAdd(&pop_b[stage_row], my_pop_b);
  __syncthreads();

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bl::RowCol c = bl::mma_b1_c_frag(lane, i);
        const int r = wm * 32 + mt * 16 + c.row, col = wn * 32 + nt * 8 + c.col;
        const int32_t dot = bl::dot_from_and_count(K, pop_a[r], pop_b[col], acc[mt][nt][i]);
        store_dot(out, M, N, m0 + r, n0 + col, dot, scales);
      }
}

// ----------------------------------------------------------------------------- small M
constexpr int kGemvWarps = 4;
constexpr int kGemvMaxRows = 8;

template <int kRows, typename OutT>
__global__ void __launch_bounds__(kGemvWarps * 32)
    binary_gemv_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, OutT* __restrict__ out,
                       int64_t M, int64_t N, int64_t K, int64_t W, Scales scales) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t m0 = int64_t(blockIdx.y) * kRows;
  if (n >= N) return;  // whole warp: no shuffle below is left half-populated
  int32_t count[kRows] = {};
  for (int64_t w = lane; w < W; w += 32) {
    const uint32_t bw = b[n * W + w];
    const uint32_t mask = bl::word_mask(K, w);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (m0 + r < M) count[r] += __popc((a[(m0 + r) * W + w] ^ bw) & mask);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) count[r] += __shfl_xor_sync(0xffffffffu, count[r], off);
    if (lane == 0) store_dot(out, M, N, m0 + r, n, bl::dot_from_xor_count(K, count[r]), scales);
  }
}

// ----------------------------------------------------------------------------- quantize
constexpr int kQuantWarps = 4;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

template <typename T>
__global__ void __launch_bounds__(kQuantWarps * 32)
    binary_quantize_kernel(const T* __restrict__ x, uint32_t* __restrict__ packed, float* __restrict__ scale,
                           int64_t M, int64_t K, int64_t W) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kQuantWarps + threadIdx.x / 32;
  if (row >= M) return;
  const T* xr = x + row * K;
  float sum = 0.0f;
  for (int64_t w = 0; w < W; ++w) {
    const int64_t k = w * 32 + lane;
    const float v = k < K ? to_float(xr[k]) : -1.0f;  // columns past K: bit 0
    const uint32_t word = __ballot_sync(0xffffffffu, !(v < 0.0f));
    if (lane == 0) packed[row * W + w] = word;
    if (k < K) sum += fabsf(v);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) scale[row] = sum / static_cast<float>(K);
}

// ----------------------------------------------------------------------------- launchers
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename OutT>
void launch_gemm(const at::Tensor& a, const at::Tensor& b, int64_t K, at::Tensor& out, const Scales& s) {
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  const auto* ap = ptr<const uint32_t>(a);
  const auto* bp = ptr<const uint32_t>(b);
  OutT* op = ptr<OutT>(out);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (M <= kGemvMaxRows) {
    const dim3 grid(ceil_div(N, kGemvWarps), 1);
    if (M == 1) binary_gemv_kernel<1, OutT><<<grid, kGemvWarps * 32, 0, stream>>>(ap, bp, op, M, N, K, W, s);
    else if (M <= 4) binary_gemv_kernel<4, OutT><<<grid, kGemvWarps * 32, 0, stream>>>(ap, bp, op, M, N, K, W, s);
    else binary_gemv_kernel<8, OutT><<<grid, kGemvWarps * 32, 0, stream>>>(ap, bp, op, M, N, K, W, s);
  } else {
    const dim3 grid(ceil_div(N, mma::kBN), ceil_div(M, mma::kBM));
    binary_mma_kernel<OutT><<<grid, mma::kThreads, 0, stream>>>(ap, bp, op, M, N, K, W, s);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor binary_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, int64_t K) {
  constexpr const char* op = "binary_mm";
  check_binary_mm(op, a_in, b_in, K);
  c10::cuda::CUDAGuard guard(a_in.device());
  require_sm80(op);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  launch_gemm<int32_t>(a, b, K, out, Scales{nullptr, nullptr, false, false, nullptr});
  return out;
}

at::Tensor binary_scaled_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, int64_t K, const at::Tensor& scale_a,
                                 const at::Tensor& scale_b, const std::optional<at::Tensor>& bias_in,
                                 std::optional<c10::ScalarType> out_dtype) {
  constexpr const char* op = "binary_scaled_mm";
  const c10::ScalarType out_type = check_binary_scaled_mm(op, a_in, b_in, K, scale_a, scale_b, bias_in, out_dtype);
  c10::cuda::CUDAGuard guard(a_in.device());
  require_sm80(op);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const Scales s{ptr<const float>(sa), ptr<const float>(sb), sa.numel() > 1, sb.numel() > 1,
                 bias.defined() ? ptr<const float>(bias) : nullptr};
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(out_type));
  dispatch_float(out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_gemm<T>(a, b, K, out, s);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> binary_quantize_cuda(const at::Tensor& x_in) {
  constexpr const char* op = "binary_quantize";
  check_binary_quantize(op, x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), W = bl::num_words(K);
  at::Tensor packed = at::empty({M, W}, x.options().dtype(at::kInt));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    binary_quantize_kernel<T><<<ceil_div(M, kQuantWarps), kQuantWarps * 32, 0, stream>>>(
        ptr<const T>(x), ptr<uint32_t>(packed), ptr<float>(scale), M, K, W);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, scale};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("_cuda_binary_quantize", &cuda::binary_quantize_cuda);
  m.impl("_cuda_binary_mm", &cuda::binary_mm_cuda);
  m.impl("_cuda_binary_scaled_mm", &cuda::binary_scaled_mm_cuda);
}

}  // namespace lowbit
