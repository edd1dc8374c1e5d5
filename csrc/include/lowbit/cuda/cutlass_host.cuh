// Host side of every lowbit CUTLASS GEMM (int8, sparse24, binary, fp8 sm_89 / sm_90a, int4
// sm_90a): one launch sequence and one error message shape, so a CUTLASS failure reads the same
// from every family; the output-type dispatch and the per-arch image probe.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"
#include "lowbit/cuda/host.cuh"

namespace lowbit {
namespace cuda {
namespace cutlass_host {

// `what` failed for op `op` (e.g. "fp8_scaled_mm (CUTLASS sm_90a)"): a torch error, never an abort.
inline void check(cutlass::Status status, const char* op, const char* what) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "lowbit.", op, ": CUTLASS ", what, " failed: ",
              cutlassGetStatusString(status));
}

// can_implement, initialize, run. The kernels lowbit instantiates ask for no workspace (no
// split-K) or a few bytes (the sm_90 persistent scheduler); whatever they ask for comes from
// torch's caching allocator on `like`'s device, so it is stream-ordered like every other tensor.
template <typename Gemm>
void run(const typename Gemm::Arguments& args, const at::Tensor& like, const char* op, cudaStream_t stream) {
  Gemm gemm;
  check(gemm.can_implement(args), op, "can_implement");
  const size_t workspace_bytes = Gemm::get_workspace_size(args);
  at::Tensor workspace;
  if (workspace_bytes > 0) workspace = at::empty({int64_t(workspace_bytes)}, like.options().dtype(at::kByte));
  check(gemm.initialize(args, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, stream), op, "initialize");
  check(gemm.run(stream), op, "run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// True when `kernel` has a real body for compute capability major.minor on `device`: the device
// is that chip and the build compiled the kernel's arch-specific image (a build without it runs
// a stub or another target's PTX, whose binaryVersion differs).
template <typename Kernel>
bool compiled_for_device(Kernel* kernel, int device, int major, int minor) {
  int dev_major = 0, dev_minor = 0;
  if (cudaDeviceGetAttribute(&dev_major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&dev_minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    return false;
  if (dev_major != major || dev_minor != minor) return false;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == major * 10 + minor;
}

// torch output dtype -> CUTLASS element type, as a host::Tag the launcher's generic lambda
// unpacks (the CUTLASS twin of host::dispatch_float).
template <typename F>
void dispatch_output(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(host::Tag<float>{}); break;
    case c10::ScalarType::Half: f(host::Tag<cutlass::half_t>{}); break;
    case c10::ScalarType::BFloat16: f(host::Tag<cutlass::bfloat16_t>{}); break;
    default: TORCH_CHECK(false, "lowbit: unexpected output dtype ", c10::toString(dtype));
  }
}

}  // namespace cutlass_host
}  // namespace cuda
}  // namespace lowbit
