// INT8 family, CPU kernels (placeholder: plumbing check; replaced by the AVX2 kernels).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lowbit/checks.h"

namespace lowbit {
namespace {
at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_int8_mm("int8_mm", a, b);
  return at::mm(a.to(at::kDouble), b.to(at::kDouble).t()).to(at::kInt);
}
}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("int8_mm", &int8_mm_cpu); }
}  // namespace lowbit
