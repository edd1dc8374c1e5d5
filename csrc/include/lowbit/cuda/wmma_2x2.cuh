// The tensor-core core of the hand-written 64x64 tile kernels (int8 weight-only, fp8 and
// codebook): four warps as 2 x 2 of 32 x 32, each 2 x 2 WMMA 16x16x16 fragments with fp32
// accumulators, over operand tiles staged in shared memory as [row][k] (A rows are output
// rows m, B rows are output columns n, so B is B^T stored column-major).
#pragma once

#include <mma.h>

namespace lowbit {
namespace cuda {
namespace wmma_2x2 {

using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// acc += A[wm * 32 .. +32][0 .. kBK) x B[wn * 32 .. +32][0 .. kBK)^T for warp (wm, wn); a and b
// are the block's operand tiles, kLd elements per row.
template <int kBK, typename T, int kRowsA, int kRowsB, int kLd>
__device__ __forceinline__ void mma_tile(Acc (&acc)[2][2], const T (&a)[kRowsA][kLd], const T (&b)[kRowsB][kLd], int wm,
                                         int wn) {
  namespace wmma = nvcuda::wmma;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &a[wm * 32 + i * 16][kk], kLd);
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &b[wn * 32 + j * 16][kk], kLd);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

// Warp (wm, wn)'s 32 x 32 sums into the block's fp32 tile c (kLdC floats per row): the
// fragments' element map is opaque, so epilogues read the sums back from shared memory.
template <int kRows, int kLdC>
__device__ __forceinline__ void store_tile(float (&c)[kRows][kLdC], const Acc (&acc)[2][2], int wm, int wn) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(&c[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kLdC,
                                      nvcuda::wmma::mem_row_major);
}

}  // namespace wmma_2x2
}  // namespace cuda
}  // namespace lowbit
