// Host-side helpers shared by every csrc/cuda/<family>.cu launcher.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace lowbit {
namespace cuda {
namespace host {

template <typename T>
struct Tag {
  using type = T;
};

// torch float dtype -> CUDA element type, as a tag the launcher's generic lambda unpacks.
template <typename F>
void dispatch_float(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(Tag<float>{}); break;
    case c10::ScalarType::Half: f(Tag<__half>{}); break;
    case c10::ScalarType::BFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: TORCH_CHECK(false, "lowbit: unexpected dtype ", c10::toString(dtype));
  }
}

// The small-M (gemv) kernels of int8, int4 and codebook are instantiated for 1, 2, 4 and 8 rows
// of x per pass; f gets M (1 <= M <= 8) rounded up to one of them, as an integral_constant.
template <typename F>
void dispatch_gemv_rows(int64_t M, F&& f) {
  if (M == 1) f(std::integral_constant<int, 1>{});
  else if (M == 2) f(std::integral_constant<int, 2>{});
  else if (M <= 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

// Every lowbit CUDA kernel uses sm_80 features (cp.async, ldmatrix, bf16 and int8 mma.sync,
// bf16 WMMA) and the build targets nothing older: refuse older GPUs with a way out.
inline void require_sm80(const char* op) {
  int device = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major >= 8, "lowbit.", op, ": the CUDA C++ kernels need compute capability 8.0 or newer, this GPU is ",
              major, ".", minor, "; use lowbit.backends.use(\"triton\") or (\"reference\")");
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

}  // namespace host
}  // namespace cuda
}  // namespace lowbit
