// INT4 family, cutlass_sm90 layout, CUDA kernels (layout: lowbit/formats/int4.py; spec:
// lowbit/backends/reference/int4.py). UNVERIFIED: nothing here has run on a GPU.
//
//   _cuda_int4_repack_cutlass_sm90  lowbit int4 -> cutlass_sm90 layout: one thread per output
//                                   byte (int4_layout.h sm90::repack_byte, as the CPU kernel),
//                                   one per (group, n) for scale_T and zero'.
//   _cuda_int4_cutlass_sm90_mm      on an sm_90 GPU whose kernel image is the real sm_90a one:
//                                   CUTLASS's TMA + wgmma mixed-input GEMM
//                                   (lowbit/cuda/int4_cutlass_sm90.cuh), one kernel per T.
//                                   Elsewhere (sm_80 / sm_89, or a build without 9.0a): the
//                                   weight is dequantized to float32 with the same roundings
//                                   and multiplied by at::mm in float32 (slow, exact to spec).
//
// Two CUTLASS instantiations (fp16, bf16): every weight goes through the scale-and-zero
// mode, symmetric ones with zero' = 0, so no separate scale-only kernel is compiled.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "lowbit/checks.h"
#include "lowbit/cuda/common.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/host.cuh"
#include "lowbit/cuda/int4_cutlass_sm90.cuh"
#include "lowbit/int4_layout.h"

namespace lowbit {
namespace cuda {
namespace {

namespace sm90 = ::lowbit::int4_layout::sm90;
using namespace ::lowbit::cuda::host;

// ---------------------------------------------------------------------------- repack
__global__ void int4_sm90_repack_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t N,
                                        int64_t K) {
  const int64_t row = sm90::row_bytes(K);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * row) return;
  const int64_t n = i / row, j = i % row;
  dst[i] = sm90::repack_byte(src + n * ::lowbit::int4_layout::row_bytes(K), j);
}

template <typename T>
__device__ __forceinline__ T to_t(float v);
template <>
__device__ __forceinline__ __half to_t<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ float from_t(__half v) { return __half2float(v); }
__device__ __forceinline__ float from_t(__nv_bfloat16 v) { return __bfloat162float(v); }

// scale [N, G] and zero [N, G] (float32 copies; zero may be null) -> scale_T, zero' [G, N].
template <typename T>
__global__ void int4_sm90_repack_scales_kernel(const float* __restrict__ scale, const float* __restrict__ zero,
                                               T* __restrict__ scale_t, T* __restrict__ zero_t, int64_t N,
                                               int64_t groups) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * groups) return;
  const int64_t g = i / N, n = i % N;  // i = sm90::scale_index(g, n, N): coalesced writes
  const T s = to_t<T>(scale[n * groups + g]);
  scale_t[i] = s;
  zero_t[i] = to_t<T>(zero == nullptr ? 0.f : sm90::offset_zero(from_t(s), zero[n * groups + g]));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_repack_cutlass_sm90_cuda(
    const at::Tensor& packed_w, const at::Tensor& scale, const std::optional<at::Tensor>& zero, int64_t group_size,
    int64_t K, c10::ScalarType dtype) {
  constexpr const char* op = "int4_repack_cutlass_sm90";
  const int64_t groups = check_int4_repack_cutlass_sm90(op, packed_w, scale, zero, group_size, K, dtype);
  c10::cuda::CUDAGuard guard(packed_w.device());
  require_sm80(op);
  const int64_t N = packed_w.size(0);
  const at::Tensor src = packed_w.contiguous();
  at::Tensor packed = at::empty({N, sm90::row_bytes(K)}, packed_w.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const int64_t bytes = N * sm90::row_bytes(K);
  int4_sm90_repack_kernel<<<ceil_div(bytes, kThreads), kThreads, 0, stream>>>(ptr<const uint8_t>(src),
                                                                             ptr<uint8_t>(packed), N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor s32 = scale.to(at::kFloat).contiguous();
  const at::Tensor z32 = zero.has_value() ? zero->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor scale_t = at::empty({groups, N}, scale.options().dtype(dtype));
  at::Tensor zero_t = at::empty({groups, N}, scale.options().dtype(dtype));
  const float* zp = z32.defined() ? ptr<const float>(z32) : nullptr;
  const int64_t blocks = ceil_div(N * groups, kThreads);
  if (dtype == at::kHalf)
    int4_sm90_repack_scales_kernel<__half><<<blocks, kThreads, 0, stream>>>(
        ptr<const float>(s32), zp, ptr<__half>(scale_t), ptr<__half>(zero_t), N, groups);
  else
    int4_sm90_repack_scales_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
        ptr<const float>(s32), zp, ptr<__nv_bfloat16>(scale_t), ptr<__nv_bfloat16>(zero_t), N, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, scale_t, zero_t};
}

// ---------------------------------------------------------------------------- fallback
// w [N, K] float32 = round_T(round_T(q * scale) + zero'), the values the CUTLASS kernel uses.
template <typename T>
__global__ void int4_sm90_dequant_kernel(const uint8_t* __restrict__ packed, const T* __restrict__ scale_t,
                                         const T* __restrict__ zero_t, float* __restrict__ w, int64_t N, int64_t K,
                                         int64_t group_size) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * K) return;
  const int64_t n = i / K, k = i % K, g = k / group_size;
  const float q = float(sm90::signed_code_at(packed + n * sm90::row_bytes(K), k));
  const float s = from_t(scale_t[sm90::scale_index(g, n, N)]);
  const float z = from_t(zero_t[sm90::scale_index(g, n, N)]);
  w[i] = from_t(to_t<T>(__fadd_rn(from_t(to_t<T>(__fmul_rn(q, s))), z)));
}

// ---------------------------------------------------------------------------- CUTLASS sm_90a
using ProbeGemm = int4_sm90::MixedGemm<cutlass::half_t>::Gemm;

// A 9.0 GPU and a kernel image built for it (binaryVersion 90), not the stub or foreign PTX.
bool sm90_available(int device) {
  return cutlass_host::compiled_for_device(cutlass::device_kernel<typename ProbeGemm::GemmKernel>, device, 9, 0);
}

template <typename T>
void run_sm90(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
              int group_size, const float* bias, at::Tensor& out, cudaStream_t stream) {
  using Mixed = int4_sm90::MixedGemm<T>;
  using Gemm = typename Mixed::Gemm;
  const int M = int(x.size(0)), N = int(w.size(0)), K = int(x.size(1));
  const int device = x.get_device();
  auto args = Mixed::arguments(w.data_ptr(), scale.data_ptr(), zero.data_ptr(), group_size, x.data_ptr(), bias,
                               out.data_ptr(), M, N, K, device, cutlass_evt::sm90::sm_count(device));
  cutlass_host::run<Gemm>(args, x, "int4_cutlass_sm90_mm (CUTLASS sm_90a)", stream);
}

// TMA needs 16-byte aligned base addresses: a contiguous view at an odd offset is copied.
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (!aligned16(c.data_ptr())) c = c.clone();
  return c;
}

at::Tensor int4_cutlass_sm90_mm_cuda(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& scale_in,
                                     const at::Tensor& zero_in, int64_t group_size,
                                     const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "int4_cutlass_sm90_mm";
  check_int4_cutlass_sm90_mm(op, x_in, packed_in, scale_in, zero_in, group_size, bias_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = aligned(x_in), w = aligned(packed_in), scale = aligned(scale_in), zero = aligned(zero_in);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  if (sm90_available(x.get_device()) && M <= INT32_MAX && N * K <= INT32_MAX) {
    at::Tensor out = at::empty({M, N}, x.options());
    if (x.scalar_type() == at::kHalf)
      run_sm90<cutlass::half_t>(x, w, scale, zero, int(group_size), bias_ptr, out, stream);
    else
      run_sm90<cutlass::bfloat16_t>(x, w, scale, zero, int(group_size), bias_ptr, out, stream);
    return out;
  }

  at::Tensor wf = at::empty({N, K}, x.options().dtype(at::kFloat));
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div(N * K, kThreads);
  if (x.scalar_type() == at::kHalf)
    int4_sm90_dequant_kernel<__half><<<blocks, kThreads, 0, stream>>>(
        ptr<const uint8_t>(w), ptr<const __half>(scale), ptr<const __half>(zero), ptr<float>(wf), N, K, group_size);
  else
    int4_sm90_dequant_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
        ptr<const uint8_t>(w), ptr<const __nv_bfloat16>(scale), ptr<const __nv_bfloat16>(zero), ptr<float>(wf), N,
        K, group_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor y = at::mm(x.to(at::kFloat), wf.t());
  if (bias.defined()) y.add_(bias);
  return y.to(x.scalar_type());
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("_cuda_int4_repack_cutlass_sm90", &cuda::int4_repack_cutlass_sm90_cuda);
  m.impl("_cuda_int4_cutlass_sm90_mm", &cuda::int4_cutlass_sm90_mm_cuda);
}

}  // namespace lowbit
