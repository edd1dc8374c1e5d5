// FP8 scaled GEMM on Hopper's FP8 tensor cores (wgmma), for fp8_scaled_mm in csrc/cuda/fp8.cu.
// The CUTLASS types are in lowbit/cuda/fp8_cutlass_sm90.cuh; this file instantiates them for
// every operand-format pairing and output type, and launches them (lowbit/cuda/
// fp8_native_dispatch.cuh, shared with sm_89).
//
// Instantiations: e4m3 x e4m3 and e5m2 x e5m2 (the presets' pairings) x 3 output types = 6
// kernels (this file: ~2 CPU-minutes for sm_80 + sm_89 + sm_90a with nvcc 13.0); the mixed pairings (wgmma has them, but each would add
// three more kernels to every CI build) take the dequantizing kernels of fp8.cu. The device
// body of each is compiled for sm_90a only (the sm_80 / sm_89 passes see an empty stub).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "lowbit/cuda/fp8_cutlass_sm90.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/fp8_native_dispatch.cuh"

namespace lowbit {
namespace cuda {
namespace fp8_native {
namespace {

constexpr const char* kOp = "fp8_scaled_mm (CUTLASS sm_90a)";

using Probe = fp8_sm90::ScaledGemm<cutlass::float_e4m3_t, cutlass::float_e4m3_t, float>;

}  // namespace

bool sm90_available(int device) {
  // A build without 9.0a has only the stub (or PTX of another target) for this kernel.
  return cutlass_host::compiled_for_device(cutlass::device_kernel<typename Probe::Gemm::GemmKernel>, device, 9, 0);
}

void scaled_mm_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
                    const float* bias, at::Tensor& out, cudaStream_t stream) {
  launch_native<fp8_sm90::ScaledGemm>(kOp, a, b, scale_a, scale_b, bias, out, stream);
}

}  // namespace fp8_native
}  // namespace cuda
}  // namespace lowbit
