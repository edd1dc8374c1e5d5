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

// v combined over a group of kGroup threads: a warp (32) or the whole block of kBlockThreads
// (every thread of the block calls it then: it synchronises through shared memory).
// `combine` is associative and commutative (a max of some kind); the order is a butterfly
// within each warp, then warp 0's partial first.
template <int kGroup, int kBlockThreads, class Combine>
__device__ __forceinline__ float group_reduce(float v, Combine combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if constexpr (kGroup == 32) {
    return v;
  } else {
    static_assert(kGroup == kBlockThreads, "group is a warp or the block");
    __shared__ float warp_part[kBlockThreads / 32];
    if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = v;
    __syncthreads();
    v = warp_part[0];
#pragma unroll
    for (int i = 1; i < kBlockThreads / 32; ++i) v = combine(v, warp_part[i]);
    return v;
  }
}

// 16 consecutive elements as fp32 from a 16-byte-aligned address.
__device__ __forceinline__ void load16(const float* p, float (&f)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = reinterpret_cast<const float4*>(p)[i];
    f[4 * i] = v.x, f[4 * i + 1] = v.y, f[4 * i + 2] = v.z, f[4 * i + 3] = v.w;
  }
}
template <typename T16>  // __half or __nv_bfloat16
__device__ __forceinline__ void load16(const T16* p, float (&f)[16]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 v = reinterpret_cast<const uint4*>(p)[i];
    const T16* h = reinterpret_cast<const T16*>(&v);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[8 * i + e] = Num<T16>::to_f32(h[e]);
  }
}

// One k step of a SIMT GEMM thread's 4x4 register tile: acc[i][j] += a[k][row(i)] * b[k][col(j)],
// a and b the block's k-major operand tiles, row / col the thread's map.
template <int kK, int kLdA, int kLdB, class Row, class Col>
__device__ __forceinline__ void fma_4x4(const float (&a)[kK][kLdA], const float (&b)[kK][kLdB], int k, Row row, Col col,
                                        float (&acc)[4][4]) {
  float av[4], bv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) av[i] = a[k][row(i)];
#pragma unroll
  for (int j = 0; j < 4; ++j) bv[j] = b[k][col(j)];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace lowbit
