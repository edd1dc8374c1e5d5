// SPARSE24 family, CUDA kernels for the `_cuda_<op>` twins declared in lowbit/_ops.py.
// UNVERIFIED: compiled (scripts/check_cu.sh) but never run on a GPU; not in backends/verified.py.
//
// Which kernel serves a call:
//   sparse24_mm              fp16/bf16 x with values of the same dtype, no scale, N % 32 == 0,
//                            Kp % 64 == 0: CUTLASS 2.x SparseGemm (sm_80 mma.sp, 2:4 on the
//                            tensor cores) computing out^T[N, M] = W[N, Kp] (sparse, the kept
//                            values as CUTLASS's compressed A) x x^T[Kp, M] in fp32, then an
//                            epilogue kernel (bias, rounding to x's dtype, as the reference).
//   sparse24_int8_scaled_mm  N % 32 == 0, Kp % 128 == 0: the int8 SparseGemm (int32, exact),
//                            then float(acc) * scale_a * scale_b + bias, each step rounded.
//   anything else            a SIMT kernel: one warp per (row of x, output channel), lanes over
//                            the kept values (coalesced), the activation gathered by metadata.
// CUTLASS reads the metadata reordered (ColumnMajorInterleaved<2>, reorder_meta): a small
// kernel scatters lowbit's row-major nibbles with sparse24_layout::cutlass_meta_offset, which
// tests/test_sparse24.py checks on the CPU against torch's own port of reorder_meta.
// Metadata validity is checked on the device (one flag), and on failure the message comes from
// the same host check as the CPU kernel. Reading the flag is a device sync, so it runs once per
// metadata tensor and content version, not per call: lowbit::ValidationCache
// (lowbit/validated_once.h; the guarantee and its limits are there and in docs/ops.md). A cache hit
// costs a hash lookup and no sync, which also lets a warmed-up call be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_sparse.h"

#include "lowbit/checks.h"
#include "lowbit/cuda/common.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/host.cuh"
#include "lowbit/sparse24_layout.h"
#include "lowbit/validated_once.h"

namespace lowbit {
namespace cuda {
namespace {

namespace L = ::lowbit::sparse24_layout;

// ============================================================================ CUTLASS types
// A = kept values [N, Kp/2] RowMajor (compressed), B = x as ColumnMajor [Kp, M], D = fp32 / int32
// RowMajor [N, M] (CUTLASS's sparse kernels have a RowMajor epilogue only): the epilogue kernel
// reads it transposed. D is stored one element per access, so any M works. Tiles: the CUTLASS
// profiler's sm_80 sparse defaults.
template <typename T>
using SparseGemm16 = cutlass::gemm::device::SparseGemm<
    T, cutlass::layout::RowMajor, T, cutlass::layout::ColumnMajor, float, cutlass::layout::RowMajor, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 64>,
    cutlass::gemm::GemmShape<64, 64, 64>, cutlass::gemm::GemmShape<16, 8, 32>,
    cutlass::epilogue::thread::LinearCombination<float, 1, float, float,
                                                 cutlass::epilogue::thread::ScaleType::Nothing>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3>;

using SparseGemmInt8 = cutlass::gemm::device::SparseGemm<
    int8_t, cutlass::layout::RowMajor, int8_t, cutlass::layout::ColumnMajor, int32_t, cutlass::layout::RowMajor,
    int32_t, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 128>,
    cutlass::gemm::GemmShape<64, 64, 128>, cutlass::gemm::GemmShape<16, 8, 64>,
    cutlass::epilogue::thread::LinearCombination<int32_t, 1, int32_t, int32_t,
                                                 cutlass::epilogue::thread::ScaleType::Nothing>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3>;

constexpr int64_t kCutlassRows = 32;     // reorder_meta interleaves rows in blocks of 32 (16-bit E)
constexpr int64_t kCutlassK16 = 64;      // threadblock K of the 16-bit GEMM
constexpr int64_t kCutlassK8 = 128;      // threadblock K of the int8 GEMM

// ============================================================================ kernels
// Row-major metadata elements (uint16: 4 groups, uint32: 8 groups) -> CUTLASS's reordered array.
template <typename E>
__global__ void sparse24_reorder_meta_kernel(const E* __restrict__ meta, E* __restrict__ out, int64_t rows, int64_t cols,
                                    bool int8_values) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  out[L::cutlass_meta_offset(i / cols, i % cols, rows, int8_values)] = meta[i];
}

__global__ void sparse24_meta_valid_kernel(const uint8_t* __restrict__ meta, int64_t n, int* __restrict__ bad) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (!L::byte_valid(meta[i])) atomicOr(bad, 1);
}

// out[m, n] = round_T(acc[n, m] * scale[n] + bias[n]) from the fp32 [N, M] GEMM result.
template <typename T>
__global__ void sparse24_float_epilogue_kernel(const float* __restrict__ acc, T* __restrict__ out, const float* __restrict__ scale,
                                      const float* __restrict__ bias, int64_t M, int64_t N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  float y = acc[n * M + m];
  if (scale) y = __fmul_rn(y, scale[n]);
  if (bias) y = __fadd_rn(y, bias[n]);
  out[i] = Num<T>::from_f32(y);
}

template <typename T>
__global__ void sparse24_int8_epilogue_kernel(const int32_t* __restrict__ acc, T* __restrict__ out,
                                     const float* __restrict__ scale_a, int64_t stride_a,
                                     const float* __restrict__ scale_b, int64_t stride_b,
                                     const float* __restrict__ bias, int64_t M, int64_t N) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  float y = __fmul_rn(__int2float_rn(acc[n * M + m]), scale_a[m * stride_a]);
  y = __fmul_rn(y, scale_b[n * stride_b]);
  if (bias) y = __fadd_rn(y, bias[n]);
  out[i] = Num<T>::from_f32(y);
}

template <typename V>
__device__ __forceinline__ float value_f32(V v) { return Num<V>::to_f32(v); }
template <>
__device__ __forceinline__ float value_f32<int8_t>(int8_t v) { return float(v); }

// SIMT: warp (m, n) sums over the row's kept values; lane l takes values l, l + 32, ...
// x is fp32 [M, Kp] zero-padded (converted by the host), values and meta contiguous.
template <typename V>
__global__ void sparse24_simt_float_kernel(const float* __restrict__ x, const V* __restrict__ values,
                                  const uint8_t* __restrict__ meta, float* __restrict__ acc, int64_t M, int64_t N,
                                  int64_t Kp) {
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t m = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const V* v = values + n * (Kp / 2);
  const uint8_t* mrow = meta + n * (Kp / 8);
  const float* xr = x + m * Kp;
  float s = 0.f;
  for (int64_t j = lane; j < Kp / 2; j += 32) s = fmaf(value_f32(v[j]), xr[L::kept_column(mrow, j)], s);
  s = warp_sum(s);
  if (lane == 0) acc[n * M + m] = s;
}

__global__ void sparse24_simt_int8_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ values,
                                 const uint8_t* __restrict__ meta, int32_t* __restrict__ acc, int64_t M, int64_t N,
                                 int64_t Kp) {
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t m = blockIdx.y;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int8_t* v = values + n * (Kp / 2);
  const uint8_t* mrow = meta + n * (Kp / 8);
  const int8_t* ar = a + m * Kp;
  int32_t s = 0;
  for (int64_t j = lane; j < Kp / 2; j += 32) s += int32_t(v[j]) * int32_t(ar[L::kept_column(mrow, j)]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (lane == 0) acc[n * M + m] = s;
}

// ============================================================================ host side
using namespace ::lowbit::cuda::host;

// The data check of every backend, on the device: one flag; the message from the host check.
void check_meta_on_device(const char* op, const at::Tensor& meta, cudaStream_t stream) {
  at::Tensor bad = at::zeros({1}, meta.options().dtype(at::kInt));
  const int64_t n = meta.numel();
  const int blocks = int(std::min<int64_t>(ceil_div(n, 256), 1024));
  sparse24_meta_valid_kernel<<<blocks, 256, 0, stream>>>(meta.const_data_ptr<uint8_t>(), n, ptr<int>(bad));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (bad.item<int>() != 0) check_sparse24_meta_data(op, meta.cpu());
}

// Invalid metadata must never reach mma.sp (undefined behaviour), but checking it costs a sync:
// check once per tensor and content version (the key is taken before the check, so a write
// racing with it makes the next call check again). A miss under CUDA-graph capture cannot sync:
// it fails with a message saying to warm up first, before anything illegal is enqueued.
// Not chosen: a device-side flag that every kernel (CUTLASS's too) reads and exits on. It would
// need no cache, but a bad meta would then give an unfinished output and no ValueError, since
// raising one needs the flag on the host.
void check_meta_once(const char* op, const at::Tensor& meta, const at::Tensor& meta_c, cudaStream_t stream) {
  ValidationCache& cache = validation_cache();
  const std::optional<ValidationCache::Key> key = cache.key(meta, L::kMetaNibblesValid);
  if (key && cache.contains(*key)) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone, "lowbit.", op,
              ": meta has not been validated in its current state (new, modified in place, an inference "
              "tensor, or the validation cache was cleared or disabled), and validating it needs a device "
              "sync, which CUDA-graph capture forbids: run the op once with this meta before capturing");
  check_meta_on_device(op, meta_c, stream);
  if (key) cache.record(meta, *key);
}

// x [M, K] -> [M, Kp] contiguous in `dtype`, zero past K (a view when it already is one).
at::Tensor padded_rows(const at::Tensor& x, int64_t Kp, c10::ScalarType dtype) {
  if (x.scalar_type() == dtype && x.size(1) == Kp && x.is_contiguous() && aligned16(x.data_ptr())) return x;
  at::Tensor out = at::zeros({x.size(0), Kp}, x.options().dtype(dtype));
  out.narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

template <typename E>
at::Tensor reordered_meta(const at::Tensor& meta, int64_t N, bool int8_values, cudaStream_t stream) {
  const int64_t cols = meta.size(1) * 8 / (8 * int64_t(sizeof(E)));
  at::Tensor out = at::empty({N, cols * int64_t(sizeof(E))}, meta.options());
  sparse24_reorder_meta_kernel<E><<<unsigned(ceil_div(N * cols, 256)), 256, 0, stream>>>(
      reinterpret_cast<const E*>(meta.const_data_ptr<uint8_t>()), reinterpret_cast<E*>(out.data_ptr<uint8_t>()), N,
      cols, int8_values);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void launch_float_epilogue(const at::Tensor& acc, at::Tensor& out, const at::Tensor& scale, const at::Tensor& bias,
                           cudaStream_t stream) {
  const int64_t M = out.size(0), N = out.size(1);
  const float* s = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  const float* b = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    sparse24_float_epilogue_kernel<T><<<unsigned(ceil_div(M * N, 256)), 256, 0, stream>>>(acc.const_data_ptr<float>(),
                                                                                ptr<T>(out), s, b, M, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sparse24_mm_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  const char* op = "sparse24_mm";
  check_sparse24_mm(op, x, values, meta, scale, bias, nullptr);
  require_sm80(op);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor meta_c = meta.contiguous();
  check_meta_once(op, meta, meta_c, stream);
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0), Kp = L::padded_k(K);
  const at::Tensor v = values.contiguous();
  const at::Tensor s = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor acc = at::empty({N, M}, x.options().dtype(at::kFloat));
  const auto xt = x.scalar_type();
  const bool tensor_cores = (xt == at::kHalf || xt == at::kBFloat16) && v.scalar_type() == xt &&
                            N % kCutlassRows == 0 && Kp % kCutlassK16 == 0 && aligned16(v.data_ptr());
  if (tensor_cores) {
    const at::Tensor xp = padded_rows(x, Kp, xt);
    const at::Tensor e = reordered_meta<uint16_t>(meta_c, N, false, stream);
    auto run = [&](auto tag) {
      using T = typename decltype(tag)::type;
      using Gemm = SparseGemm16<T>;
      using E = typename Gemm::ElementE;
      typename Gemm::LayoutE layout_e(int(N * 2));
      typename Gemm::Arguments args({int(N), int(M), int(Kp)}, {reinterpret_cast<const T*>(v.const_data_ptr()), Kp / 2},
                                    {reinterpret_cast<const T*>(xp.const_data_ptr()), Kp},
                                    {acc.data_ptr<float>(), M}, {acc.data_ptr<float>(), M},
                                    {reinterpret_cast<E*>(e.data_ptr<uint8_t>()), layout_e});
      cutlass_host::run<Gemm>(args, x, op, stream);
    };
    if (xt == at::kHalf) run(Tag<cutlass::half_t>{});
    else run(Tag<cutlass::bfloat16_t>{});
  } else {
    const at::Tensor xp = padded_rows(x, Kp, at::kFloat);
    const dim3 grid(unsigned(ceil_div(N, 4)), unsigned(M));
    auto launch = [&](auto* vp) {
      using V = std::remove_const_t<std::remove_pointer_t<decltype(vp)>>;
      sparse24_simt_float_kernel<V><<<grid, 128, 0, stream>>>(xp.const_data_ptr<float>(), vp, meta_c.const_data_ptr<uint8_t>(),
                                                     acc.data_ptr<float>(), M, N, Kp);
    };
    switch (v.scalar_type()) {
      case at::kHalf: launch(reinterpret_cast<const __half*>(v.const_data_ptr())); break;
      case at::kBFloat16: launch(reinterpret_cast<const __nv_bfloat16*>(v.const_data_ptr())); break;
      case at::kChar: launch(v.const_data_ptr<int8_t>()); break;
      default: launch(v.const_data_ptr<float>()); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_float_epilogue(acc, out, s, b32, stream);
  return out;
}

at::Tensor sparse24_int8_scaled_mm_cuda(const at::Tensor& a, const at::Tensor& values, const at::Tensor& meta,
                                        const at::Tensor& scale_a, const at::Tensor& scale_b,
                                        const std::optional<at::Tensor>& bias,
                                        std::optional<c10::ScalarType> out_dtype) {
  const char* op = "sparse24_int8_scaled_mm";
  const c10::ScalarType out_type =
      check_sparse24_int8_scaled_mm(op, a, values, meta, scale_a, scale_b, bias, out_dtype, nullptr);
  require_sm80(op);
  const c10::cuda::CUDAGuard guard(a.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor meta_c = meta.contiguous();
  check_meta_once(op, meta, meta_c, stream);
  const int64_t M = a.size(0), K = a.size(1), N = values.size(0), Kp = L::padded_k(K);
  const at::Tensor v = values.contiguous();
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor ap = padded_rows(a, Kp, at::kChar);
  at::Tensor acc = at::empty({N, M}, a.options().dtype(at::kInt));
  if (N % kCutlassRows == 0 && Kp % kCutlassK8 == 0 && aligned16(v.data_ptr())) {
    using Gemm = SparseGemmInt8;
    using E = typename Gemm::ElementE;
    const at::Tensor e = reordered_meta<uint32_t>(meta_c, N, true, stream);
    typename Gemm::LayoutE layout_e(int(N * 2));
    typename Gemm::Arguments args({int(N), int(M), int(Kp)}, {v.const_data_ptr<int8_t>(), Kp / 2},
                                  {ap.const_data_ptr<int8_t>(), Kp}, {acc.data_ptr<int32_t>(), M},
                                  {acc.data_ptr<int32_t>(), M}, {reinterpret_cast<E*>(e.data_ptr<uint8_t>()), layout_e});
    cutlass_host::run<Gemm>(args, a, op, stream);
  } else {
    const dim3 grid(unsigned(ceil_div(N, 4)), unsigned(M));
    sparse24_simt_int8_kernel<<<grid, 128, 0, stream>>>(ap.const_data_ptr<int8_t>(), v.const_data_ptr<int8_t>(),
                                               meta_c.const_data_ptr<uint8_t>(), acc.data_ptr<int32_t>(), M, N, Kp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_type));
  const float* bp = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  dispatch_float(out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    sparse24_int8_epilogue_kernel<T><<<unsigned(ceil_div(M * N, 256)), 256, 0, stream>>>(
        acc.const_data_ptr<int32_t>(), ptr<T>(out), sa.const_data_ptr<float>(), sa.numel() == 1 ? 0 : 1,
        sb.const_data_ptr<float>(), sb.numel() == 1 ? 0 : 1, bp, M, N);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("_cuda_sparse24_mm", &cuda::sparse24_mm_cuda);
  m.impl("_cuda_sparse24_int8_scaled_mm", &cuda::sparse24_int8_scaled_mm_cuda);
}

}  // namespace lowbit
