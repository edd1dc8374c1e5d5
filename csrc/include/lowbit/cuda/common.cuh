// Device helpers shared by the lowbit CUDA kernels (csrc/cuda/*.cu). Only CUDA headers here:
// the torch headers stay in the .cu files, which keeps this cheap to include.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lowbit {
namespace cuda {

// float32 <-> element type. The conversions to 16-bit types round to nearest even, as
// torch's `.to(dtype)` does, so a result computed in fp32 rounds to the same output.
template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float to_f32(float v) { return v; }
  static __device__ __forceinline__ float from_f32(float v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f32(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The reference computes acc * scale, then + bias, each rounded to fp32 (separate torch ops).
// The _rn intrinsics keep nvcc from contracting them into one FMA, which rounds once and
// would differ from the reference in the last bit.
__device__ __forceinline__ float scale_then_bias(float acc, float scale, const float* bias, int64_t n) {
  float y = __fmul_rn(acc, scale);
  return bias != nullptr ? __fadd_rn(y, bias[n]) : y;
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace lowbit
