// CUTLASS 3.x FP8 GEMM for sm_90a (Hopper): TMA loads, wgmma (QGMMA) with fp32 accumulation,
// warp-specialized cooperative kernel, used by csrc/cuda/fp8_sm90.cu.
//
//   A  fp8 [M, K] row-major  x  B  fp8 [N, K] row-major (= CUTLASS ColumnMajor [K, N])
//   e4m3 or e5m2 for each operand independently (wgmma takes every pairing)
//
// The epilogue visitor tree computes
//       D = round_D(((acc * scale_a[m]) * scale_b[n]) + bias[n])
// in that order, each step rounded to fp32: the reference's sequence of torch ops
// (lowbit/backends/reference/fp8.py), as in int8_cutlass.cuh.
//
// Accumulation: not the FP8FastAccum schedule. Hopper's fp8 wgmma keeps only part of the
// fp32 mantissa while it sums the products of one instruction chain; CUTLASS's plain FP8
// mainloop (MainloopSm90TmaGmmaWarpSpecializedFP8) therefore adds the wgmma results into a
// separate fp32 accumulator every `mma_promotion_interval` (4) k-blocks, i.e. once per
// 128-wide K tile. What remains is the tensor core's rounding inside one 128-wide tile; see
// tests/test_fp8_cuda.py for the bound the tests hold it to.
//
// Needs K % 16 == 0 (TMA: 16-byte row strides of A and B), N % 8 == 0 (16-byte rows of D for
// the TMA store, 16-byte vectors of scale_b and bias) and 16-byte-aligned base pointers.
//
// Compiled into the sm_90a object only: Sm90Only<> replaces the kernel body by nothing for
// every other target, so the sm_80 / sm_89 objects carry an empty stub (never launched:
// the launcher checks the device and the binary version first).
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace lowbit {
namespace cuda {
namespace fp8_sm90 {

using namespace cute;

// Element-wise fp32 ops with explicit rounding: no FMA contraction of the scale multiply
// into the bias add (the reference rounds each step).
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

// The kernel body exists only where wgmma / TMA do (sm_90a); elsewhere an empty stub.
template <class Kernel>
struct Sm90Only : Kernel {
  CUTLASS_DEVICE void operator()(typename Kernel::Params const& params, char* smem) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    Kernel::operator()(params, smem);
#endif
  }
};

// 128x128x128 tiles, one CTA per cluster (no multicast: the plain <<<>>> launch path and
// no cluster-divisibility constraint on the grid), two consumer warpgroups of 64x128.
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _1, _1>;
constexpr int kAlignAB = 16;  // fp8 elements per 16-byte TMA box row
constexpr int kAlignD = 8;    // N % 8 == 0: 16-byte rows for f16/bf16 (and 32 for f32)

template <typename ElementA, typename ElementB, typename ElementD>
struct ScaledGemm {
  static constexpr auto kRn = cutlass::FloatRoundStyle::round_to_nearest;
  using Accum = cutlass::epilogue::fusion::Sm90AccFetch;
  // scale_a[m]: a full [M] vector (the host expands scalars).
  using ScaleA = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
  // scale_b[n] and bias[n] ([N], 16-byte aligned). A null bias reads as -0.0 everywhere.
  using ScaleB = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
  using Bias = ScaleB;
  using TimesA = cutlass::epilogue::fusion::Sm90Compute<MulRn, float, float, kRn>;
  using EvtTimesA = cutlass::epilogue::fusion::Sm90EVT<TimesA, Accum, ScaleA>;
  using TimesB = cutlass::epilogue::fusion::Sm90Compute<MulRn, float, float, kRn>;
  using EvtTimesB = cutlass::epilogue::fusion::Sm90EVT<TimesB, EvtTimesA, ScaleB>;
  // The output conversion (round to nearest even) happens in this node.
  using PlusBias = cutlass::epilogue::fusion::Sm90Compute<AddRn, ElementD, float, kRn>;
  using Evt = cutlass::epilogue::fusion::Sm90EVT<PlusBias, EvtTimesB, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      /*ElementC (no source)*/ void, cutlass::layout::RowMajor, kAlignD,  //
      ElementD, cutlass::layout::RowMajor, kAlignD,                        //
      cutlass::epilogue::TmaWarpSpecializedCooperative, Evt>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,          //
      ElementA, cutlass::layout::RowMajor, kAlignAB,                 //
      ElementB, cutlass::layout::ColumnMajor, kAlignAB,              //
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      // Not ...FP8FastAccum: the promoting mainloop (see the file comment).
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Sm90Only<Kernel>>;
  // Dynamic (the pipeline: 6 stages of 2 x 16 KiB, plus the epilogue's TMA-store buffers) plus
  // the 1 KiB of static shared memory ptxas reports for these kernels, within sm_90's 227 KiB
  // per-block maximum. The f32-output kernel fills it exactly (231424 + 1024 bytes).
  static_assert(Kernel::SharedStorageSize + 1024 <= 227 * 1024, "fp8 sm90 GEMM tile too big");

  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;

  static typename Gemm::Arguments arguments(const void* a, const void* b, const float* scale_a,
                                            const float* scale_b, const float* bias, void* out, int M, int N,
                                            int K, int device_id, int sm_count) {
    typename Evt::Arguments evt{
        {
            {
                {},                   // Accum
                {scale_a, 0.f, {}},   // ScaleA
                {}                    // TimesA
            },
            {scale_b, 0.f, {}},       // ScaleB
            {}                        // TimesB
        },
        {bias, -0.0f, {}},            // Bias (nullptr -> -0.0, the additive identity)
        {}                            // PlusBias
    };
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const ElementA*>(a), cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1)),
         static_cast<const ElementB*>(b), cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1))},
        {evt, nullptr, cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1)),
         static_cast<ElementD*>(out), cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1))}};
    args.hw_info.device_id = device_id;
    args.hw_info.sm_count = sm_count;
    return args;
  }
};

}  // namespace fp8_sm90
}  // namespace cuda
}  // namespace lowbit
