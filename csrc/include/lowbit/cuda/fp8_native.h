// Host entry points of the native FP8 tensor-core GEMMs, called by csrc/cuda/fp8.cu:
//   sm_90a  csrc/cuda/fp8_sm90.cu  CUTLASS 3.x, TMA + wgmma (lowbit/cuda/fp8_cutlass_sm90.cuh)
//   sm_89   csrc/cuda/fp8_sm89.cu  CUTLASS 2.x, mma.sync e4m3/e5m2 (lowbit/cuda/fp8_cutlass_sm89.cuh)
// Each kernel is compiled into its own architecture's object only (an empty stub elsewhere),
// so a launcher first asks whether the device in hand runs the real one.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lowbit {
namespace cuda {
namespace fp8_native {

// Shapes both native kernels take: 16-byte rows of A and B (K % 16), 16-byte rows of D and
// 16-byte vectors of scale_b and bias (N % 8). Pointers must be 16-byte aligned as well.
inline bool shape_ok(int64_t N, int64_t K) { return K % 16 == 0 && N % 8 == 0 && K > 0; }

// The operand pairings with a native kernel: e4m3 x e4m3 and e5m2 x e5m2.
inline bool native_pairing(c10::ScalarType a, c10::ScalarType b) { return a == b; }

// True when `device` is a compute capability 9.0 (resp. 8.9) GPU and the kernel image this
// library would launch on it was built for that architecture (binaryVersion 90 / 89), not
// an empty stub or PTX for another target.
bool sm90_available(int device);
bool sm89_available(int device);

// out [M, N] (f32/f16/bf16) = ((a @ b^T) * scale_a[m]) * scale_b[n] + bias[n].
// a [M, K], b [N, K]: fp8 (e4m3fn or e5m2 each), contiguous, 16-byte aligned; scale_a [M],
// scale_b [N]: fp32, contiguous, scale_b 16-byte aligned; bias: fp32 [N], 16-byte aligned, or
// null. The caller has checked shape_ok and *_available.
void scaled_mm_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
                    const float* bias, at::Tensor& out, cudaStream_t stream);
void scaled_mm_sm89(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
                    const float* bias, at::Tensor& out, cudaStream_t stream);

}  // namespace fp8_native
}  // namespace cuda
}  // namespace lowbit
