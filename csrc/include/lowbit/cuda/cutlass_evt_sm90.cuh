// The CUTLASS 3.x pieces that lowbit's sm_90a GEMMs (fp8_cutlass_sm90.cuh, int4_cutlass_sm90.cuh)
// share: the sm_90a-only kernel wrapper, the epilogue visitor-tree nodes and the cooperative
// warp-specialized kernel they are built into.
//
// Epilogues (fp32 accumulator, each step rounded to fp32 by cutlass_evt.cuh's ops, the output
// conversion round-to-nearest-even in the last node; a null vector reads as its default):
//   ScaleBiasEpilogue  D = round_D(((acc * scale_a[m]) * scale_b[n]) + bias[n])   (fp8)
//   PlusBias<...>      D = round_D(x + bias[...]), the bias along rows or columns   (int4)
#pragma once

#include <atomic>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "lowbit/cuda/cutlass_evt.cuh"

namespace lowbit {
namespace cuda {
namespace cutlass_evt {
namespace sm90 {

constexpr auto kRn = cutlass::FloatRoundStyle::round_to_nearest;

// The kernel body exists only where wgmma / TMA do (sm_90a); elsewhere an empty stub (never
// launched: the launchers check the device and the binary version first). Each family
// derives its own `<family>::Sm90Only` from it: the kernel's mangled name then carries the
// family, which is how lowbit/cuda_resources.py attributes a CUTLASS kernel to its op.
template <class Kernel>
struct Sm90Only : Kernel {
  CUTLASS_DEVICE void operator()(typename Kernel::Params const& params, char* smem) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
    Kernel::operator()(params, smem);
#endif
  }
};

// fp32 vectors of the epilogue tile: one value per output row m, or per output column n (read
// with 16-byte loads: 16-byte aligned).
template <class TileShape>
using PerRow = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                           cute::Stride<cute::_1, cute::_0, int64_t>>;
template <class TileShape>
using PerCol = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                           cute::Stride<cute::_0, cute::_1, int64_t>>;

// round_D(x + bias), x the output of `Input`, the output conversion in this node.
template <class ElementD, class Input, class BiasVector>
using PlusBias = cutlass::epilogue::fusion::Sm90EVT<cutlass::epilogue::fusion::Sm90Compute<AddRn, ElementD, float, kRn>,
                                                   Input, BiasVector>;

// D = round_D(((acc * scale_a[m]) * scale_b[n]) + bias[n]); scale_a [M], scale_b [N] full
// vectors (the launchers expand scalars), bias [N] or null.
template <class TileShape, class ElementD>
struct ScaleBiasEpilogue {
  template <class Child, class Vector>
  using Times = cutlass::epilogue::fusion::Sm90EVT<cutlass::epilogue::fusion::Sm90Compute<MulRn, float, float, kRn>,
                                                   Child, Vector>;
  using TimesA = Times<cutlass::epilogue::fusion::Sm90AccFetch, PerRow<TileShape>>;
  using TimesB = Times<TimesA, PerCol<TileShape>>;
  using Evt = PlusBias<ElementD, TimesB, PerCol<TileShape>>;

  static typename Evt::Arguments arguments(const float* scale_a, const float* scale_b, const float* bias) {
    return typename Evt::Arguments{
        {
            {
                {},                   // Accum
                {scale_a, 0.f, {}},   // scale_a[m]
                {}                    // TimesA
            },
            {scale_b, 0.f, {}},       // scale_b[n]
            {}                        // TimesB
        },
        {bias, -0.0f, {}},            // bias[n] (nullptr -> -0.0, the additive identity)
        {}                            // PlusBias
    };
  }
};

// A TMA warp-specialized cooperative GEMM (two consumer warpgroups), persistent tile
// scheduler, one CTA per cluster (no multicast: the plain <<<>>> launch path and no
// cluster-divisibility constraint on the grid), fp32 accumulation, no source tensor C, the
// visitor tree `Evt` as epilogue and as many mainloop stages as fit beside its shared memory.
// ElementA may be a cute::tuple (mixed-input mainloops take the narrow type with its scales).
// Gate<Kernel> is the family's Sm90Only (above).
// Not an FP8FastAccum schedule: the fp8 mainloop this selects promotes to fp32 every
// K tile (fp8_cutlass_sm90.cuh).
template <class ElementA, class LayoutA, int kAlignA, class ElementB, class LayoutB, int kAlignB, class ElementD,
          class LayoutD, int kAlignD, class TileShape, class Evt, template <class> class Gate>
struct CooperativeGemm {
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      /*ElementC (no source)*/ void, LayoutD, kAlignD,  //
      ElementD, LayoutD, kAlignD,                        //
      cutlass::epilogue::TmaWarpSpecializedCooperative, Evt>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,  //
      ElementA, LayoutA, kAlignA,                           //
      ElementB, LayoutB, kAlignB,                           //
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Gate<Kernel>>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;
};

// Multiprocessors of `device`, for the persistent scheduler's grid (Arguments::hw_info). Asked
// on every launch, so cached per device.
inline int sm_count(int device) {
  static std::atomic<int> cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    n = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

}  // namespace sm90
}  // namespace cutlass_evt
}  // namespace cuda
}  // namespace lowbit
