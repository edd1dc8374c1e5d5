// Index and unpack math of the INT4 CUDA kernels (csrc/cuda/int4.cu), as plain
// __host__ __device__ functions.
//
// The packed format is lowbit/formats/int4.py: uint8 [N, ceil(K/32)*16], nibbles in blocks of
// 32 along K; in block b, byte 16b+j holds column 32b+j (low nibble) and 32b+16+j (high nibble).
// Every place a kernel turns (row, k) into a byte and a shift, or a lane into the k and n of a
// tensor-core fragment, is here, so that tests/test_cuda_build.py can compile this header with
// the host compiler and check it against lowbit.formats.int4.pack/unpack and the PTX fragment
// layouts. A wrong shift or lane map gives plausible numbers on a GPU; here it fails on a CPU.
#pragma once

#include <cstdint>
#include <cstring>

#ifndef LOWBIT_HD  // also defined, identically, by lowbit/int8_layout.h
#if defined(__CUDACC__)
#define LOWBIT_HD __host__ __device__ __forceinline__
#else
#define LOWBIT_HD inline
#endif
#endif

namespace lowbit {
namespace int4_layout {

constexpr int kBlock = 32;       // columns per packed block
constexpr int kBlockBytes = 16;  // bytes per packed block (one 128-bit load)
constexpr int kSymmetricZero = 8;

// ---------------------------------------------------------------------------- the format
LOWBIT_HD int64_t row_bytes(int64_t K) { return (K + kBlock - 1) / kBlock * kBlockBytes; }
LOWBIT_HD int64_t num_blocks(int64_t K) { return (K + kBlock - 1) / kBlock; }
// Byte (within a packed row) and shift of column k.
LOWBIT_HD int64_t byte_of(int64_t k) { return k / kBlock * kBlockBytes + k % kBlockBytes; }
LOWBIT_HD int shift_of(int64_t k) { return (k % kBlock) < kBlockBytes ? 0 : 4; }
LOWBIT_HD int code_at(const uint8_t* row, int64_t k) { return (row[byte_of(k)] >> shift_of(k)) & 0xF; }

// Group sizes are 32, 64, 128 (whole blocks) or K (a single group, which may end inside a
// block). Counting groups in blocks keeps the kernels' inner loops free of divisions by K.
LOWBIT_HD int64_t blocks_per_group(int64_t group_size, int64_t K) {
  return group_size % kBlock == 0 ? group_size / kBlock : num_blocks(K);
}
LOWBIT_HD int64_t group_of_block(int64_t block, int64_t bpg) { return block / bpg; }

// ---------------------------------------------------------------------------- nibble -> float
// A code u in [0, 15] becomes float(u) without an I2F (quarter rate on these SMs): the bits
// 0x4B000000 | u are the float 2^23 + u, and subtracting 2^23 is exact. The zero point is
// subtracted afterwards, in a second fp32 operation, because 2^23 + zero would round a
// non-integer zero (the reference computes float(u) - zero with exactly one rounding).
constexpr uint32_t kMagicBits = 0x4B000000u;
constexpr float kMagic = 8388608.f;  // 2^23

LOWBIT_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// Byte `i` (0..3) of `codes` (four codes, one per byte) as a float, via the magic number.
// On the GPU the OR with the magic is one PRMT: byte i of codes, then 0, 0, 0x4B.
LOWBIT_HD float code_byte_to_float(uint32_t codes, int i) {
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __byte_perm(codes, kMagicBits, 0x7540u + uint32_t(i));
#else
  const uint32_t bits = kMagicBits | ((codes >> (8 * i)) & 0xFFu);
#endif
  return bits_to_float(bits) - kMagic;
}

// The four low (h == 0) or high (h == 1) nibbles of a word of four packed bytes, one per byte.
LOWBIT_HD uint32_t nibbles(uint32_t word, int h) { return (word >> (4 * h)) & 0x0F0F0F0Fu; }

// ---------------------------------------------------------------------------- GEMV (small M)
// A warp streams a packed row: lane l takes block l of each 1024-column chunk (one 16-byte
// load; 32 lanes read 512 contiguous bytes). Its 16 bytes as four words: word w holds bytes
// 4w..4w+3, i.e. columns 4w..4w+3 in the low nibbles and 16+4w..16+4w+3 in the high ones.
namespace gemv {
constexpr int kChunk = 32 * kBlock;  // columns of x staged in shared memory per pass
constexpr int kMaxRows = 8;
constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;      // packed weight rows (outputs n) per warp

// Column (within the block) of byte e of word w, half h.
LOWBIT_HD int col_in_block(int w, int e, int h) { return 16 * h + 4 * w + e; }

// x is staged as fp32 [kMaxRows][32 columns of a block][33]: lane l reads column j of its
// block at (r * 32 + j) * 33 + l, consecutive lanes in consecutive banks. Column c of the chunk
// is block c / 32, offset c % 32; the odd row length 33 also makes the staging writes (c
// consecutive across threads) conflict-free.
constexpr int kLd = 33;
LOWBIT_HD int x_index(int r, int c) { return (r * kBlock + c % kBlock) * kLd + c / kBlock; }
constexpr int kXFloats = kMaxRows * kBlock * kLd;
}  // namespace gemv

// ---------------------------------------------------------------------------- mma.sync m16n8k16
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} (PTX ISA, "Matrix
// fragments for mma.m16n8k16 with floating point type"). groupID = lane / 4, tid = lane % 4.
namespace mma {
// B (16 x 8, k x n): register r (0, 1), half e (0, 1) holds B[k][n] with
LOWBIT_HD int b_k(int lane, int r, int e) { return 2 * (lane % 4) + e + 8 * r; }
LOWBIT_HD int b_n(int lane) { return lane / 4; }
// C/D (16 x 8, m x n): element c (0..3) is D[m][n] with
LOWBIT_HD int c_m(int lane, int c) { return lane / 4 + 8 * (c / 2); }
LOWBIT_HD int c_n(int lane, int c) { return 2 * (lane % 4) + c % 2; }
// ldmatrix.x4 of a 16x16 A tile: lane supplies the address of row a_row, column a_col.
LOWBIT_HD int a_row(int lane) { return lane % 16; }
LOWBIT_HD int a_col(int lane) { return 8 * (lane / 16); }

// Why the packing suits this fragment: k and k + 16 share a byte, so the bytes that hold a
// lane's B values for columns 0..15 of a block (low nibbles) hold its values for columns 16..31
// too (high nibbles). A lane gathers its 4 bytes once, as two 16-bit loads at these offsets
// within the 16-byte block, into one word (byte 2r + e = k offset b_k(lane, r, e)), then takes
// the low nibbles for the first k16 step and the high nibbles for the second.
LOWBIT_HD int b_pair_offset(int lane, int r) { return 2 * (lane % 4) + 8 * r; }
LOWBIT_HD uint32_t b_word(uint32_t pair0, uint32_t pair1) { return (pair0 & 0xFFFFu) | (pair1 << 16); }
// Column (within the block) of byte i = 2r + e of the word, k16 step h.
LOWBIT_HD int b_col(int lane, int i, int h) { return 16 * h + b_k(lane, i / 2, i % 2); }
}  // namespace mma

// ---------------------------------------------------------------------------- tiled (large M)
// Output tile kBM x kBN, K step = one packed block. Tensor-core variant: 4 warps in 2 x 2,
// each 32 x 32 (2 m16 tiles x 4 n8 tiles). The x tile (T = f16/bf16) [kBM][32] is loaded as
// 16-byte chunks of 8 elements; the packed tile [kBN][16 bytes] as one chunk per row.
namespace tiled {
constexpr int kBM = 64, kBN = 64;
constexpr int kThreads = 128;
constexpr int kStages = 2;
constexpr int kXLd = kBlock + 8;  // padded rows: 80 bytes, 16-byte aligned for ldmatrix, banks spread
constexpr int kXChunks = kBM * kBlock / 8;  // 16-byte chunks of the x tile
struct Chunk {
  int row;
  int col;
};
LOWBIT_HD Chunk x_chunk(int i) { return Chunk{i / (kBlock / 8), (i % (kBlock / 8)) * 8}; }

// fp32 SIMT variant: 256 threads, each owns a 4 x 4 sub-tile (rows t/16 + 16i, columns
// t%16 + 16j: a half-warp reads 16 distinct columns of B and broadcasts one of A). Thread t
// loads run of 8 columns x[t/4][8(t%4) ..] and packed bytes 4(t%4) .. +3 of weight row t/4,
// which decode to columns 4(t%4)+e (low) and 16+4(t%4)+e (high).
constexpr int kThreads32 = 256;
LOWBIT_HD int out_row32(int t, int i) { return t / 16 + 16 * i; }
LOWBIT_HD int out_col32(int t, int j) { return t % 16 + 16 * j; }
LOWBIT_HD Chunk x_run32(int t) { return Chunk{t / 4, (t % 4) * 8}; }
LOWBIT_HD int w_row32(int t) { return t / 4; }
LOWBIT_HD int w_byte32(int t) { return 4 * (t % 4); }
LOWBIT_HD int w_col32(int t, int e, int h) { return 16 * h + 4 * (t % 4) + e; }
}  // namespace tiled

// ---------------------------------------------------------------------------- cutlass_sm90 layout
// The copy of the weights that CUTLASS's sm_90 mixed-input GEMM reads (lowbit/formats/int4.py,
// "cutlass_sm90 layout"): uint8 [N, K/2], column k in byte k/2, low nibble for even k; each
// nibble the signed q = u - 8 (cutlass::int4b_t), i.e. u XOR 8; scale and zero' [G, N] in T.
// The CPU and CUDA repack kernels both build a byte with sm90::repack_byte, and the CPU
// dequantization reads one back with sm90::signed_code_at, so a wrong nibble order fails on a CPU.
namespace sm90 {
constexpr int kKAlign = 32;  // int4 elements per 16-byte TMA row unit
constexpr int kNAlign = 8;   // T elements per 16-byte row of scale / zero' / output
constexpr int kKTile = 64;   // the kernel's K tile: group sizes must be multiples of it (or K)

LOWBIT_HD int64_t row_bytes(int64_t K) { return K / 2; }
LOWBIT_HD int64_t byte_of(int64_t k) { return k / 2; }
LOWBIT_HD int shift_of(int64_t k) { return 4 * int(k % 2); }
LOWBIT_HD uint32_t signed_nibble(uint32_t u) { return u ^ uint32_t(kSymmetricZero); }
// Byte j of a repacked row from a row of the lowbit format: columns 2j and 2j+1.
LOWBIT_HD uint8_t repack_byte(const uint8_t* lowbit_row, int64_t j) {
  const uint32_t lo = signed_nibble(uint32_t(int4_layout::code_at(lowbit_row, 2 * j)));
  const uint32_t hi = signed_nibble(uint32_t(int4_layout::code_at(lowbit_row, 2 * j + 1)));
  return uint8_t(lo | (hi << 4));
}
// The signed q in [-8, 7] of column k of a repacked row.
LOWBIT_HD int signed_code_at(const uint8_t* row, int64_t k) {
  const int nib = (row[byte_of(k)] >> shift_of(k)) & 0xF;
  return nib - ((nib & 8) << 1);
}
// scale / zero' are [G, N], contiguous along N (CUTLASS wants them MN-major).
LOWBIT_HD int64_t scale_index(int64_t g, int64_t n, int64_t N) { return g * N + n; }
// zero' before its rounding to T: scale_T * (8 - zero), both steps in float32.
LOWBIT_HD float offset_zero(float scale_t, float zero) { return scale_t * (float(kSymmetricZero) - zero); }
}  // namespace sm90

}  // namespace int4_layout
}  // namespace lowbit
