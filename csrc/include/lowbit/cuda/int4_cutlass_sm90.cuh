// CUTLASS 3.x INT4 x fp16/bf16 mixed-input GEMM for sm_90a (Hopper), used by
// csrc/cuda/int4_sm90.cu: the collective behind CUTLASS example 55_hopper_mixed_dtype_gemm
// (sm90_mma_tma_gmma_rs_warpspecialized_mixed_input.hpp). TMA loads the int4 weights, the
// group scales and the offset zeros into shared memory; the consumer warpgroups convert the
// weights to T in registers (w = q * scale + zero', in T arithmetic) and feed them as the
// register operand A of wgmma (HGMMA, fp32 accumulation); B (the activations) stays in shared
// memory.
//
// The narrow type must be operand A (the collective keeps the converted operand in registers,
// and TMA epilogues do not take its implicit swap), so the problem is computed transposed:
//   D' (N x M) = W (N x K, int4, K-major)  x  X^T (K x M; X [M, K] row-major = K-major B)
// and D' column-major [N, M] is exactly out [M, N] row-major. Tokens (M) are the N' dimension
// of the swapped problem. Weights in the cutlass_sm90 layout of lowbit/formats/int4.py.
//
// Epilogue: D' = round_T(acc + bias[n]) (bias float32, null -> -0.0), one fp32 add then the
// conversion, as the reference (lowbit/backends/reference/int4.py) adds the bias in float32.
//
// Shapes (refused by lowbit/_checks.py and checks.h before any launch): K % 32 == 0 (16-byte
// TMA rows of int4), N % 8 == 0 (16-byte rows of scale, zero' and D', the float bias vector),
// group_size a multiple of the K tile (64, 128) or equal to K (the collective's can_implement).
// Base pointers 16-byte aligned (the launcher copies a misaligned operand).
//
// Compiled into the sm_90a object only: Sm90Only<> leaves an empty stub for other targets.
// The kernel skeleton and the epilogue nodes are cutlass_evt_sm90.cuh's, shared with fp8.
#pragma once

#include <cuda_runtime.h>

#include "cutlass/util/packed_stride.hpp"
#include "lowbit/cuda/cutlass_evt_sm90.cuh"

namespace lowbit {
namespace cuda {
namespace int4_sm90 {

using namespace cute;

// 128 weight rows x 128 tokens x 64 K per tile (64 = 128 bytes of 16-bit B per row, the
// swizzle width; also the group-size granule), one CTA per cluster, cooperative: two consumer
// warpgroups of 64 x 128. One tile config keeps this file's compile time modest.
constexpr int kTileK = 64;
using TileShape = Shape<_128, _128, Int<kTileK>>;
constexpr int kAlignW = 32;  // int4 elements per 16 bytes
constexpr int kAlignX = 8;   // 16-bit elements per 16 bytes
constexpr int kAlignD = 8;

// This family's name for the sm_90a-only kernel (see cutlass_evt::sm90::Sm90Only).
template <class Kernel>
struct Sm90Only : cutlass_evt::sm90::Sm90Only<Kernel> {};

template <typename T>  // cutlass::half_t or cutlass::bfloat16_t: activations, scale, zero', output
struct MixedGemm {
  // bias[n]: n is the row (M') of the swapped problem, hence a per-row vector where fp8's
  // ScaleBiasEpilogue has a per-column one.
  using Evt = cutlass_evt::sm90::PlusBias<T, cutlass::epilogue::fusion::Sm90AccFetch,
                                          cutlass_evt::sm90::PerRow<TileShape>>;
  // D' column-major [N, M] (= out [M, N] row-major).
  using Cooperative =
      cutlass_evt::sm90::CooperativeGemm<cute::tuple<cutlass::int4b_t, T, T>, cutlass::layout::RowMajor,
                                         kAlignW,                                         // W: K-major, scale + zero
                                         T, cutlass::layout::ColumnMajor, kAlignX,        // X^T: K-major
                                         T, cutlass::layout::ColumnMajor, kAlignD, TileShape, Evt, Sm90Only>;
  using Mainloop = typename Cooperative::Mainloop;
  using Kernel = typename Cooperative::Kernel;
  using Gemm = typename Cooperative::Gemm;
  // Dynamic shared memory plus up to 1 KiB of static, within sm_90's 227 KiB per block.
  static_assert(Kernel::SharedStorageSize + 1024 <= 227 * 1024, "int4 sm90 GEMM tile too big");

  using StrideA = typename Cooperative::StrideA;
  using StrideB = typename Cooperative::StrideB;
  using StrideD = typename Cooperative::StrideD;
  using StrideScale = typename Mainloop::StrideScale;

  // w: [N, K/2] bytes; scale, zero: [G, N]; x: [M, K]; bias: float [N] or null; out: [M, N].
  static typename Gemm::Arguments arguments(const void* w, const void* scale, const void* zero, int group_size,
                                            const void* x, const float* bias, void* out, int M, int N, int K,
                                            int device_id, int sm_count) {
    const int groups = (K + group_size - 1) / group_size;
    typename Evt::Arguments evt{
        {},                  // Accum
        {bias, -0.0f, {}},   // bias[n] (nullptr -> -0.0, the additive identity)
        {}                   // PlusBias
    };
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {N, M, K, 1},
        {static_cast<const cutlass::int4b_t*>(w), cutlass::make_cute_packed_stride(StrideA{}, make_shape(N, K, 1)),
         static_cast<const T*>(x), cutlass::make_cute_packed_stride(StrideB{}, make_shape(M, K, 1)),
         static_cast<const T*>(scale), cutlass::make_cute_packed_stride(StrideScale{}, make_shape(N, groups, 1)),
         group_size, static_cast<const T*>(zero)},
        {evt, nullptr, cutlass::make_cute_packed_stride(StrideD{}, make_shape(N, M, 1)), static_cast<T*>(out),
         cutlass::make_cute_packed_stride(StrideD{}, make_shape(N, M, 1))}};
    args.hw_info.device_id = device_id;
    args.hw_info.sm_count = sm_count;
    return args;
  }
};

}  // namespace int4_sm90
}  // namespace cuda
}  // namespace lowbit
