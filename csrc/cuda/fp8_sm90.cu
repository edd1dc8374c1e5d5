// FP8 scaled GEMM on Hopper's FP8 tensor cores (wgmma), for fp8_scaled_mm in csrc/cuda/fp8.cu.
// The CUTLASS types are in lowbit/cuda/fp8_cutlass_sm90.cuh; this file instantiates them for
// every operand-format pairing and output type, and launches them.
//
// Instantiations: e4m3 x e4m3 and e5m2 x e5m2 (the presets' pairings) x 3 output types = 6
// kernels (this file: ~2 CPU-minutes for sm_80 + sm_89 + sm_90a with nvcc 13.0); the mixed pairings (wgmma has them, but each would add
// three more kernels to every CI build) take the dequantizing kernels of fp8.cu. The device
// body of each is compiled for sm_90a only (the sm_80 / sm_89 passes see an empty stub).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <atomic>

#include "lowbit/cuda/fp8_cutlass_sm90.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/fp8_native.h"

namespace lowbit {
namespace cuda {
namespace fp8_native {
namespace {

using Probe = fp8_sm90::ScaledGemm<cutlass::float_e4m3_t, cutlass::float_e4m3_t, float>;

int sm_count(int device) {
  static std::atomic<int> cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    n = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename ElementA, typename ElementB, typename ElementD>
void run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
         const float* bias, at::Tensor& out, cudaStream_t stream) {
  using Scaled = fp8_sm90::ScaledGemm<ElementA, ElementB, ElementD>;
  using Gemm = typename Scaled::Gemm;
  const int M = int(a.size(0)), N = int(b.size(0)), K = int(a.size(1));
  const int device = a.get_device();
  auto args = Scaled::arguments(a.data_ptr(), b.data_ptr(), scale_a.const_data_ptr<float>(),
                                scale_b.const_data_ptr<float>(), bias, out.data_ptr(), M, N, K, device,
                                sm_count(device));
  cutlass_host::run<Gemm>(args, a, "fp8_scaled_mm (CUTLASS sm_90a)", stream);
}

template <typename ElementA, typename ElementB>
void run_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
             const float* bias, at::Tensor& out, cudaStream_t stream) {
  switch (out.scalar_type()) {
    case at::kFloat: run<ElementA, ElementB, float>(a, b, scale_a, scale_b, bias, out, stream); break;
    case at::kHalf: run<ElementA, ElementB, cutlass::half_t>(a, b, scale_a, scale_b, bias, out, stream); break;
    default: run<ElementA, ElementB, cutlass::bfloat16_t>(a, b, scale_a, scale_b, bias, out, stream); break;
  }
}

}  // namespace

bool sm90_available(int device) {
  // A build without 9.0a has only the stub (or PTX of another target) for this kernel.
  return cutlass_host::compiled_for_device(cutlass::device_kernel<typename Probe::Gemm::GemmKernel>, device, 9, 0);
}

void scaled_mm_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
                    const float* bias, at::Tensor& out, cudaStream_t stream) {
  TORCH_CHECK(native_pairing(a.scalar_type(), b.scalar_type()), "lowbit.fp8_scaled_mm (CUTLASS sm_90a): no kernel for ",
              a.scalar_type(), " x ", b.scalar_type());
  if (a.scalar_type() == at::kFloat8_e4m3fn)
    run_out<cutlass::float_e4m3_t, cutlass::float_e4m3_t>(a, b, scale_a, scale_b, bias, out, stream);
  else
    run_out<cutlass::float_e5m2_t, cutlass::float_e5m2_t>(a, b, scale_a, scale_b, bias, out, stream);
}

}  // namespace fp8_native
}  // namespace cuda
}  // namespace lowbit
