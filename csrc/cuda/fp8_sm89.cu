// FP8 scaled GEMM on Ada's FP8 tensor cores (mma.sync e4m3/e5m2), for fp8_scaled_mm in
// csrc/cuda/fp8.cu. The CUTLASS types are in lowbit/cuda/fp8_cutlass_sm89.cuh; this file
// instantiates them and launches them.
//
// Instantiations: e4m3 x e4m3 and e5m2 x e5m2 (the presets' pairings) x 3 output types = 6
// kernels; the mixed pairings take the dequantizing kernels of fp8.cu. The device body of each
// is compiled for sm_89 only (elsewhere an empty stub).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "lowbit/cuda/fp8_cutlass_sm89.cuh"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/fp8_native.h"

namespace lowbit {
namespace cuda {
namespace fp8_native {
namespace {

using Probe = fp8_sm89::ScaledGemm<cutlass::float_e4m3_t, cutlass::float_e4m3_t, float>;

template <typename ElementA, typename ElementB, typename ElementD>
void run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
         const float* bias, at::Tensor& out, cudaStream_t stream) {
  using Scaled = fp8_sm89::ScaledGemm<ElementA, ElementB, ElementD>;
  using Gemm = typename Scaled::Gemm;
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {int(M), int(N), int(K)},
                                /*batch_count=*/1,
                                Scaled::epilogue_args(scale_a.const_data_ptr<float>(), scale_b.const_data_ptr<float>(),
                                                      bias, static_cast<ElementD*>(out.data_ptr()), M, N),
                                a.data_ptr(), b.data_ptr(), nullptr, nullptr,
                                /*batch strides*/ M * K, N * K, 0, 0,
                                /*lda, ldb, ldc, ldd*/ K, K, 0, 0);
  cutlass_host::run<Gemm>(args, a, "fp8_scaled_mm (CUTLASS sm_89)", stream);
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

bool sm89_available(int device) {
  // A build without 8.9 runs the sm_80 image here: the stub.
  return cutlass_host::compiled_for_device(cutlass::Kernel2<typename Probe::Gemm::GemmKernel>, device, 8, 9);
}

void scaled_mm_sm89(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
                    const float* bias, at::Tensor& out, cudaStream_t stream) {
  TORCH_CHECK(native_pairing(a.scalar_type(), b.scalar_type()), "lowbit.fp8_scaled_mm (CUTLASS sm_89): no kernel for ",
              a.scalar_type(), " x ", b.scalar_type());
  if (a.scalar_type() == at::kFloat8_e4m3fn)
    run_out<cutlass::float_e4m3_t, cutlass::float_e4m3_t>(a, b, scale_a, scale_b, bias, out, stream);
  else
    run_out<cutlass::float_e5m2_t, cutlass::float_e5m2_t>(a, b, scale_a, scale_b, bias, out, stream);
}

}  // namespace fp8_native
}  // namespace cuda
}  // namespace lowbit
