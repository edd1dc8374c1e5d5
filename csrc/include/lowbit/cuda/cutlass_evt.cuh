// Element-wise fp32 ops for the epilogue visitor trees of every lowbit CUTLASS GEMM, both the
// 2.x (cutlass_evt_sm80.cuh) and the 3.x (cutlass_evt_sm90.cuh) flavour: the compute nodes of
// both APIs call a functor template on cutlass::Array fragments.
//
// The rounding is explicit (__fmul_rn / __fadd_rn) so that nvcc cannot contract a scale
// multiply and the bias add into one FMA: the references (lowbit/backends/reference/*.py)
// round after every torch op, and one FMA would differ from them in the last bit.
#pragma once

#include "cutlass/array.h"
#include "cutlass/cutlass.h"

namespace lowbit {
namespace cuda {
namespace cutlass_evt {

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

}  // namespace cutlass_evt
}  // namespace cuda
}  // namespace lowbit
