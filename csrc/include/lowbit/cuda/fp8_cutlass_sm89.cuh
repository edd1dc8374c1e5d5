// CUTLASS 2.x FP8 GEMM for sm_89 (Ada): mma.sync m16n8k32 on e4m3/e5m2 operands with fp32
// accumulation, used by csrc/cuda/fp8_sm89.cu. The same kernel template and epilogue visitor
// tree as the int8 GEMM (cutlass_evt_sm80.cuh):
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

#include "lowbit/cuda/cutlass_evt_sm80.cuh"

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
  using Map = cutlass_evt::sm80::ThreadMap<TileShape, WarpShape, kAlignOut>;
  using Epilogue = cutlass_evt::sm80::ScaleBiasEpilogue<Map, ElementD>;
  using Kernel = cutlass_evt::sm80::GemmWithEvt<ElementA, ElementB, float, cutlass::arch::Sm89, TileShape, WarpShape,
                                                InstructionShape, kStages, kAlignAB, kAlignOut,
                                                cutlass::arch::OpMultiplyAdd, typename Epilogue::Evt>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Sm89Only<Kernel>>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= kMaxSharedBytes, "fp8 sm89 GEMM tile too big");

  // The signature of fp8_sm90::ScaledGemm::arguments (fp8_native_dispatch.cuh calls either);
  // the 2.x kernel needs no device information.
  static typename Gemm::Arguments arguments(const void* a, const void* b, const float* scale_a,
                                            const float* scale_b, const float* bias, void* out, int64_t M,
                                            int64_t N, int64_t K, int /*device_id*/) {
    const auto evt = Epilogue::arguments({}, scale_a, scale_b, bias, static_cast<ElementD*>(out), M, N);
    return cutlass_evt::sm80::arguments<Gemm>(evt, a, b, M, N, K);
  }
};

}  // namespace fp8_sm89
}  // namespace cuda
}  // namespace lowbit
