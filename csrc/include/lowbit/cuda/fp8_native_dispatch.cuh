// What fp8_sm89.cu and fp8_sm90.cu have in common on the host: which CUTLASS element types
// serve a call, and the launch. Only the pairings of lowbit/cuda/fp8_native.h have kernels
// (both operands e4m3, or both e5m2), each for the three output types.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "cutlass/numeric_types.h"
#include "lowbit/cuda/cutlass_host.cuh"
#include "lowbit/cuda/fp8_native.h"
#include "lowbit/cuda/host.cuh"

namespace lowbit {
namespace cuda {
namespace fp8_native {

// out = ((a @ b^T) * scale_a[m]) * scale_b[n] + bias[n] on ScaledGemm<ElementA, ElementB,
// ElementD>: fp8_sm89::ScaledGemm or fp8_sm90::ScaledGemm, whose arguments() take the same
// parameters. `op` names the kernel in errors, e.g. "fp8_scaled_mm (CUTLASS sm_89)".
template <template <class, class, class> class ScaledGemm>
void launch_native(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                   const at::Tensor& scale_b, const float* bias, at::Tensor& out, cudaStream_t stream) {
  TORCH_CHECK(native_pairing(a.scalar_type(), b.scalar_type()), "lowbit.", op, ": no kernel for ", a.scalar_type(),
              " x ", b.scalar_type());
  const auto with_operands = [&](auto operand) {
    cutlass_host::dispatch_output(out.scalar_type(), [&](auto output) {
      using Element = typename decltype(operand)::type;
      using Scaled = ScaledGemm<Element, Element, typename decltype(output)::type>;
      const auto args = Scaled::arguments(a.data_ptr(), b.data_ptr(), scale_a.const_data_ptr<float>(),
                                          scale_b.const_data_ptr<float>(), bias, out.data_ptr(), a.size(0),
                                          b.size(0), a.size(1), a.get_device());
      cutlass_host::run<typename Scaled::Gemm>(args, a, op, stream);
    });
  };
  if (a.scalar_type() == at::kFloat8_e4m3fn)
    with_operands(host::Tag<cutlass::float_e4m3_t>{});
  else
    with_operands(host::Tag<cutlass::float_e5m2_t>{});
}

}  // namespace fp8_native
}  // namespace cuda
}  // namespace lowbit
