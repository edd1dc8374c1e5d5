// Bit layout of the binary (±1) family and the index maps of its CUDA kernels, as plain
// __host__ __device__ functions (format: lowbit/formats/binary.py).
//
// Rows are packed along K into 32-bit words, LSB first; bit 1 = +1. Every kernel computes
//   dot = K - 2 * popcount(a XOR b)
// over the K real bits, masking the last word, so padding bits never change a result.
// sm_90 has no b1 mma with .xor.popc (PTX: sm_80..sm_89 only), only .and.popc, so the tensor-core
// GEMM (CUTLASS, arch::OpAndPopc) counts AND and its epilogue applies
// popc(a ^ b) = popc(a) + popc(b) - 2 popc(a & b). Kept here, these compile without CUDA (the CPU
// extension includes this header) and tests/test_cuda_build.py checks them on the CPU against the
// format's definition and against CUTLASS's own sub-byte addressing.
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

// ---------------------------------------------------------------------------- CUTLASS b1 GEMM
// For M > kGemvMaxRows the CUDA GEMM is CUTLASS's b1 tensor-core GEMM (cuda/binary_cutlass.cuh):
// A = cutlass::uint1b_t row-major [M, K'], B = uint1b_t column-major [K', N] (= our row-major
// [N, W'] words), int32 accumulators of popc(a AND b) (.and.popc: sm_90 has no .xor.popc).
//
// Packing: CUTLASS addresses sub-byte element e of a buffer as bit e % 32 of 32-bit word e / 32
// (LSB first, little-endian containers), with e = row * ld + k for row-major (ld in elements, i.e.
// bits). With ld = 32 * W' that is bit k % 32 of word row * W' + k / 32: the format's own packing,
// so the int32 words are handed to CUTLASS as they are.
constexpr int kGemvMaxRows = 8;           // M at or below this: the __popc GEMV
constexpr int kCutlassAlignBits = 128;    // CUTLASS b1 operands move in 128-bit accesses
constexpr int kCutlassAlignWords = kCutlassAlignBits / kWordBits;
constexpr int kCutlassTileN = 256;        // = binary_cutlass::TileShape::kN (static_assert there)
constexpr int64_t kCutlassMaxDim = 2147483647;  // GemmCoord is int: M, N and K' must fit
constexpr int64_t kMaxGridY = 65535;      // CUTLASS's identity swizzle puts N tiles on grid.y

// Words per row that CUTLASS reads: W rounded up to whole 128-bit accesses.
LOWBIT_HD int64_t cutlass_row_words(int64_t K) {
  return (num_words(K) + kCutlassAlignWords - 1) / kCutlassAlignWords * kCutlassAlignWords;
}

// The CUTLASS element offset of (row, k) in a matrix of `row_words` words per row (row-major A,
// or column-major B with `row` = n), and the word / bit that holds it.
LOWBIT_HD int64_t b1_element_offset(int64_t row, int64_t k, int64_t row_words) {
  return row * row_words * kWordBits + k;
}
struct WordBit {
  int64_t word;
  int bit;
};
LOWBIT_HD WordBit b1_word_bit(int64_t element_offset) {
  return WordBit{element_offset / kWordBits, int(element_offset % kWordBits)};
}

// The operands go to CUTLASS as they are only when every row is whole 128-bit accesses with no
// padding bit (K % 128 == 0) and the base is 16-byte aligned; otherwise a prepass copies them
// into rows of cutlass_row_words(K) words with the padding bits cleared (padding bits may be set:
// the format says kernels ignore them, and AND would count them).
LOWBIT_HD bool cutlass_needs_repack(int64_t K, bool base_16_byte_aligned) {
  return K % kCutlassAlignBits != 0 || !base_16_byte_aligned;
}

// Word w of a row as CUTLASS gets it after the repack: the row's word with its padding bits
// cleared, and 0 for the words past the row (w >= W) that round it up to whole accesses.
LOWBIT_HD uint32_t cutlass_operand_word(const uint32_t* row, int64_t K, int64_t W, int64_t w) {
  return w < W ? row[w] & word_mask(K, w) : 0u;
}

enum class GemmPath : int { kGemv = 0, kCutlass = 1 };

// M <= kGemvMaxRows: a tensor-core tile of 128 rows would be mostly empty. Shapes past CUTLASS's
// int coordinates or grid limits (N > 65535 * 256 columns, K' >= 2^31 bits) take the GEMV too:
// slow, but exact for any size.
LOWBIT_HD GemmPath gemm_path(int64_t M, int64_t N, int64_t K) {
  if (M <= kGemvMaxRows) return GemmPath::kGemv;
  if (M > kCutlassMaxDim || N > kCutlassMaxDim) return GemmPath::kGemv;
  if ((N + kCutlassTileN - 1) / kCutlassTileN > kMaxGridY) return GemmPath::kGemv;
  if (cutlass_row_words(K) * kWordBits > kCutlassMaxDim) return GemmPath::kGemv;
  return GemmPath::kCutlass;
}

// The XNOR dot from the AND count, split into a per-row term of A, a per-row term of B and the
// accumulator, for the epilogue:
//   dot = K - 2 popc(a ^ b) = K - 2 pa - 2 pb + 4 and = a_term + b_term + 4 and.
// The terms and 4 * and can exceed int32 for K near 2^31, but the dot itself is in [-K, K]:
// computed modulo 2^32 (unsigned arithmetic, defined wrap-around) the int32 result is exact.
LOWBIT_HD int32_t cutlass_a_term(int64_t K, int64_t popc_a) {
  return int32_t(uint32_t(K) - 2u * uint32_t(popc_a));
}
LOWBIT_HD int32_t cutlass_b_term(int64_t popc_b) { return int32_t(0u - 2u * uint32_t(popc_b)); }
LOWBIT_HD int32_t dot_from_terms(int32_t a_term, int32_t b_term, int32_t and_count) {
  return int32_t(uint32_t(a_term) + uint32_t(b_term) + 4u * uint32_t(and_count));
}

}  // namespace binary_layout
}  // namespace lowbit
