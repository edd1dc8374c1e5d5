// The 2:4 sparse format's metadata (lowbit/formats/sparse24.py), as __host__ __device__ functions
// shared by the CPU kernels (csrc/cpu/sparse24.cpp, which compile them into the extension) and
// the CUDA kernels, and checked on the CPU against the Python format (tests/test_sparse24.py).
//
// meta: uint8 [N, Kp/8]; group g (columns 4g..4g+3) is nibble g%2 of byte g/2; in the nibble,
// bits 0-1 = i0 and bits 2-3 = i1, the columns 4g+i0 < 4g+i1 of values[n, 2g] and values[n, 2g+1].
// Read as little-endian 16-bit words this is the row-major metadata of mma.sp / CUTLASS
// SparseGemm before their reordering, which cutlass_meta_offset() computes.
#pragma once

#include <cstdint>

#ifndef LOWBIT_HD  // also defined, identically, by the other *_layout.h headers
#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif
#endif

namespace lowbit {
namespace sparse24_layout {

constexpr int kGroup = 4;    // 2:4: columns per group
constexpr int kKeep = 2;     // kept values per group
constexpr int kKAlign = 16;  // K is padded to a multiple of 16 (one 16-bit metadata word)

LOWBIT_HD int64_t padded_k(int64_t K) { return (K + kKAlign - 1) / kKAlign * kKAlign; }
LOWBIT_HD int64_t values_per_row(int64_t K) { return padded_k(K) / 2; }
LOWBIT_HD int64_t meta_bytes_per_row(int64_t K) { return padded_k(K) / 8; }

// The property "every metadata nibble is valid", as the ValidationCache (validated_once.h) tag:
// an inline variable, so the CPU and CUDA translation units share its address. Python code
// (lowbit/_checks.py) names it by this content.
inline constexpr char kMetaNibblesValid[] = "sparse24.meta";

// A nibble is valid when its two indices are strictly increasing: 0x4, 0x8, 0x9, 0xC, 0xD, 0xE.
LOWBIT_HD bool nibble_valid(uint32_t nibble) { return (nibble & 3u) < ((nibble >> 2) & 3u); }
LOWBIT_HD bool byte_valid(uint32_t byte) { return nibble_valid(byte & 0xFu) && nibble_valid(byte >> 4); }

// Column (0..Kp-1) of kept value j (0..Kp/2-1) of a row, from that row's metadata bytes.
LOWBIT_HD int64_t kept_column(const uint8_t* meta_row, int64_t j) {
  const int64_t g = j / kKeep;
  const uint32_t nibble = (meta_row[g / 2] >> (4 * (g % 2))) & 0xFu;
  return kGroup * g + ((nibble >> (2 * (j % kKeep))) & 3u);
}

// The 2-bit index (within its group) of kept value j of a 16-bit metadata word covering 8 kept
// values: bits 2j..2j+1. This is what the AVX2 kernel feeds vpermilps, which reads 2 bits per lane.
LOWBIT_HD uint32_t word_index(uint32_t word, int j) { return (word >> (2 * j)) & 3u; }

// CUTLASS's reorder_meta (tools/util/include/cutlass/util/host_reorder.h) for the sm_80 sparse
// tensor-core GEMM: element (r, c) of the row-major [rows, cols] metadata (16-bit elements for
// 16/32-bit values, 32-bit elements for int8 values) goes to this offset of the reordered array.
// Rows are interleaved within blocks of 32 (16 for int8), 2x2 blocks are swizzled, and the
// result is stored ColumnMajorInterleaved<2>. rows must be a multiple of the row block.
LOWBIT_HD int64_t cutlass_meta_offset(int64_t r, int64_t c, int64_t rows, bool int8_values) {
  const int64_t group = int8_values ? 16 : 32;
  const int64_t interweave = int8_values ? 2 : 4;
  int64_t dr = r / group * group + (r % 8) * interweave + (r % group) / 8;
  int64_t dc = c;
  const int64_t topright = (dr % 2 == 0 && dc % 2 == 1) ? 1 : 0;
  const int64_t bottomleft = (dr % 2 == 1 && dc % 2 == 0) ? 1 : 0;
  dr += topright - bottomleft;
  dc -= topright - bottomleft;
  return (dc / 2) * rows * 2 + dr * 2 + dc % 2;
}

}  // namespace sparse24_layout
}  // namespace lowbit
