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
//   The tree and the kernel template are cutlass_evt_sm80.cuh's, shared with fp8 sm_89 and binary.
//
// Both need K % 16 == 0 (16-byte cp.async of A and B rows), N % 4 == 0 (4-element output
// stores and 16-byte loads of the per-column vectors) and 16-byte-aligned base pointers.
// The caller checks and otherwise takes its SIMT fallback.
#pragma once

#include <cuda_runtime.h>

// cutlass_evt_sm80.cuh first: it includes the visitor headers in the order they need.
#include "lowbit/cuda/cutlass_evt_sm80.cuh"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm.h"

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

// D = round_D(((float(acc) * scale_a[m]) * scale_b[n]) + bias[n]) (cutlass_evt_sm80.cuh).
template <typename ElementD>
struct Int8ScaledGemm {
  using Map = cutlass_evt::sm80::ThreadMap<TileShape, WarpShape, kAlignOut>;
  using Epilogue = cutlass_evt::sm80::ScaleBiasEpilogue<Map, ElementD>;
  using Kernel = cutlass_evt::sm80::GemmWithEvt<int8_t, int8_t, int32_t, cutlass::arch::Sm80, TileShape, WarpShape,
                                                InstructionShape, kStages, kAlignAB, kAlignOut, MathOp,
                                                typename Epilogue::Evt>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= kMaxSharedBytes, "scaled int8 GEMM tile too big");
};

}  // namespace int8_cutlass
}  // namespace cuda
}  // namespace lowbit
