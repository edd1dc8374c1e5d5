// CUTLASS 2.x int8 tensor-core GEMMs used by csrc/cuda/int8.cu (sm_80+; they also run on sm_89
// and sm_90, where mma.sync is still available).
//
//   A  int8 [M, K] row-major  x  B  int8 [N, K] row-major (= CUTLASS ColumnMajor [K, N])
//   accumulate in int32 (exact: K <= 131071 keeps |sum| < 2^31)
//
// * Int8Gemm: D = acc as int32.
// * Int8ScaledGemm<D>: an epilogue visitor tree computes
//       D = round_D(((float(acc) * scale_a[m]) * scale_b[n]) + bias[n])
//   in that order, each step rounded to fp32, which is exactly the reference's sequence of
//   torch ops (lowbit/backends/reference/int8.py), so the results are bit-identical to it.
//
// Both need K % 16 == 0 (16-byte cp.async of A and B rows), N % 4 == 0 (4-element output
// stores and 16-byte loads of the per-column vectors) and 16-byte-aligned base pointers.
// The caller checks and otherwise takes its SIMT fallback.
#pragma once

#include <cuda_runtime.h>

// Order matters: visitor_2x.hpp names `gemm::GemmCoord` under `using namespace cute`, which
// only resolves to cutlass::gemm if that namespace is declared before it (else cute::gemm).
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"

namespace lowbit {
namespace cuda {
namespace int8_cutlass {

// 128x128x64 with four 64x64 warps and 3 stages: the CUTLASS profiler's default int8 tile
// for sm_80; 48 KiB of shared memory, no spills (see tests/test_cuda_build.py).
using TileShape = cutlass::gemm::GemmShape<128, 128, 64>;
using WarpShape = cutlass::gemm::GemmShape<64, 64, 64>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 32>;
constexpr int kStages = 3;
constexpr int kAlignAB = 16;  // int8 elements per 128-bit access
constexpr int kAlignOut = 4;  // output elements per access (4 x f32, 4 x int32, 4 x f16)

// Dynamic shared memory is set at launch, so cuobjdump cannot see it: bound it here. 99 KiB
// is the per-block maximum of sm_86/sm_89, the smallest of the chips these kernels target.
constexpr int kMaxSharedBytes = 99 * 1024;

// With K bounded, int32 accumulation never overflows, so saturating and wrapping MMA agree;
// Saturate is CUTLASS's int8 default.
using MathOp = cutlass::arch::OpMultiplyAddSaturate;

using Int8Gemm = cutlass::gemm::device::Gemm<
    int8_t, cutlass::layout::RowMajor, int8_t, cutlass::layout::ColumnMajor, int32_t, cutlass::layout::RowMajor,
    int32_t, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape, InstructionShape,
    // ScaleType::Nothing: D = acc, no alpha/beta arithmetic and no read of C.
    cutlass::epilogue::thread::LinearCombination<int32_t, kAlignOut, int32_t, int32_t,
                                                 cutlass::epilogue::thread::ScaleType::Nothing>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages, kAlignAB, kAlignAB,
    /*SplitKSerial=*/false, MathOp>;
static_assert(sizeof(typename Int8Gemm::GemmKernel::SharedStorage) <= kMaxSharedBytes, "int8 GEMM tile too big");

// Element-wise fp32 ops for VisitorCompute, with explicit rounding so that no FMA contraction
// merges the multiply into the bias add (see the file comment).
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

template <typename ElementD>
struct Int8ScaledGemm {
  using RowMajor = cutlass::layout::RowMajor;
  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<TileShape, WarpShape, float, kAlignOut,
                                                                          /*EpilogueStages=*/1>;
  static constexpr auto kRn = cutlass::FloatRoundStyle::round_to_nearest;

  using Accum = cutlass::epilogue::threadblock::VisitorAccFetch;
  // scale_a[m]: one value per output row. Always a full [M] vector (the host expands scalars).
  using ScaleA = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float,
                                                                    cute::Stride<cute::_1, cute::_0, cute::_0>>;
  // scale_b[n] and bias[n]: per output column, read with 16-byte vector loads.
  using ScaleB = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, float,
                                                                    cute::Stride<cute::_0, cute::_1, cute::_0>>;
  using Bias = ScaleB;

  using TimesA = cutlass::epilogue::threadblock::VisitorCompute<MulRn, float, float, kRn>;
  using EvtTimesA = cutlass::epilogue::threadblock::Sm80EVT<TimesA, Accum, ScaleA>;
  using TimesB = cutlass::epilogue::threadblock::VisitorCompute<MulRn, float, float, kRn>;
  using EvtTimesB = cutlass::epilogue::threadblock::Sm80EVT<TimesB, EvtTimesA, ScaleB>;
  // The output conversion (round to nearest even) happens in this node.
  using PlusBias = cutlass::epilogue::threadblock::VisitorCompute<AddRn, ElementD, float, kRn>;
  using EvtPlusBias = cutlass::epilogue::threadblock::Sm80EVT<PlusBias, EvtTimesB, Bias>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<ThreadMap, ElementD, kRn,
                                                               cute::Stride<int64_t, cute::_1, int64_t>>;
  using Evt = cutlass::epilogue::threadblock::Sm80EVT<Store, EvtPlusBias>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      int8_t, RowMajor, cutlass::ComplexTransform::kNone, kAlignAB,                       //
      int8_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignAB,  //
      float, RowMajor, kAlignOut,                                                         //
      int32_t, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TileShape, WarpShape,
      InstructionShape, Evt, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages, MathOp,
      /*EpilogueStages=*/1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= kMaxSharedBytes, "scaled int8 GEMM tile too big");

  // Without a bias the tree still adds: -0.0 is the additive identity for every float
  // (x + -0.0 == x, including x == -0.0), so "no bias" stays bit-identical to the reference.
  static typename Evt::Arguments epilogue_args(const float* scale_a, const float* scale_b, const float* bias,
                                               ElementD* out, int64_t M, int64_t N) {
    return typename Evt::Arguments{
        {
            {
                {
                    {},                       // Accum
                    {scale_a, 0.0f, {}},      // ScaleA
                    {}                        // TimesA
                },
                {scale_b, 0.0f, {}},          // ScaleB
                {}                            // TimesB
            },
            {bias, -0.0f, {}},                // Bias (nullptr -> -0.0 everywhere)
            {}                                // PlusBias
        },
        {out, {N, cute::_1{}, M * N}}         // Store
    };
  }
};

}  // namespace int8_cutlass
}  // namespace cuda
}  // namespace lowbit
