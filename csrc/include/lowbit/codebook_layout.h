// Bit-stream and index math of the codebook format (lowbit/formats/codebook.py), as plain
// __host__ __device__ functions shared by the CPU (csrc/cpu/codebook.cpp) and CUDA
// (csrc/cuda/codebook.cu) kernels.
//
// Per row, code i = j*C + c occupies bits [i*bits, (i+1)*bits) of the row's bytes, bit 0 the least
// significant bit of byte 0. tests/test_cuda_build.py compiles this header with the host compiler
// and checks code_at against lowbit.formats.codebook.pack for every width.
#pragma once

#include <cstdint>

#ifndef LOWBIT_HD  // also defined, identically, by the other lowbit/*_layout.h headers
#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif
#endif

namespace lowbit {
namespace codebook_layout {

constexpr int kMaxBits = 16;

LOWBIT_HD int64_t row_bytes(int64_t num_codes, int bits) { return (num_codes * bits + 7) / 8; }

// Code number i of a packed row of row_bytes bytes. A code of <= 16 bits starting at a bit offset
// <= 7 lies within 3 bytes; bytes past the row are never read (they belong to the next row, or to
// nothing).
LOWBIT_HD uint32_t code_at(const uint8_t* row, int64_t i, int bits, int64_t row_bytes) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  uint32_t v = row[byte];
  if (byte + 1 < row_bytes) v |= static_cast<uint32_t>(row[byte + 1]) << 8;
  if (byte + 2 < row_bytes) v |= static_cast<uint32_t>(row[byte + 2]) << 16;
  return (v >> (bit & 7)) & ((1u << bits) - 1u);
}

// Index of entry `code` of codebook c for row n and sub-vector j in a contiguous
// [R, G, C, E, d] codebook tensor (times d gives the first of its d values).
LOWBIT_HD int64_t entry_index(int64_t n, int64_t j, int64_t c, uint32_t code, int64_t rows_per_r,
                              int64_t vecs_per_g, int64_t G, int64_t C, int64_t E) {
  return (((n / rows_per_r) * G + j / vecs_per_g) * C + c) * E + code;
}

// ---- whole-word decode (the CUDA GEMV's fast path)
// When bits * C divides 32, a little-endian 32-bit word of a row holds whole sub-vectors:
// word w has subvecs_per_word(bits, C) = 32 / (bits * C) of them, sub-vector j = w * that + s,
// and its code c sits at bit (s * C + c) * bits. A kernel may then load one aligned word per step
// (row_bytes a multiple of 4) and, when every word lies in one column group (vecs_per_g a multiple
// of the sub-vectors per word), look up one codebook group per word.
LOWBIT_HD int subvecs_per_word(int bits, int C) { return 32 / (bits * C); }

LOWBIT_HD bool word_decode_applies(int bits, int C, int64_t row_bytes, int64_t vecs_per_g) {
  const int per_code = bits * C;
  return per_code <= 32 && 32 % per_code == 0 && row_bytes % 4 == 0 &&
         vecs_per_g % subvecs_per_word(bits, C) == 0;
}

LOWBIT_HD uint32_t code_in_word(uint32_t word, int s, int c, int bits, int C) {
  const uint32_t mask = bits >= 32 ? 0xFFFFFFFFu : ((1u << bits) - 1u);
  return (word >> ((s * C + c) * bits)) & mask;
}

// Little-endian word w of a packed row (what a uint32 load gives on every target lowbit runs on).
LOWBIT_HD uint32_t word_at(const uint8_t* row, int64_t w) {
  const uint8_t* p = row + 4 * w;
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16 |
         static_cast<uint32_t>(p[3]) << 24;
}

}  // namespace codebook_layout
}  // namespace lowbit
