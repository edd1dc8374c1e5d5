// Binary (XNOR-popcount) family, CUDA kernels (format: lowbit/formats/binary.py, spec:
// lowbit/backends/reference/binary.py). Unverified: nothing here has run on a GPU yet.
//
// * M > kGemvMaxRows: CUTLASS's b1 tensor-core GEMM (lowbit/cuda/binary_cutlass.cuh), AND-popc
//   (PTX has .xor.popc only on sm_80..sm_89) with the XNOR identity and the scales in its epilogue.
//   binary_prep_kernel feeds it: one pass per operand that counts each row's set bits (the
//   epilogue's terms) and, unless K % 128 == 0 and the base is 16-byte aligned, copies the rows
//   into whole 128-bit accesses with the padding bits cleared (binary_layout.h, gemm_path and
//   cutlass_needs_repack).
// * binary_gemv_kernel (small M, and shapes past CUTLASS's int / grid limits): __popc on CUDA
//   cores, one warp per output column, lanes over K words (coalesced reads of the weight row),
//   up to 8 rows of a per warp.
// * binary_quantize_kernel: one warp per row, 32 consecutive values per step; __ballot_sync of
//   !(x < 0) is the LSB-first word itself.
// Every kernel masks the last word of a row, so padding bits never count. The scaled epilogues
// use __fmul_rn / __fadd_rn: no FMA contraction, the reference's roundings exactly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "lowbit/binary_layout.h"
#include "lowbit/checks.h"
#include "lowbit/cuda/binary_cutlass.cuh"
#include "lowbit/cuda/common.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
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

// ----------------------------------------------------------------------------- CUTLASS prepass
constexpr int kPrepWarps = 4;

// One warp per row of an operand: the row's popcount over its K real bits becomes its epilogue
// term (cutlass_a_term / cutlass_b_term), and with kCopy the row is rewritten into `dst` as
// `row_words` words, padding bits and words past the row zero, for CUTLASS's 128-bit accesses.
template <bool kCopy, bool kIsA>
__global__ void __launch_bounds__(kPrepWarps * 32)
    binary_prep_kernel(const uint32_t* __restrict__ src, uint32_t* __restrict__ dst, int32_t* __restrict__ term,
                       int64_t rows, int64_t K, int64_t W, int64_t row_words) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kPrepWarps + threadIdx.x / 32;
  if (row >= rows) return;  // whole warp: no shuffle below is left half-populated
  const int64_t words = kCopy ? row_words : W;
  int32_t count = 0;  // <= K < 2^31
  for (int64_t w = lane; w < words; w += 32) {
    const uint32_t v = bl::cutlass_operand_word(src + row * W, K, W, w);
    if constexpr (kCopy) dst[row * row_words + w] = v;
    count += __popc(v);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) count += __shfl_xor_sync(0xffffffffu, count, off);
  if (lane == 0) term[row] = kIsA ? bl::cutlass_a_term(K, count) : bl::cutlass_b_term(count);
}

// ----------------------------------------------------------------------------- small M
constexpr int kGemvWarps = 4;
using bl::kGemvMaxRows;

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
template <typename OutT>
void launch_gemv(const uint32_t* a, const uint32_t* b, OutT* out, int64_t M, int64_t N, int64_t K, int64_t W,
                 const Scales& s, cudaStream_t stream) {
  const int64_t blocks_n = ceil_div(N, kGemvWarps);
  if (M == 1) {
    binary_gemv_kernel<1, OutT><<<dim3(blocks_n, 1), kGemvWarps * 32, 0, stream>>>(a, b, out, M, N, K, W, s);
  } else if (M <= 4) {
    binary_gemv_kernel<4, OutT><<<dim3(blocks_n, 1), kGemvWarps * 32, 0, stream>>>(a, b, out, M, N, K, W, s);
  } else {
    // Only shapes past CUTLASS's limits bring M > kGemvMaxRows here: grid.y caps a launch's rows.
    constexpr int64_t kRowsPerLaunch = kGemvMaxRows * bl::kMaxGridY;
    for (int64_t m0 = 0; m0 < M; m0 += kRowsPerLaunch) {
      const int64_t rows = std::min(M - m0, kRowsPerLaunch);
      Scales part = s;
      if (part.a != nullptr && part.a_per_row) part.a += m0;
      binary_gemv_kernel<kGemvMaxRows, OutT><<<dim3(blocks_n, ceil_div(rows, kGemvMaxRows)), kGemvWarps * 32, 0,
                                               stream>>>(a + m0 * W, b, out + m0 * N, rows, N, K, W, part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// An operand as CUTLASS reads it: words with cutlass_row_words(K) per row, and per-row terms.
struct Operand {
  at::Tensor words;
  at::Tensor term;
};

template <bool kIsA>
Operand prepare_operand(const at::Tensor& t, int64_t K, cudaStream_t stream) {
  const int64_t rows = t.size(0), W = t.size(1), row_words = bl::cutlass_row_words(K);
  Operand o;
  o.term = at::empty({rows}, t.options().dtype(at::kInt));
  const bool copy = bl::cutlass_needs_repack(K, aligned16(t.data_ptr()));
  o.words = copy ? at::empty({rows, row_words}, t.options()) : t;
  auto kernel = copy ? binary_prep_kernel<true, kIsA> : binary_prep_kernel<false, kIsA>;
  kernel<<<ceil_div(rows, kPrepWarps), kPrepWarps * 32, 0, stream>>>(
      ptr<const uint32_t>(t), copy ? ptr<uint32_t>(o.words) : nullptr, ptr<int32_t>(o.term), rows, K, W, row_words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o;
}

// ElementD: int32_t (binary_mm) or the CUTLASS float type of the output (binary_scaled_mm, with
// scale_a [M], scale_b [N] and bias [N] or nullptr, all fp32).
template <typename ElementD>
void launch_cutlass(const at::Tensor& a, const at::Tensor& b, int64_t K, const float* scale_a, const float* scale_b,
                    const float* bias, at::Tensor& out, const char* op, cudaStream_t stream) {
  using BinaryGemm = binary_cutlass::BinaryGemm<ElementD>;
  using Gemm = typename BinaryGemm::Gemm;
  const int64_t M = a.size(0), N = b.size(0), k_bits = bl::cutlass_row_words(K) * bl::kWordBits;
  const Operand pa = prepare_operand<true>(a, K, stream);
  const Operand pb = prepare_operand<false>(b, K, stream);
  const auto evt = BinaryGemm::epilogue_args(ptr<const int32_t>(pa.term), ptr<const int32_t>(pb.term), scale_a,
                                            scale_b, bias, ptr<ElementD>(out), M, N);
  // K in bits: the operands are b1 elements.
  cutlass_host::run<Gemm>(
      cutlass_evt::sm80::arguments<Gemm>(evt, pa.words.data_ptr(), pb.words.data_ptr(), M, N, k_bits), a, op,
      stream);
}

at::Tensor binary_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, int64_t K) {
  constexpr const char* op = "binary_mm";
  check_binary_mm(op, a_in, b_in, K);
  c10::cuda::CUDAGuard guard(a_in.device());
  require_sm80(op);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (bl::gemm_path(M, N, K) == bl::GemmPath::kCutlass) {
    launch_cutlass<int32_t>(a, b, K, nullptr, nullptr, nullptr, out, op, stream);
  } else {
    launch_gemv<int32_t>(ptr<const uint32_t>(a), ptr<const uint32_t>(b), ptr<int32_t>(out), M, N, K, W,
                         Scales{nullptr, nullptr, false, false, nullptr}, stream);
  }
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
  const int64_t M = a.size(0), N = b.size(0), W = a.size(1);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_type));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (bl::gemm_path(M, N, K) == bl::GemmPath::kCutlass) {
    // The visitor tree reads full vectors: expand scalar scales (M or N floats, negligible).
    const at::Tensor sa = scale_a.reshape({-1}).expand({M}).contiguous();
    const at::Tensor sb = scale_b.reshape({-1}).expand({N}).contiguous();
    const float *sa_ptr = ptr<const float>(sa), *sb_ptr = ptr<const float>(sb);
    cutlass_host::dispatch_output(out_type, [&](auto tag) {
      launch_cutlass<typename decltype(tag)::type>(a, b, K, sa_ptr, sb_ptr, bias_ptr, out, op, stream);
    });
    return out;
  }
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const Scales s{ptr<const float>(sa), ptr<const float>(sb), sa.numel() > 1, sb.numel() > 1, bias_ptr};
  dispatch_float(out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_gemv<T>(ptr<const uint32_t>(a), ptr<const uint32_t>(b), ptr<T>(out), M, N, K, W, s, stream);
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
