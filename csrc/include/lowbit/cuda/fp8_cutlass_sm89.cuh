// CUTLASS 2.x FP8 GEMM for sm_89 (Ada): mma.sync m16n8k32 on e4m3/e5m2 operands with fp32
// accumulation, used by csrc/cuda/fp8_sm89.cu. The same structure and epilogue visitor tree
// as the int8 GEMM (int8_cutlass.cuh):
//
//   A  fp8 [M, K] row-major  x  B  fp8 [N, K] row-major (= CUTLASS ColumnMajor [K, N])
//   D = round_D(((acc * scale_a[m]) * scale_b[n]) + bias[n]), each step rounded to fp32
//
// Accumulation: cutlass::arch::OpMultiplyAdd (not OpMultiplyAddFastAccum) makes CUTLASS's
// multistage mainloop use staged accumulation for sm_89 FP8 (arch::detail::
// is_sm89_staged_policy_v): the mma.sync results of one K tile (64) are summed in a
// temporary fragment that is added into the fp32 accumulator once per tile, which bounds the
// tensor core's internal rounding to one 64-wide tile.
//
// Needs K % 16 == 0 (16-byte cp.async of A and B rows), N % 8 == 0 and 16-byte-aligned base
// pointers (see lowbit/cuda/fp8_native.h). Compiled into the sm_89 object only: Sm89Only<>
// replaces the kernel body by nothing for every other target.
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
namespace fp8_sm89 {

// 128x128x64 with eight 64x32 warps and 3 stages: 48 KiB of shared memory. Staged
// accumulation keeps two fp32 accumulator fragments per warp, so the int8 GEMM's 64x64 warp
// tile (2 x 128 floats per thread) spills, and so does a 64x32x128 warp tile (its operand
// fragments); 64x32x64 does not.
using TileShape = cutlass::gemm::GemmShape<128, 128, 64>;
using WarpShape = cutlass::gemm::GemmShape<64, 32, 64>;
using InstructionShape = cutlass::gemm::GemmShape<16, 8, 32>;
constexpr int kStages = 3;
constexpr int kAlignAB = 16;  // fp8 elements per 128-bit access
constexpr int kAlignOut = 8;  // N % 8 == 0 (fp8_native::shape_ok)

// 99 KiB: sm_89's per-block opt-in maximum.
constexpr int kMaxSharedBytes = 99 * 1024;

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

// The kernel body exists only in the sm_89 object (mma.sync on fp8 needs sm_89; on sm_90a
// the wgmma kernel serves instead); elsewhere an empty stub.
template <class Kernel>
struct Sm89Only : Kernel {
  CUTLASS_DEVICE static void invoke(typename Kernel::Params const& params, typename Kernel::SharedStorage& smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 890
    Kernel::invoke(params, smem);
#endif
  }
};

template <typename ElementA, typename ElementB, typename ElementD>
struct ScaledGemm {
  using RowMajor = cutlass::layout::RowMajor;
  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<TileShape, WarpShape, float, kAlignOut,
                                                                          /*EpilogueStages=*/1>;
  static constexpr auto kRn = cutlass::FloatRoundStyle::round_to_nearest;

  using Accum = cutlass::epilogue::threadblock::VisitorAccFetch;
  using ScaleA = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float,
                                                                    cute::Stride<cute::_1, cute::_0, cute::_0>>;
  using ScaleB = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, float,
                                                                    cute::Stride<cute::_0, cute::_1, cute::_0>>;
  using Bias = ScaleB;
  using TimesA = cutlass::epilogue::threadblock::VisitorCompute<MulRn, float, float, kRn>;
  using EvtTimesA = cutlass::epilogue::threadblock::Sm80EVT<TimesA, Accum, ScaleA>;
  using TimesB = cutlass::epilogue::threadblock::VisitorCompute<MulRn, float, float, kRn>;
  using EvtTimesB = cutlass::epilogue::threadblock::Sm80EVT<TimesB, EvtTimesA, ScaleB>;
  using PlusBias = cutlass::epilogue::threadblock::VisitorCompute<AddRn, ElementD, float, kRn>;
  using EvtPlusBias = cutlass::epilogue::threadblock::Sm80EVT<PlusBias, EvtTimesB, Bias>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<ThreadMap, ElementD, kRn,
                                                               cute::Stride<int64_t, cute::_1, int64_t>>;
  using Evt = cutlass::epilogue::threadblock::Sm80EVT<Store, EvtPlusBias>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementA, RowMajor, cutlass::ComplexTransform::kNone, kAlignAB,                       //
      ElementB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignAB,  //
      float, RowMajor, kAlignOut,                                                           //
      float, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm89, TileShape, WarpShape,
      InstructionShape, Evt, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages,
      cutlass::arch::OpMultiplyAdd, /*EpilogueStages=*/1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Sm89Only<Kernel>>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= kMaxSharedBytes, "fp8 sm89 GEMM tile too big");

  // Without a bias the tree still adds -0.0, the additive identity (as in int8_cutlass.cuh).
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
            {bias, -0.0f, {}},                // Bias
            {}                                // PlusBias
        },
        {out, {N, cute::_1{}, M * N}}         // Store
    };
  }
};

}  // namespace fp8_sm89
}  // namespace cuda
}  // namespace lowbit
