// CUTLASS 3.x FP8 GEMM for sm_90a (Hopper): TMA loads, wgmma (QGMMA) with fp32 accumulation,
// warp-specialized cooperative kernel, used by csrc/cuda/fp8_sm90.cu.
//
//   A  fp8 [M, K] row-major  x  B  fp8 [N, K] row-major (= CUTLASS ColumnMajor [K, N])
//   e4m3 or e5m2 for each operand independently (wgmma takes every pairing)
//
// The epilogue visitor tree (cutlass_evt_sm90.cuh's ScaleBiasEpilogue) computes
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

#include "cutlass/util/packed_stride.hpp"
#include "lowbit/cuda/cutlass_evt_sm90.cuh"

namespace lowbit {
namespace cuda {
namespace fp8_sm90 {

using namespace cute;

// 128x128x128 tiles, one CTA per cluster, two consumer warpgroups of 64x128
// (cutlass_evt_sm90.cuh's CooperativeGemm).
using TileShape = Shape<_128, _128, _128>;
constexpr int kAlignAB = 16;  // fp8 elements per 16-byte TMA box row
constexpr int kAlignD = 8;    // N % 8 == 0: 16-byte rows for f16/bf16 (and 32 for f32)

// This family's name for the sm_90a-only kernel (see cutlass_evt::sm90::Sm90Only).
template <class Kernel>
struct Sm90Only : cutlass_evt::sm90::Sm90Only<Kernel> {};

template <typename ElementA, typename ElementB, typename ElementD>
struct ScaledGemm {
  using Epilogue = cutlass_evt::sm90::ScaleBiasEpilogue<TileShape, ElementD>;
  // Not ...FP8FastAccum: the promoting mainloop (see the file comment).
  using Cooperative =
      cutlass_evt::sm90::CooperativeGemm<ElementA, cutlass::layout::RowMajor, kAlignAB,     //
                                         ElementB, cutlass::layout::ColumnMajor, kAlignAB,  //
                                         ElementD, cutlass::layout::RowMajor, kAlignD, TileShape,
                                         typename Epilogue::Evt, Sm90Only>;
  using Kernel = typename Cooperative::Kernel;
  using Gemm = typename Cooperative::Gemm;
  // Dynamic (the pipeline: 6 stages of 2 x 16 KiB, plus the epilogue's TMA-store buffers) plus
  // the 1 KiB of static shared memory ptxas reports for these kernels, within sm_90's 227 KiB
  // per-block maximum. The f32-output kernel fills it exactly (231424 + 1024 bytes).
  static_assert(Kernel::SharedStorageSize + 1024 <= 227 * 1024, "fp8 sm90 GEMM tile too big");

  using StrideA = typename Cooperative::StrideA;
  using StrideB = typename Cooperative::StrideB;
  using StrideD = typename Cooperative::StrideD;

  // CUTLASS 3.x's problem shape is int.
  static typename Gemm::Arguments arguments(const void* a, const void* b, const float* scale_a,
                                            const float* scale_b, const float* bias, void* out, int64_t M64,
                                            int64_t N64, int64_t K64, int device_id) {
    const int M = int(M64), N = int(N64), K = int(K64);
    const auto evt = Epilogue::arguments(scale_a, scale_b, bias);
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const ElementA*>(a), cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1)),
         static_cast<const ElementB*>(b), cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1))},
        {evt, nullptr, cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1)),
         static_cast<ElementD*>(out), cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1))}};
    args.hw_info.device_id = device_id;
    args.hw_info.sm_count = cutlass_evt::sm90::sm_count(device_id);
    return args;
  }
};

}  // namespace fp8_sm90
}  // namespace cuda
}  // namespace lowbit
