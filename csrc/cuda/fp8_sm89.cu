// FP8 scaled GEMM on Ada's FP8 tensor cores (mma.sync e4m3/e5m2), for fp8_scaled_mm in
// csrc/cuda/fp8.cu. The CUTLASS types are in lowbit/cuda/fp8_cutlass_sm89.cuh; this file
// instantiates them and launches them (lowbit/cuda/fp8_native_dispatch.cuh, shared with sm_90a).
//
// Instantiations: e4m3 x e4m3 and e5m2 x e5m2 (the presets' pairings) x 3 output types = 6
// kernels; the mixed pairings take the dequantizing kernels of fp8.cu. The device body of each
// is compiled for sm_89 only (elsewhere an empty stub).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "lowbit/cuda/fp8_cutlass_sm89.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/fp8_native_dispatch.cuh"

namespace lowbit {
namespace cuda {
namespace fp8_native {
namespace {

constexpr const char* kOp = "fp8_scaled_mm (CUTLASS sm_89)";

using Probe = fp8_sm89::ScaledGemm<cutlass::float_e4m3_t, cutlass::float_e4m3_t, float>;

}  // namespace

bool sm89_available(int device) {
  // A build without 8.9 runs the sm_80 image here: the stub.
  return cutlass_host::compiled_for_device(cutlass::Kernel2<typename Probe::Gemm::GemmKernel>, device, 8, 9);
}

void scaled_mm_sm89(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
                    const float* bias, at::Tensor& out, cudaStream_t stream) {
  launch_native<fp8_sm89::ScaledGemm>(kOp, a, b, scale_a, scale_b, bias, out, stream);
}

}  // namespace fp8_native
}  // namespace cuda
}  // namespace lowbit
