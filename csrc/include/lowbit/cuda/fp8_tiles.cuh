// Device helpers and tile shapes of the FP8 CUDA kernels (csrc/cuda/fp8.cu). Only CUDA headers
// and lowbit/fp8.h here: the torch headers stay in the .cu file.
//
// Decoding goes through lowbit/fp8.h (the same bit-level code the CPU kernels and the host
// tests use), never through cuda_fp8.h: its conversions' overflow and NaN handling is not
// lowbit's policy, and on sm_80 they are software emulations anyway.
//
// Every fp8 value (e4m3: 3 mantissa bits, exponents 2^-9..2^8; e5m2: 2 bits, 2^-16..2^15,
// infinities) is exactly representable in fp16 and in bf16, so decoding an operand to the
// 16-bit type the tensor cores take loses nothing, and a product of two such values is exact
// in fp32. Only the fp32 accumulation order differs from the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "lowbit/cuda/common.cuh"
#include "lowbit/fp8.h"

namespace lowbit {
namespace cuda {
namespace fp8k {

__device__ __forceinline__ float decode(uint8_t code, bool e4m3) {
  return e4m3 ? ::lowbit::fp8::e4m3_to_float(code) : ::lowbit::fp8::e5m2_to_float(code);
}

__device__ __forceinline__ uint8_t encode(float v, bool e4m3, bool saturate) {
  return e4m3 ? ::lowbit::fp8::float_to_e4m3(v, saturate) : ::lowbit::fp8::float_to_e5m2(v, saturate);
}

// ---------------------------------------------------------------------------- tiles
// Tensor-core tile (WMMA 16x16x16, fp32 accumulate): 64x64 outputs, 4 warps of 32x32, K steps
// of 32. A thread stages one run of 16 consecutive k of one row of each operand.
namespace wmma_tile {
constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128, kRun = 16;
// Rows padded to 40 elements (80 bytes): WMMA's 32-byte fragment alignment and ldm % 8 == 0
// hold, and consecutive rows start in different banks.
constexpr int kLd = kBK + 8;
constexpr int kLdC = kBN + 4;
__host__ __device__ constexpr int run_row(int t) { return t / 2; }
__host__ __device__ constexpr int run_col(int t) { return (t % 2) * kRun; }
static_assert(kBM * kBK == kThreads * kRun && kBN * kBK == kThreads * kRun, "one run per thread");
static_assert(kThreads == kBM + kBN, "block-scaled kernels: one thread per row scale and per column scale");
static_assert(128 % kBK == 0, "a K step never straddles a 128-wide scale block");
}  // namespace wmma_tile

// fp32 SIMT tile for f32 activations (TF32 or f16 tensor cores would round x): 64x64 outputs,
// 256 threads of 4x4, K steps of 16, a run of 4 consecutive k per thread and operand.
namespace simt_tile {
constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256, kRun = 4;
__host__ __device__ constexpr int run_row(int t) { return t / 4; }
__host__ __device__ constexpr int run_col(int t) { return (t % 4) * kRun; }
// A warp reads 16 consecutive columns of B (no bank conflict) and 2 rows of A (broadcast).
__host__ __device__ constexpr int out_row(int t, int i) { return t / 16 + 16 * i; }
__host__ __device__ constexpr int out_col(int t, int j) { return t % 16 + 16 * j; }
static_assert(kBM * kBK == kThreads * kRun, "one run per thread");
}  // namespace simt_tile

// Small-M weight-only kernel: one warp per weight row, up to kMaxRows rows of x per pass.
namespace gemv {
constexpr int kWarpsPerBlock = 8;
constexpr int kVec = 16;  // fp8 weights per 128-bit load
constexpr int kMaxRows = 8;
}  // namespace gemv

// ---------------------------------------------------------------------------- loads
// One staged run of kRun elements of a row into shared memory as the MMA type MT, `pad`
// outside the matrix. The A operand pads with -0.0 and B with +0.0: a padded product is then
// -0.0, the additive identity, so a sum of -0.0 terms stays -0.0 as in the reference. kVec: K % 16 == 0 and 16-byte-aligned rows, so a run is entirely in or
// out of bounds and one (fp8) or two (16-bit) 128-bit loads.
template <typename MT, bool kVec, int kRun>
__device__ __forceinline__ void stage_run(const uint8_t* row, bool row_ok, int64_t k, int64_t K, bool e4m3, float pad,
                                          MT* dst) {
  if constexpr (kVec) {
    static_assert(kRun == 16, "one 128-bit load of fp8 codes");
    if (row_ok && k < K) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + k);
      const uint8_t* c = reinterpret_cast<const uint8_t*>(&v);
#pragma unroll
      for (int e = 0; e < kRun; ++e) dst[e] = Num<MT>::from_f32(decode(c[e], e4m3));
    } else {
#pragma unroll
      for (int e = 0; e < kRun; ++e) dst[e] = Num<MT>::from_f32(pad);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kRun; ++e)
      dst[e] = Num<MT>::from_f32((row_ok && k + e < K) ? decode(row[k + e], e4m3) : pad);
  }
}
template <typename MT, bool kVec, int kRun>
__device__ __forceinline__ void stage_run(const MT* row, bool row_ok, int64_t k, int64_t K, bool /*e4m3*/, float pad,
                                          MT* dst) {
  if constexpr (kVec) {
    static_assert(kRun == 16 && sizeof(MT) == 2, "two 128-bit loads of 16-bit values");
    if (row_ok && k < K) {
      const uint4* p = reinterpret_cast<const uint4*>(row + k);
      reinterpret_cast<uint4*>(dst)[0] = p[0];
      reinterpret_cast<uint4*>(dst)[1] = p[1];
    } else {
#pragma unroll
      for (int e = 0; e < kRun; ++e) dst[e] = Num<MT>::from_f32(pad);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kRun; ++e) dst[e] = (row_ok && k + e < K) ? row[k + e] : Num<MT>::from_f32(pad);
  }
}

// ---------------------------------------------------------------------------- epilogue
// y = ((acc * sa[m]) * sb[n]) + bias[n], each step rounded to fp32 as the reference's separate
// torch ops are (the _rn intrinsics keep nvcc from contracting into an FMA). Null pointers
// skip a step; strides of 0 broadcast a scalar scale.
template <typename OutT>
struct Epilogue {
  OutT* out;
  int64_t N;
  const float* sa;
  int64_t sa_stride;
  const float* sb;
  int64_t sb_stride;
  const float* bias;
  __device__ __forceinline__ void operator()(int64_t m, int64_t n, float acc) const {
    float y = acc;
    if (sa != nullptr) y = __fmul_rn(y, sa[m * sa_stride]);
    if (sb != nullptr) y = __fmul_rn(y, sb[n * sb_stride]);
    if (bias != nullptr) y = __fadd_rn(y, bias[n]);
    out[m * N + n] = Num<OutT>::from_f32(y);
  }
};

}  // namespace fp8k
}  // namespace cuda
}  // namespace lowbit
