// Large-M weight-only GEMMs on torch's own GEMM: decode a panel of weight rows, multiply it with
// at::mm, repeat. Shared by int4, codebook and int8 weight-only (docs/ops.md, "CPU routes on
// AVX-512 / AMX CPUs", has the table of who takes which route from which M).
//
// Why: at large M a weight-only GEMM is bound by multiply-adds, not by weight bytes, and on CPUs
// wider than lowbit's AVX2 kernels torch's GEMM does them faster than any decode-fused AVX2 loop.
// Measured on a 2-vCPU AVX-512/AMX Xeon VM (N = K = 4096, 2 threads, warm, ms), lowbit's AVX2
// int4 kernel vs fp32 F.linear vs bf16 F.linear (oneDNN on AMX tiles): M = 16 3.6 / 4.9 / 1.2,
// M = 64 12 / 9.4 / 2.2, M = 256 49 / 29 / 4.6. On AVX2-only CPUs (the Zen 3 machines the kernels
// were tuned on) nothing changes: lowbit's kernels match or beat torch's GEMM there.
//
// Routes (DecodedGemm):
// * kBFloat16: bf16 activations on CPUs with AMX-BF16. Each decoded weight is rounded once to
//   bf16, as the Triton kernels round it to their tensor-core operand's dtype, and at::mm
//   accumulates in fp32 and rounds the product to bf16; a bias is then added in fp32 and the sum
//   rounded again. Error: at most eps_bf16 * sum|x||w| beyond the fp32 bound.
// * kFloat32: fp32/fp16 activations (any activations for a family that passes no bf16 threshold)
//   on CPUs with AVX-512F. The decoded weights are fp32, exactly the spec's; at::mm (MKL/oneDNN
//   sgemm) accumulates in fp32 in its own order: the fp32 accumulation bound of the family's own
//   kernels holds unchanged.
// LOWBIT_DECODED_GEMM=0 never takes a route, =1 takes the dtype's route on any AVX2 CPU (so tests
// reach both everywhere); read on every call, so a test can set it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "lowbit/cpu/isa.h"

namespace lowbit::cpu {

enum class DecodedGemm { kNone, kFloat32, kBFloat16 };

// The route for M rows of x_dtype activations; min_m_bf16 / min_m_fp32: where each route starts
// to win on the machine it was measured on (the family's own measurement).
inline DecodedGemm decoded_gemm_route(c10::ScalarType x_dtype, int64_t M, int64_t N, int64_t K,
                                      int64_t min_m_bf16, int64_t min_m_fp32) {
  if (N == 0 || K == 0 || !has_avx2()) return DecodedGemm::kNone;
  const bool bf16 = x_dtype == c10::ScalarType::BFloat16;
  const char* env = std::getenv("LOWBIT_DECODED_GEMM");
  const bool forced = env != nullptr && env[0] == '1';
  if (env != nullptr && env[0] == '0') return DecodedGemm::kNone;
  if (bf16 && M >= min_m_bf16 && (forced || has_amx_bf16())) return DecodedGemm::kBFloat16;
  if (M >= min_m_fp32 && (forced || has_avx512f())) return DecodedGemm::kFloat32;
  return DecodedGemm::kNone;
}

// Rows per decoded panel: about 8 MiB of decoded weights, whole multiples of 64 rows. Measured
// with int4 (N = K = 4096, 2 threads, cold, ms), panels of 0.5 / 2 / 8 / 32 MiB: bf16 M = 32
// 4.9 / 3.9 / 4.1 / 12.9 (oneDNN reorders a 4096-row bf16 weight on every call), M = 256 11.6 /
// 9.6 / 8.9 / 17.7; fp32 M = 256 39 / 35 / 31 / 40.
inline int64_t decoded_panel_rows(int64_t N, int64_t K, int64_t elem_bytes) {
  const int64_t rows = (int64_t(8) << 20) / std::max<int64_t>(1, K * elem_bytes) / 64 * 64;
  return std::min(N, std::max<int64_t>(64, rows));
}

// xd @ W.T, W decoded panel by panel:
//   decode(n0, n1, void* panel) writes rows n0..n1 of W as [n1 - n0, Kd] rows of xd's dtype (it
//   opens its own parallel region);
//   finish(y, n0, n1) consumes y = xd @ W[n0:n1].T, [M, n1 - n0] in xd's dtype (fp32 or bf16).
// xd: [M, Kd] contiguous, fp32 or bf16, in the same column order as the decoded rows.
// direct_out: [M, N] in xd's dtype, or undefined. When defined (no epilogue is needed), each
// panel's product is written straight into its columns (BLAS's ldc) and finish is not called.
template <class Decode, class Finish>
void gemm_over_decoded_panels(const at::Tensor& xd, int64_t N, Decode&& decode, Finish&& finish,
                              const at::Tensor& direct_out = at::Tensor()) {
  const int64_t Kd = xd.size(1);
  const int64_t rows = decoded_panel_rows(N, Kd, xd.element_size());
  at::Tensor panel = at::empty({rows, Kd}, xd.options());
  at::Tensor y;
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    decode(n0, n1, panel.mutable_data_ptr());
    const at::Tensor w = panel.narrow(0, 0, n1 - n0).t();
    if (direct_out.defined()) {
      at::Tensor cols = direct_out.narrow(1, n0, n1 - n0);
      at::mm_out(cols, xd, w);
      continue;
    }
    if (!y.defined() || y.size(1) != n1 - n0) y = at::empty({xd.size(0), n1 - n0}, xd.options());
    at::mm_out(y, xd, w);
    finish(y, n0, n1);
  }
}

// Calls f(m, n, v) for every value of a panel's product y [M, n1 - n0] (bf16 or fp32), v as fp32
// (exact), in parallel over rows: the families' epilogues (scale, bias, x's dtype) go in f.
template <class F>
void for_each_panel_product(const at::Tensor& y, int64_t n0, F&& f) {
  const int64_t M = y.size(0), cols = y.size(1);
  const bool bf16 = y.scalar_type() == c10::ScalarType::BFloat16;
  const c10::BFloat16* yb = bf16 ? y.const_data_ptr<c10::BFloat16>() : nullptr;
  const float* yf = bf16 ? nullptr : y.const_data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, cols)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t c = 0; c < cols; ++c) f(m, n0 + c, bf16 ? static_cast<float>(yb[m * cols + c]) : yf[m * cols + c]);
  });
}

}  // namespace lowbit::cpu
