// Bit layout of the binary (±1) family and the index maps of its CUDA kernels, as plain
// __host__ __device__ functions (format: lowbit/formats/binary.py).
//
// Rows are packed along K into 32-bit words, LSB first; bit 1 = +1. Every kernel computes
//   dot = K - 2 * popcount(a XOR b)
// over the K real bits, masking the last word, so padding bits never change a result.
// sm_90 has no b1 mma with .xor.popc (PTX: sm_80..sm_89 only), only .and.popc, so the CUDA
// kernels use popc(a ^ b) = popc(a) + popc(b) - 2 popc(a & b). Kept here, these compile without
// CUDA and tests/test_cuda_build.py checks them on the CPU against the definition.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif

namespace lowbit {
namespace binary_layout {

constexpr int kWordBits = 32;

LOWBIT_HD int64_t num_words(int64_t K) { return (K + kWordBits - 1) / kWordBits; }

// The real bits of word `w` of a row of length K: all ones, except in the last (partial) word,
// and zero for a word entirely past K.
LOWBIT_HD uint32_t word_mask(int64_t K, int64_t w) {
  const int64_t real = K - w * kWordBits;
  if (real >= kWordBits) return 0xffffffffu;
  if (real <= 0) return 0u;
  return (uint32_t(1) << real) - 1u;
}

LOWBIT_HD int32_t dot_from_xor_count(int64_t K, int64_t xor_count) { return int32_t(K - 2 * xor_count); }

// XNOR dot from AND counts: popc(a ^ b) = popc(a) + popc(b) - 2 popc(a & b), all over real bits.
LOWBIT_HD int32_t dot_from_and_count(int64_t K, int64_t popc_a, int64_t popc_b, int64_t and_count) {
  return dot_from_xor_count(K, popc_a + popc_b - 2 * and_count);
}

// ---------------------------------------------------------------------------- mma.sync m16n8k256 b1
// PTX ISA, "Matrix fragments for mma.m16n8k256" (.b1): A is 16x256 bits = 16 rows x 8 words, held
// as 4 .b32 registers per thread; B is 256x8 bits (8 columns x 8 words), 2 registers; C/D are
// 16x8 int32, 4 registers. With lane = 4 * group + tig (group = lane / 4, tig = lane % 4):
//   A reg i: row group + 8 * (i % 2), word tig + 4 * (i / 2)
//   B reg i: col group,               word tig + 4 * i
//   C reg i: row group + 8 * (i / 2), col 2 * tig + (i % 2)
struct RowWord {
  int row;
  int word;
};

LOWBIT_HD RowWord mma_b1_a_frag(int lane, int i) { return RowWord{lane / 4 + 8 * (i % 2), lane % 4 + 4 * (i / 2)}; }

LOWBIT_HD RowWord mma_b1_b_frag(int lane, int i) { return RowWord{lane / 4, lane % 4 + 4 * i}; }

struct RowCol {
  int row;
  int col;
};

LOWBIT_HD RowCol mma_b1_c_frag(int lane, int i) { return RowCol{lane / 4 + 8 * (i / 2), 2 * (lane % 4) + (i % 2)}; }

}  // namespace binary_layout
}  // namespace lowbit
