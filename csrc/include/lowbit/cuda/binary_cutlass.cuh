// CUTLASS 2.x b1 tensor-core GEMM used by csrc/cuda/binary.cu for M > kGemvMaxRows (sm_80+; the
// same mma.sync code runs on sm_89 and sm_90).
//
//   A  uint1b_t [M, K'] row-major  x  B  uint1b_t [N, K'] row-major (= CUTLASS ColumnMajor [K', N])
//   acc[m, n] = popc(a_m AND b_n)  (arch::OpAndPopc: mma.sync ... .and.popc; PTX has .xor.popc
//   only on sm_80..sm_89, so AND is the one operator valid on every target)
//
// K' = 32 * cutlass_row_words(K) bits: whole 128-bit accesses, with every bit past K zero in both
// operands (binary_layout.h, cutlass_needs_repack), so they add nothing to the AND counts.
//
// The XNOR identity is the epilogue (binary_layout.h, dot_from_terms):
//   dot = a_term[m] + b_term[n] + 4 acc,  a_term = K - 2 popc(a_m),  b_term = -2 popc(b_n),
// in 32-bit unsigned arithmetic (exact: the dot is in [-K, K]). The popcounts come from the
// prepass that also repacks the operands (binary.cu).
//
// * BinaryGemm<int32_t>: D = dot (binary_mm).
// * BinaryGemm<D> for float / half_t / bfloat16_t: D = round_D(((float(dot) * scale_a[m]) *
//   scale_b[n]) + bias[n]), each step rounded to fp32 like the reference's sequence of torch ops
//   (lowbit/backends/reference/binary.py): bit-identical results. The scaled chain and the
//   kernel template are cutlass_evt_sm80.cuh's (shared with int8 and fp8 sm_89), fed by the dot.
//
// Output alignment 1 (scalar stores and per-column loads): any N, and N-vectors at any offset.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "lowbit/binary_layout.h"
#include "lowbit/cuda/cutlass_evt_sm80.cuh"

namespace lowbit {
namespace cuda {
namespace binary_cutlass {

namespace bl = ::lowbit::binary_layout;

// 128x256x512, eight 64x64x512 warps, 3 stages: one of CUTLASS's own sm_80 OpAndPopc unit-test
// configurations (test/unit/gemm/device/gemm_b1t_b1n_s32n_tensor_op_s32_sm80.cu); 72 KiB of
// shared memory (3 x (128 + 256) rows x 64 bytes).
using TileShape = cutlass::gemm::GemmShape<128, bl::kCutlassTileN, 512>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 512>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 256>;
constexpr int kStages = 3;
constexpr int kAlignAB = bl::kCutlassAlignBits;  // b1 elements per 128-bit access
constexpr int kAlignOut = 1;
using MathOp = cutlass::arch::OpAndPopc;
static_assert(TileShape::kN == bl::kCutlassTileN, "gemm_path's grid limit assumes this tile width");

// Dynamic shared memory is set at launch, so cuobjdump cannot see it: bound it here. 99 KiB
// is the per-block maximum of sm_86/sm_89, the smallest of the chips these kernels target.
constexpr int kMaxSharedBytes = 99 * 1024;

using Element = cutlass::uint1b_t;

// dot = a_term + b_term + 4 acc, modulo 2^32 (see binary_layout.h).
template <class T>
struct XnorFromAnd;
template <int N>
struct XnorFromAnd<cutlass::Array<int32_t, N>> {
  CUTLASS_DEVICE cutlass::Array<int32_t, N> operator()(cutlass::Array<int32_t, N> const& acc,
                                                       cutlass::Array<int32_t, N> const& a_term,
                                                       cutlass::Array<int32_t, N> const& b_term) const {
    cutlass::Array<int32_t, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = bl::dot_from_terms(a_term[i], b_term[i], acc[i]);
    return r;
  }
};

namespace evt = ::lowbit::cuda::cutlass_evt::sm80;
namespace tb = cutlass::epilogue::threadblock;
using Map = evt::ThreadMap<TileShape, WarpShape, kAlignOut>;
constexpr auto kRn = evt::kRn;

// ElementD int32_t: the dot itself; float types: the scaled chain after it.
template <typename ElementD>
struct BinaryGemm {
  static constexpr bool kScaled = !std::is_same_v<ElementD, int32_t>;
  using DotOut = std::conditional_t<kScaled, float, int32_t>;
  using Dot = tb::Sm80EVT<tb::VisitorCompute<XnorFromAnd, DotOut, int32_t, kRn>, tb::VisitorAccFetch,
                          evt::PerRow<Map, int32_t>, evt::PerCol<Map, int32_t>>;
  using Store = evt::Store<Map, ElementD>;
  using Scaled = evt::ScaleBiasEpilogue<Map, ElementD, Dot>;
  struct Unscaled {
    using Evt = tb::Sm80EVT<typename Store::Node, Dot>;
  };
  // Named lazily: the scaled chain is never formed for the int32 output.
  using Evt = typename std::conditional_t<kScaled, Scaled, Unscaled>::Evt;

  using Kernel = evt::GemmWithEvt<Element, Element, int32_t, cutlass::arch::Sm80, TileShape, WarpShape,
                                  InstructionShape, kStages, kAlignAB, kAlignOut, MathOp, Evt>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= kMaxSharedBytes, "binary GEMM tile too big");

  static typename Dot::Arguments dot_args(const int32_t* a_term, const int32_t* b_term) {
    return typename Dot::Arguments{{}, {a_term, 0, {}}, {b_term, 0, {}}, {}};
  }

  // binary_mm: scale_a, scale_b and bias are unused (nullptr).
  // binary_scaled_mm: full [M] / [N] fp32 vectors (the host expands scalars); see
  // ScaleBiasEpilogue for the -0.0 that stands for "no bias".
  static typename Evt::Arguments epilogue_args(const int32_t* a_term, const int32_t* b_term, const float* scale_a,
                                               const float* scale_b, const float* bias, ElementD* out, int64_t M,
                                               int64_t N) {
    if constexpr (kScaled) {
      return Scaled::arguments(dot_args(a_term, b_term), scale_a, scale_b, bias, out, M, N);
    } else {
      (void)scale_a, (void)scale_b, (void)bias;
      return typename Evt::Arguments{dot_args(a_term, b_term), Store::arguments(out, M, N)};
    }
  }
};

}  // namespace binary_cutlass
}  // namespace cuda
}  // namespace lowbit
