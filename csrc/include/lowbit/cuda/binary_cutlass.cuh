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
//   (lowbit/backends/reference/binary.py): bit-identical results.
//
// Output alignment 1 (scalar stores and per-column loads): any N, and N-vectors at any offset.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

// Order matters: visitor_2x.hpp names `gemm::GemmCoord` under `using namespace cute`, which
// only resolves to cutlass::gemm if that namespace is declared before it (else cute::gemm).
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "lowbit/binary_layout.h"

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

// Element-wise fp32 ops with explicit rounding, so that no FMA contraction merges the multiply
// into the bias add (the reference rounds after each operation).
template <class T>
struct MulRn;
template <int N>
struct MulRn<cutlass::Array<float, N>> {
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& a,
                                                     cutlass::Array<float, N> const& b) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = __fmul_rn(a[i], b[i]);
    return r;
  }
};
template <class T>
struct AddRn;
template <int N>
struct AddRn<cutlass::Array<float, N>> {
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& a,
                                                     cutlass::Array<float, N> const& b) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = __fadd_rn(a[i], b[i]);
    return r;
  }
};

using namespace cutlass::epilogue::threadblock;
using ThreadMap = OutputTileThreadLayout<TileShape, WarpShape, float, kAlignOut, /*EpilogueStages=*/1>;
constexpr auto kRn = cutlass::FloatRoundStyle::round_to_nearest;

// Per output row m (one value per row of A) and per output column n (one per row of B).
template <class T>
using PerRow = VisitorColBroadcast<ThreadMap, T, cute::Stride<cute::_1, cute::_0, cute::_0>>;
template <class T>
using PerCol = VisitorRowBroadcast<ThreadMap, T, cute::Stride<cute::_0, cute::_1, cute::_0>>;

// ElementD int32_t: the dot itself; float types: the scaled chain after it.
template <typename ElementD>
struct BinaryGemm {
  static constexpr bool kScaled = !std::is_same_v<ElementD, int32_t>;
  using DotOut = std::conditional_t<kScaled, float, int32_t>;
  using Dot = Sm80EVT<VisitorCompute<XnorFromAnd, DotOut, int32_t, kRn>, VisitorAccFetch, PerRow<int32_t>,
                     PerCol<int32_t>>;
  using TimesA = Sm80EVT<VisitorCompute<MulRn, float, float, kRn>, Dot, PerRow<float>>;
  using TimesB = Sm80EVT<VisitorCompute<MulRn, float, float, kRn>, TimesA, PerCol<float>>;
  // The output conversion (round to nearest even) happens in this node.
  using PlusBias = Sm80EVT<VisitorCompute<AddRn, ElementD, float, kRn>, TimesB, PerCol<float>>;
  using Store = VisitorAuxStore<ThreadMap, ElementD, kRn, cute::Stride<int64_t, cute::_1, int64_t>>;
  using Evt = Sm80EVT<Store, std::conditional_t<kScaled, PlusBias, Dot>>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      Element, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignAB,     //
      Element, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignAB,  //
      float, cutlass::layout::RowMajor, kAlignOut,                                        //
      int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape,
      InstructionShape, Evt, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages, MathOp,
      /*EpilogueStages=*/1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= kMaxSharedBytes, "binary GEMM tile too big");

  static typename Dot::Arguments dot_args(const int32_t* a_term, const int32_t* b_term) {
    return typename Dot::Arguments{{}, {a_term, 0, {}}, {b_term, 0, {}}, {}};
  }

  // binary_mm: scale_a, scale_b and bias are unused (nullptr).
  // binary_scaled_mm: full [M] / [N] fp32 vectors (the host expands scalars). Without a bias the
  // tree still adds -0.0, the additive identity of every float (x + -0.0 == x, -0.0 included).
  static typename Evt::Arguments epilogue_args(const int32_t* a_term, const int32_t* b_term, const float* scale_a,
                                               const float* scale_b, const float* bias, ElementD* out, int64_t M,
                                               int64_t N) {
    typename Store::Arguments store{out, {N, cute::_1{}, M * N}};
    if constexpr (kScaled) {
      return typename Evt::Arguments{
          {
              {
                  {
                      dot_args(a_term, b_term),  // Dot
                      {scale_a, 0.0f, {}},       // scale_a[m]
                      {}                         // TimesA
                  },
                  {scale_b, 0.0f, {}},           // scale_b[n]
                  {}                             // TimesB
              },
              {bias, -0.0f, {}},                 // bias[n] (nullptr -> -0.0 everywhere)
              {}                                 // PlusBias
          },
          store};
    } else {
      (void)scale_a, (void)scale_b, (void)bias;
      return typename Evt::Arguments{dot_args(a_term, b_term), store};
    }
  }
};

}  // namespace binary_cutlass
}  // namespace cuda
}  // namespace lowbit
