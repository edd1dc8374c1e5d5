// The CUTLASS 2.x GEMM with an epilogue visitor tree that the int8 (int8_cutlass.cuh), fp8
// sm_89 (fp8_cutlass_sm89.cuh) and binary (binary_cutlass.cuh) GEMMs share:
//
//   A [M, K] row-major  x  B [N, K] row-major (= CUTLASS ColumnMajor [K, N]), one batch,
//   the output written by the tree's store node, [M, N] row-major.
//
// ScaleBiasEpilogue is their common scaled output,
//       D = round_D(((float(x) * scale_a[m]) * scale_b[n]) + bias[n])
// in that order, each step rounded to fp32 (cutlass_evt.cuh), which is exactly the references'
// sequence of torch ops, so the results are bit-identical to them. x is the accumulator
// (int32 or fp32, converted to fp32 round-to-nearest) or, for binary, the tree computing the
// XNOR dot from it.
#pragma once

#include <cstdint>

// Order matters: visitor_2x.hpp names `gemm::GemmCoord` under `using namespace cute`, which
// only resolves to cutlass::gemm if that namespace is declared before it (else cute::gemm).
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"
#include "lowbit/cuda/cutlass_evt.cuh"

namespace lowbit {
namespace cuda {
namespace cutlass_evt {
namespace sm80 {

constexpr auto kRn = cutlass::FloatRoundStyle::round_to_nearest;

// Every lowbit 2.x GEMM reads fp32 in its epilogue and runs it in one stage.
template <class TileShape, class WarpShape, int kAlignOut>
using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<TileShape, WarpShape, float, kAlignOut,
                                                                        /*EpilogueStages=*/1>;

// Per output row m (one value per row of A) and per output column n (one per row of B). The
// column vectors are read with kAlignOut-wide loads.
template <class Map, class T>
using PerRow = cutlass::epilogue::threadblock::VisitorColBroadcast<Map, T, cute::Stride<cute::_1, cute::_0, cute::_0>>;
template <class Map, class T>
using PerCol = cutlass::epilogue::threadblock::VisitorRowBroadcast<Map, T, cute::Stride<cute::_0, cute::_1, cute::_0>>;

// D [M, N] row-major.
template <class Map, class ElementD>
struct Store {
  using Node = cutlass::epilogue::threadblock::VisitorAuxStore<Map, ElementD, kRn,
                                                               cute::Stride<int64_t, cute::_1, int64_t>>;
  static typename Node::Arguments arguments(ElementD* out, int64_t M, int64_t N) {
    return {out, {N, cute::_1{}, M * N}};
  }
};

// D = round_D(((float(x) * scale_a[m]) * scale_b[n]) + bias[n]), x the output of `Input`.
// scale_a [M] and scale_b [N] are full fp32 vectors (the launchers expand scalars).
template <class Map, class ElementD, class Input = cutlass::epilogue::threadblock::VisitorAccFetch>
struct ScaleBiasEpilogue {
  template <class Child, class Vector>
  using Times = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<MulRn, float, float, kRn>, Child, Vector>;
  using TimesA = Times<Input, PerRow<Map, float>>;
  using TimesB = Times<TimesA, PerCol<Map, float>>;
  // The output conversion (round to nearest even) happens in this node.
  using PlusBias = cutlass::epilogue::threadblock::Sm80EVT<
      cutlass::epilogue::threadblock::VisitorCompute<AddRn, ElementD, float, kRn>, TimesB, PerCol<Map, float>>;
  using Evt = cutlass::epilogue::threadblock::Sm80EVT<typename Store<Map, ElementD>::Node, PlusBias>;

  // Without a bias the tree still adds: -0.0 is the additive identity for every float
  // (x + -0.0 == x, including x == -0.0), so "no bias" stays bit-identical to the reference.
  static typename Evt::Arguments arguments(typename Input::Arguments input, const float* scale_a,
                                           const float* scale_b, const float* bias, ElementD* out, int64_t M,
                                           int64_t N) {
    return typename Evt::Arguments{
        {
            {
                {
                    input,
                    {scale_a, 0.0f, {}},      // scale_a[m]
                    {}                        // TimesA
                },
                {scale_b, 0.0f, {}},          // scale_b[n]
                {}                            // TimesB
            },
            {bias, -0.0f, {}},                // bias[n] (nullptr -> -0.0 everywhere)
            {}                                // PlusBias
        },
        Store<Map, ElementD>::arguments(out, M, N)};
  }
};

// The kernel: CUTLASS's multistage tensor-op mainloop (identity swizzle, no split-K) with the
// visitor tree `Evt` as its epilogue. What differs between lowbit's GEMMs is the operand and
// accumulator types, the arch tag (sm_89 selects FP8 staged accumulation), the tiles and the
// MMA operator (saturating int8, plain fp8, AND-popcount b1).
template <class ElementA, class ElementB, class ElementAccumulator, class ArchTag, class TileShape, class WarpShape,
          class InstructionShape, int kStages, int kAlignAB, int kAlignOut, class MathOp, class Evt>
using GemmWithEvt = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
    ElementA, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignAB,     //
    ElementB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignAB,  //
    float, cutlass::layout::RowMajor, kAlignOut,                                          //
    ElementAccumulator, float, cutlass::arch::OpClassTensorOp, ArchTag, TileShape, WarpShape, InstructionShape,
    Evt, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages, MathOp,
    /*EpilogueStages=*/1>::GemmKernel;

// Host arguments of GemmUniversalAdapter<GemmWithEvt<...>>: packed A [M, K] and B [N, K]
// (lda = ldb = K, in elements: bits for b1), no C (the tree reads no source), D written by the
// tree's store node.
template <class Gemm, class EvtArguments>
typename Gemm::Arguments arguments(const EvtArguments& evt, const void* a, const void* b, int64_t M, int64_t N,
                                   int64_t K) {
  return typename Gemm::Arguments(cutlass::gemm::GemmUniversalMode::kGemm, {int(M), int(N), int(K)},
                                  /*batch_count=*/1, evt, a, b, nullptr, nullptr,
                                  /*batch strides*/ M * K, N * K, 0, 0,
                                  /*lda, ldb, ldc, ldd*/ K, K, 0, 0);
}

}  // namespace sm80
}  // namespace cutlass_evt
}  // namespace cuda
}  // namespace lowbit
