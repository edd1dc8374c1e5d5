// Codebook family, CPU kernels: codebook_mm and codebook_dequant (format:
// lowbit/formats/codebook.py, spec: lowbit/backends/reference/codebook.py).
//
// Numerics: each weight is the sum of its C codebook entries in float32, in order c = 0, 1, ...
// exactly as the reference decodes it; codebook_dequant then multiplies by scale[n] (bit-exact
// with the reference). codebook_mm multiplies a row's whole dot product by scale[n] instead of
// every weight (equal up to float32 rounding), and accumulates in float32.
//
// The float weight is never materialized whole. At M <= kSmallM the codes are decoded in
// registers and multiplied at once (fused_*); beyond, rows of the weight are decoded one tile at a
// time (kTileK columns of a few rows, L1/L2-resident) and an FMA microkernel runs every row of x
// over the tile before the next is decoded. Decoding is the cost at small M:
//  * 4-bit scalar codes (kmeans4): vpshufb lookups in byte planes of the 16-entry codebook, 32
//    weights per 16 code bytes (fp16-exact codebooks: 2 planes and vcvtph2ps); x is permuted
//    once per call into the decoder's output order.
//  * other scalar codebooks of <= 16 entries: 8 weights from one 32-bit load, a variable shift
//    and two in-register table lookups (vpermps).
//  * one vector codebook with byte codes (pq2: d = 4; d = 2, 8): 8 codes per 64-bit load, each
//    entry's byte offset cut out by a rotation and an AND, entries from the L1-resident fp32
//    codebook straight into 8-wide registers.
//  * the rest (C >= 2 summed codebooks, 16-bit codes) sums C entry loads per sub-vector.
// The FAISS-style lookup table (per row of x and sub-vector j, T[j][e] = x_j . entry e, then one
// table load and add per code) was built and measured for byte codes and lost at every d on this
// Zen 3 (one thread, M = 1, N = K = 4096, fp32 tables: pq2 2.1 ms vs 1.75 ms decoding, d = 8
// 1.35 vs 1.0 ms, d = 2 4.9 vs 2.9 ms; M = 4 pq2 11.4 vs 3.3 ms): a table load + add costs
// about what decoding a d-float entry and half an FMA cost, and its M tables cannot share one
// decode. (Its speed in FAISS comes from int8 tables in registers, which round the answer.)
// Each call opens exactly one at::parallel_for (over tiles of output channels).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "lowbit/checks.h"
#include "lowbit/codebook_layout.h"
#include "lowbit/cpu/amx.h"
#include "lowbit/cpu/decoded_gemm.h"
#include "lowbit/cpu/isa.h"
#include "lowbit/cpu/vec_avx2.h"

namespace lowbit {
namespace {

// Columns decoded per tile: 4 KiB of fp32 per row, a multiple of 8 sub-vectors of every d.
constexpr int64_t kTileK = 1024;
// Rows per tile: at small M the tile is decoded for few FMAs, so small tiles keep it in L1 and
// give threads fine-grained work; at large M, 48 rows (192 KiB) amortize x's reloads.
constexpr int64_t kSmallM = 4;
constexpr int64_t kTileNSmall = 8;
constexpr int64_t kTileNLarge = 48;

constexpr int64_t kNibbleBlock = 32;

// From these M, on CPUs with AMX-BF16 (bf16 x) or AVX-512F (fp32/fp16 x), the decoded weight goes
// to torch's GEMM (lowbit/cpu/decoded_gemm.h). Measured on the 2-vCPU AMX Xeon VM (N = K = 4096,
// fp16 codebooks, 2 threads, 1 GiB read before each call, median of 7, ms), own tiles vs decoded
// GEMM: kmeans4 bf16 M = 16 4.1 / 4.8, 32 6.7 / 5.2, 64 11.9 / 6.5, 256 45.9 / 10.0; fp32 M = 64
// 12.0 / 12.0, 128 22.7 / 18.3, 256 45.3 / 30.7; pq2 and aq2 (2x8) alike (pq2 bf16 M = 256 45.4
// / 10.7, aq2 48.8 / 14.1). The bf16 route starts later than int4's (16): its panels are decoded
// through an fp32 tile, not straight to bf16. Where AMX-BF16 is ready, bf16 x of kAmxMinM to
// kAmxMaxM rows takes lowbit's own AMX kernel instead.
constexpr int64_t kDecodedGemmMinMBf16 = 24;
constexpr int64_t kDecodedGemmMinMFp32 = 96;
// bf16 x from kAmxMinM to kAmxMaxM rows, on CPUs with AMX-BF16: the AMX kernel (amx_mm). Measured
// as above (bf16 x, speed over fp32 F.linear, kmeans4 / pq2), AMX vs without it (own tiles, from
// M = 24 the decoded-GEMM route): M = 8 1.96x / 2.37x, 10 2.41 / 2.33, 12 2.50 / 2.27, 16 2.38 /
// 1.70, 24 2.02 / 1.32, 64 2.19 / 1.36 (pq2 2.10 / 1.46), 96 1.64 / 1.48, 128 1.72 / 1.90. The
// AMX kernel is bound by the decode (about 3.2 ms at 4096 x 4096 from M = 1 to 24), and decodes
// again for every 64 rows of x.
constexpr int64_t kAmxMinM = 10;
constexpr int64_t kAmxMaxM = 96;
// The same for scalar 4-bit codebooks (amx_nibble_mm, a table-lookup decoder). Measured as above
// (kmeans4, bf16 x, ms), AMX vs without it: M = 1 1.03 / 0.83, 2 1.07 / 1.09, 4 1.01 / 1.52, 8
// 1.13 / 2.76, 16 1.13 / 4.13, 64 2.34 / 7.31, 256 10.7 / 11.3, 512 27.8 / 16.6 (fp32 F.linear
// 2.5, 2.7, 5.1, 7.2, 7.8, 10.2, 26.7, 51.5).
constexpr int64_t kAmxNibbleMinM = 2;
constexpr int64_t kAmxNibbleMaxM = 256;

// Position within a 32-column block of column `c` in the decoder's output order: float t of
// 128-bit lane l of output register q holds column 2 * (4q + t) + l (lane 0: low nibbles, lane
// 1: high nibbles of code bytes 4q+t).
inline int64_t nibble_position(int64_t c) {
  const int64_t lane = c & 1, i = c >> 1, q = i >> 2, t = i & 3;
  return q * 8 + lane * 4 + t;
}

// The same for the fp16 decoder: output register 2h + l holds columns 16h + 2t + l, t = 0..7.
inline int64_t nibble_position_half(int64_t c) {
  const int64_t lane = c & 1, i = c >> 1, h = i >> 3, t = i & 7;
  return (2 * h + lane) * 8 + t;
}

struct Problem {
  int64_t M, N, K, Kp;          // Kp: K rounded up to 8 (x and tiles are zero-padded to it)
  int64_t R, G, C, E, bits, d, J;
  int64_t rows_per_rgroup, vecs_per_group, row_bytes;
  const uint8_t* codes;         // [N, row_bytes]
  const float* cb;              // fp32 [R, G, C, E, d]
  const float* scale;           // fp32 [N] or nullptr
  const float* bias;            // fp32 [N] or nullptr
  void* out;                    // [M, N] in out_type
  c10::ScalarType out_type;
  float* partial;               // [M, N] fp32 sums over earlier K-tiles; aliases out for fp32
  const uint8_t* planes;        // nibble path: [R*G][4][32] byte planes of the 16-entry codebooks
  bool planes_half;             // ... of their fp16 values (planes 0, 1): every entry is fp16-exact
};

inline void store_out(const Problem& p, int64_t i, float v) {
  switch (p.out_type) {
    case c10::ScalarType::Half: static_cast<c10::Half*>(p.out)[i] = c10::Half(v); break;
    case c10::ScalarType::BFloat16: static_cast<c10::BFloat16*>(p.out)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(p.out)[i] = v; break;
  }
}

// Up to 4 bytes of a row starting at `byte`, little-endian; never reads past the row.
inline uint32_t load_u32_clamped(const uint8_t* row, int64_t byte, int64_t row_bytes) {
  uint32_t v = 0;
  if (byte + 4 <= row_bytes) {
    std::memcpy(&v, row + byte, 4);
  } else {
    for (int64_t b = byte; b < row_bytes; ++b) v |= static_cast<uint32_t>(row[b]) << (8 * (b - byte));
  }
  return v;
}

// Code number i of a row: byte and 16-bit codes directly, other widths by the shared definition.
inline uint32_t code_at(const Problem& p, const uint8_t* row, int64_t i) {
  if (p.bits == 8) return row[i];
  if (p.bits == 16) return static_cast<uint32_t>(row[2 * i]) | (static_cast<uint32_t>(row[2 * i + 1]) << 8);
  return codebook_layout::code_at(row, i, static_cast<int>(p.bits), p.row_bytes);
}

inline const float* codebook_of(const Problem& p, int64_t n, int64_t g) {
  return p.cb + ((n / p.rows_per_rgroup) * p.G + g) * p.C * p.E * p.d;
}

// Sub-vectors [j0, j1) of row n (unscaled sums of their C entries) into dst, portable code: the
// decoder of every case the AVX2 fast path does not take, and of the scalar ISA path.
template <int D>
void decode_generic(const Problem& p, int64_t n, int64_t j0, int64_t j1, float* dst) {
  const uint8_t* row = p.codes + n * p.row_bytes;
  const int64_t entry = p.E * D;
  for (int64_t j = j0; j < j1; ++j) {
    const float* cb = codebook_of(p, n, j / p.vecs_per_group);
    float v[D];
    const float* e0 = cb + static_cast<int64_t>(code_at(p, row, j * p.C)) * D;
    for (int t = 0; t < D; ++t) v[t] = e0[t];
    for (int64_t c = 1; c < p.C; ++c) {
      const float* e = cb + c * entry + static_cast<int64_t>(code_at(p, row, j * p.C + c)) * D;
      for (int t = 0; t < D; ++t) v[t] += e[t];
    }
    for (int t = 0; t < D; ++t) dst[(j - j0) * D + t] = v[t];
  }
}

void decode_portable(const Problem& p, int64_t n, int64_t j0, int64_t j1, float* dst) {
  switch (p.d) {
    case 1: decode_generic<1>(p, n, j0, j1, dst); break;
    case 2: decode_generic<2>(p, n, j0, j1, dst); break;
    case 4: decode_generic<4>(p, n, j0, j1, dst); break;
    default: decode_generic<8>(p, n, j0, j1, dst); break;
  }
}

// Runs where AVX2/FMA are missing (and when LOWBIT_CPU_ISA=scalar, so tests can reach it).
void mm_scalar(const Problem& p, const float* x) {
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> wrow(p.K);
    for (int64_t n = n0; n < n1; ++n) {
      decode_portable(p, n, 0, p.J, wrow.data());
      const float s = p.scale ? p.scale[n] : 1.0f;
      for (int64_t m = 0; m < p.M; ++m) {
        const float* xr = x + m * p.Kp;
        float acc = 0.0f;
        for (int64_t k = 0; k < p.K; ++k) acc += xr[k] * wrow[k];
        acc *= s;
        store_out(p, m * p.N + n, p.bias ? acc + p.bias[n] : acc);
      }
    }
  });
}

// ----------------------------------------------------------------------------- AVX2 path
// Only functions defined below are compiled for AVX2. No torch/c10 function is defined here:
// an out-of-line copy of one, compiled under this target, could be picked by the linker for the
// whole library and run on a machine without AVX2.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Scalar codebooks of <= 16 entries (bits <= 4, d = 1, C = 1): eight codes fill bits*8 <= 32
// bits starting on a byte boundary (j0 is a multiple of 8), so one 32-bit load, one variable
// shift and a mask give 8 indices; the 16-entry table lives in two registers (vpermps uses the
// low 3 index bits, bit 3 picks the half).
void decode_scalar_small_avx2(const Problem& p, int64_t n, int64_t j0, int64_t j1, float* dst) {
  const uint8_t* row = p.codes + n * p.row_bytes;
  const int b = static_cast<int>(p.bits);
  const __m256i shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
  const __m256i mask = _mm256_set1_epi32((1 << b) - 1);
  int64_t j = j0;
  while (j < j1) {
    const int64_t g = j / p.vecs_per_group;
    const int64_t seg_end = std::min(j1, (g + 1) * p.vecs_per_group);
    const float* cb = codebook_of(p, n, g);
    float table[16] = {};
    std::memcpy(table, cb, p.E * sizeof(float));
    const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    for (; j < seg_end && (j & 7); ++j) dst[j - j0] = cb[code_at(p, row, j)];
    for (; j + 8 <= seg_end; j += 8) {
      const uint32_t word = load_u32_clamped(row, (j * b) >> 3, p.row_bytes);
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), mask);
      __m256 v = _mm256_permutevar8x32_ps(lo, idx);
      if (p.E > 8)
        v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      _mm256_storeu_ps(dst + (j - j0), v);
    }
    for (; j < seg_end; ++j) dst[j - j0] = cb[code_at(p, row, j)];
  }
}

// One codebook of d = 2, 4 or 8 and byte codes (the 2-bit "pq2" layout and its kin): a byte load
// and one 8/16/32-byte copy per sub-vector.
template <int D>
void decode_vec_byte_avx2(const Problem& p, int64_t n, int64_t j0, int64_t j1, float* dst) {
  const uint8_t* row = p.codes + n * p.row_bytes;
  int64_t j = j0;
  while (j < j1) {
    const int64_t g = j / p.vecs_per_group;
    const int64_t seg_end = std::min(j1, (g + 1) * p.vecs_per_group);
    const float* cb = codebook_of(p, n, g);
    for (; j < seg_end; ++j) {
      const float* e = cb + static_cast<int64_t>(row[j]) * D;
      if constexpr (D == 8) _mm256_storeu_ps(dst + (j - j0) * 8, _mm256_loadu_ps(e));
      else if constexpr (D == 4) _mm_storeu_ps(dst + (j - j0) * 4, _mm_loadu_ps(e));
      else std::memcpy(dst + (j - j0) * 2, e, 8);
    }
  }
}

void decode_avx2(const Problem& p, int64_t n, int64_t j0, int64_t j1, float* dst) {
  if (p.d == 1 && p.C == 1 && p.bits <= 4) return decode_scalar_small_avx2(p, n, j0, j1, dst);
  if (p.C == 1 && p.bits == 8 && p.d == 8) return decode_vec_byte_avx2<8>(p, n, j0, j1, dst);
  if (p.C == 1 && p.bits == 8 && p.d == 4) return decode_vec_byte_avx2<4>(p, n, j0, j1, dst);
  if (p.C == 1 && p.bits == 8 && p.d == 2) return decode_vec_byte_avx2<2>(p, n, j0, j1, dst);
  decode_portable(p, n, j0, j1, dst);
}

// ---- 4-bit scalar codebooks (kmeans4): byte-plane lookups with vpshufb.
// A 16-entry fp32 codebook is split into its four byte planes (byte p of every entry); vpshufb
// looks up 32 nibbles in one plane at once, and two rounds of unpacks reassemble the four bytes
// of each of the 32 floats. 16 code bytes decode with 1 load, 1 shift, 1 AND, 4 vpshufb and
// 8 unpacks: about half the shuffle-port work of the per-8 vpermps pair + blend. The floats come
// out in a fixed permutation of the 32 columns (nibble_position); x is permuted once per call to
// match, so the dot product needs no un-shuffling.
struct Nibble32 {
  __m256 f[4];
};

inline Nibble32 decode_nibble32(const uint8_t* code_bytes, const uint8_t* planes) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code_bytes)));
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                       _mm256_set1_epi8(0x0f));
  const __m256i* pl = reinterpret_cast<const __m256i*>(planes);
  const __m256i b0 = _mm256_shuffle_epi8(_mm256_load_si256(pl + 0), idx);
  const __m256i b1 = _mm256_shuffle_epi8(_mm256_load_si256(pl + 1), idx);
  const __m256i b2 = _mm256_shuffle_epi8(_mm256_load_si256(pl + 2), idx);
  const __m256i b3 = _mm256_shuffle_epi8(_mm256_load_si256(pl + 3), idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  Nibble32 r;
  r.f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  r.f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  r.f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  r.f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
  return r;
}

// The same from the two byte planes of fp16 entries (exactly the fp32 entries: planes_half): 2
// vpshufb, 2 unpacks, 2 lane extracts and 4 vcvtph2ps, half the shuffles of decode_nibble32.
inline Nibble32 decode_nibble32_half(const uint8_t* code_bytes, const uint8_t* planes) {
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(code_bytes)));
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                       _mm256_set1_epi8(0x0f));
  const __m256i* pl = reinterpret_cast<const __m256i*>(planes);
  const __m256i lo = _mm256_shuffle_epi8(_mm256_load_si256(pl + 0), idx);
  const __m256i hi = _mm256_shuffle_epi8(_mm256_load_si256(pl + 1), idx);
  const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
  Nibble32 r;
  r.f[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
  r.f[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  r.f[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(b));
  r.f[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(b, 1));
  return r;
}

template <bool kHalf>
inline Nibble32 decode_nibble(const uint8_t* code_bytes, const uint8_t* planes) {
  if constexpr (kHalf) return decode_nibble32_half(code_bytes, planes);
  else return decode_nibble32(code_bytes, planes);
}

inline const uint8_t* planes_of(const Problem& p, int64_t n, int64_t g) {
  return p.planes + ((n / p.rows_per_rgroup) * p.G + g) * 128;
}

// Full 32-blocks of sub-vectors of group g: [g*vpg, nibble_block_end(g)); the rest of the group
// (only when G = 1 and J is not a multiple of 32) is decoded one code at a time in column order.
inline int64_t nibble_block_end(const Problem& p, int64_t g) {
  return g * p.vecs_per_group + p.vecs_per_group / kNibbleBlock * kNibbleBlock;
}

// Columns [j0, j1) of row n (j0, j1 multiples of 32 or j1 = the group end) into dst, full blocks
// in the permuted order. Used by the large-M tiles.
void decode_nibble_avx2(const Problem& p, int64_t n, int64_t j0, int64_t j1, float* dst) {
  const uint8_t* row = p.codes + n * p.row_bytes;
  int64_t j = j0;
  while (j < j1) {
    const int64_t g = j / p.vecs_per_group;
    const int64_t seg_end = std::min(j1, (g + 1) * p.vecs_per_group);
    const int64_t blk_end = std::min(seg_end, nibble_block_end(p, g));
    const uint8_t* planes = planes_of(p, n, g);
    for (; j + kNibbleBlock <= blk_end; j += kNibbleBlock) {
      const Nibble32 w = p.planes_half ? decode_nibble32_half(row + j / 2, planes) : decode_nibble32(row + j / 2, planes);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dst + (j - j0) + 8 * q, w.f[q]);
    }
    const float* cb = codebook_of(p, n, g);
    for (; j < seg_end; ++j) dst[j - j0] = cb[code_at(p, row, j)];
  }
}

// The fused small-M kernels walk NR rows of codes at once, each row only row_bytes long (2 KiB
// for 4-bit codes at K = 4096): each prefetches, once per cache line, the same position
// cpu::kPrefetchTilesAhead tiles (of NR rows) further on. Measured
// (one thread, M = 1, 4096 x 4096, caches evicted before each call, min of 31, under load,
// three interleaved A/B runs), no prefetch -> one tile ahead: kmeans4 2.01-2.12 -> 1.57-1.65
// ms, kmeans3 3.57 -> 3.23-3.33, pq2 2.31-2.56 -> 1.83-2.56, aq2 3.42-4.82 -> 3.10-3.87. Then
// one -> two tiles ahead (two threads, 64 MiB read before each call, median of 100, mean over
// five interleaved runs): kmeans4 1.01 -> 0.94 ms, pq2 1.04 -> 0.96, aq2 1.17 -> 1.06; three
// tiles ahead was no better.
inline void prefetch_tiles_ahead(const uint8_t* row, int64_t tile_offset) {
  _mm_prefetch(reinterpret_cast<const char*>(row + cpu::kPrefetchTilesAhead * tile_offset), _MM_HINT_T0);
}

// kShared: the NR rows share one codebook (one row group), so one set of planes serves them all.
// With a set per row, and two accumulators per row, NR = 4 needed 18 ymm registers and GCC kept
// all eight accumulators on the stack (a store-to-load forward in every FMA chain). One
// accumulator per row once there are four or more chains: the chains still hide the FMA latency.
template <int MR, int NR, bool kHalf, bool kShared>
__attribute__((noinline)) void fused_nibble(const Problem& p, const float* x, int64_t m0, int64_t n0) {
  constexpr int kAccs = NR * MR >= 4 ? 1 : 2;
  constexpr int kPlaneSets = kShared ? 1 : NR;
  __m256 acc[NR][MR][kAccs];
  float tail[NR][MR] = {};
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < kAccs; ++a) acc[r][m][a] = _mm256_setzero_ps();
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = p.codes + (n0 + r) * p.row_bytes;
  for (int64_t g = 0; g < p.G; ++g) {
    const uint8_t* planes[kPlaneSets];
    for (int r = 0; r < kPlaneSets; ++r) planes[r] = planes_of(p, n0 + r, g);
    const int64_t blk_end = nibble_block_end(p, g);
    int64_t j = g * p.vecs_per_group;
    for (; j < blk_end; j += kNibbleBlock) {
      if ((j & 127) == 0)  // every 64 bytes of codes (a step is 32 codes, 16 bytes)
        for (int r = 0; r < NR; ++r) prefetch_tiles_ahead(rows[r] + j / 2, NR * p.row_bytes);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const Nibble32 w = decode_nibble<kHalf>(rows[r] + j / 2, planes[kShared ? 0 : r]);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          const float* xm = x + m * p.Kp + j;
          acc[r][m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xm), w.f[0], acc[r][m][0]);
          acc[r][m][kAccs - 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), w.f[1], acc[r][m][kAccs - 1]);
          acc[r][m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), w.f[2], acc[r][m][0]);
          acc[r][m][kAccs - 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), w.f[3], acc[r][m][kAccs - 1]);
        }
      }
    }
    for (; j < (g + 1) * p.vecs_per_group; ++j)
      for (int r = 0; r < NR; ++r) {
        const float wv = codebook_of(p, n0 + r, g)[code_at(p, rows[r], j)];
        for (int m = 0; m < MR; ++m) tail[r][m] += x[m * p.Kp + j] * wv;
      }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      const __m256 sum = kAccs == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][kAccs - 1]) : acc[r][m][0];
      float v = hsum(sum) + tail[r][m];
      if (p.scale) v *= p.scale[n0 + r];
      store_out(p, (m0 + m) * p.N + n0 + r, p.bias ? v + p.bias[n0 + r] : v);
    }
}

// MR rows of x times NR decoded weight rows over `len` columns (a multiple of 8); partial sums
// are added to what earlier K-tiles left (first: start from 0); the last tile applies scale and
// bias and rounds to the output dtype.
template <int MR, int NR>
void dot_tile(const Problem& p, const float* x, const float* w, int64_t len, int64_t m0, int64_t n0, bool first,
              bool last) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < len; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_ps(w + r * kTileK + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * p.Kp + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const int64_t i = (m0 + m) * p.N + n0 + r;
      float v = hsum(acc[m][r]);
      if (!first) v = p.partial[i] + v;
      if (!last) {
        p.partial[i] = v;
      } else {
        if (p.scale) v *= p.scale[n0 + r];
        store_out(p, i, p.bias ? v + p.bias[n0 + r] : v);
      }
    }
}

template <int MR>
void dot_rows(const Problem& p, const float* x, const float* tile, int64_t rows, int64_t len, int64_t m0,
              int64_t n0, bool first, bool last) {
  int64_t r = 0;
  for (; r + 3 <= rows; r += 3) dot_tile<MR, 3>(p, x, tile + r * kTileK, len, m0, n0 + r, first, last);
  if (rows - r == 2) dot_tile<MR, 2>(p, x, tile + r * kTileK, len, m0, n0 + r, first, last);
  if (rows - r == 1) dot_tile<MR, 1>(p, x, tile + r * kTileK, len, m0, n0 + r, first, last);
}

// scratch: one tile_n x kTileK tile per thread, allocated by the caller (outside this target).
void mm_avx2(const Problem& p, const float* xp, float* scratch, int64_t tile_n) {
  const int64_t ntiles = (p.N + tile_n - 1) / tile_n;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    float* const tile = scratch + at::get_thread_num() * tile_n * kTileK;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile_n, rows = std::min(tile_n, p.N - n0);
      for (int64_t k0 = 0; k0 < p.K; k0 += kTileK) {
        const int64_t k1 = std::min(p.K, k0 + kTileK);
        const int64_t len = (k1 - k0 + 7) / 8 * 8;
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = tile + r * kTileK;
          if (p.planes) decode_nibble_avx2(p, n0 + r, k0, k1, dst);
          else decode_avx2(p, n0 + r, k0 / p.d, k1 / p.d, dst);
          for (int64_t k = k1 - k0; k < len; ++k) dst[k] = 0.0f;  // meets x's zero padding
        }
        const bool first = k0 == 0, last = k1 == p.K;
        const float* x = xp + k0;
        int64_t m = 0;
        for (; m + 4 <= p.M; m += 4) dot_rows<4>(p, x + m * p.Kp, tile, rows, len, m, n0, first, last);
        switch (p.M - m) {
          case 3: dot_rows<3>(p, x + m * p.Kp, tile, rows, len, m, n0, first, last); break;
          case 2: dot_rows<2>(p, x + m * p.Kp, tile, rows, len, m, n0, first, last); break;
          case 1: dot_rows<1>(p, x + m * p.Kp, tile, rows, len, m, n0, first, last); break;
          default: break;
        }
      }
    }
  });
}


// ---- small M, fused: decode in registers and FMA at once (no tile round trip through L1).
// Per row: 8 weights of a scalar codebook of <= 16 entries (see decode_scalar_small_avx2), and
// the tail of a segment that is not a multiple of 8 done one weight at a time.
template <int MR, int NR, bool kBigTable>
void fused_scalar_small(const Problem& p, const float* x, int64_t m0, int64_t n0) {
  const int b = static_cast<int>(p.bits);
  const __m256i shifts = _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b);
  const __m256i mask = _mm256_set1_epi32((1 << b) - 1);
  // Eight codes start on a byte boundary and span b bytes; a 4-byte load is in bounds while
  // its first byte is <= row_bytes - 4 (later blocks use the clamped load).
  const int64_t safe_j = p.row_bytes >= 4 ? ((p.row_bytes - 4) * 8 / b) / 8 * 8 : 0;
  __m256 acc[NR][MR];
  float tail[NR][MR] = {};
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = p.codes + (n0 + r) * p.row_bytes;
  for (int64_t g = 0; g < p.G; ++g) {
    const int64_t j_begin = g * p.vecs_per_group, j_end = j_begin + p.vecs_per_group;
    __m256 lo[NR], hi[NR];
    const float* cbs[NR];
    for (int r = 0; r < NR; ++r) {
      cbs[r] = codebook_of(p, n0 + r, g);
      float table[16] = {};
      std::memcpy(table, cbs[r], p.E * sizeof(float));
      lo[r] = _mm256_loadu_ps(table);
      hi[r] = _mm256_loadu_ps(table + 8);
    }
    int64_t j = j_begin;
    for (; j < j_end && (j & 7); ++j)
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) tail[r][m] += x[m * p.Kp + j] * cbs[r][code_at(p, rows[r], j)];
    for (; j + 8 <= j_end; j += 8) {
      __m256 xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * p.Kp + j);
      const int64_t byte = (j * b) >> 3;
      if ((j & 127) == 0)  // every 16 * bits bytes
        for (int r = 0; r < NR; ++r) prefetch_tiles_ahead(rows[r] + byte, NR * p.row_bytes);
      for (int r = 0; r < NR; ++r) {
        uint32_t word;
        if (j < safe_j) std::memcpy(&word, rows[r] + byte, 4);
        else word = load_u32_clamped(rows[r], byte, p.row_bytes);
        const __m256i idx =
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), mask);
        __m256 w = _mm256_permutevar8x32_ps(lo[r], idx);
        if constexpr (kBigTable)
          w = _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(hi[r], idx),
                               _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_fmadd_ps(xv[m], w, acc[r][m]);
      }
    }
    for (; j < j_end; ++j)
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MR; ++m) tail[r][m] += x[m * p.Kp + j] * cbs[r][code_at(p, rows[r], j)];
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      float v = hsum(acc[r][m]) + tail[r][m];
      if (p.scale) v *= p.scale[n0 + r];
      store_out(p, (m0 + m) * p.N + n0 + r, p.bias ? v + p.bias[n0 + r] : v);
    }
}

// Vector codebooks of d = 4 or 8 with byte or 16-bit codes and any number C of summed
// codebooks (pq2, aq2, AQLM-style 1x16): per sub-vector C entry loads (the codebook is L1/L2
// resident), their sum, one FMA per row of x. d = 4 pairs two sub-vectors into one register
// (so its groups must hold an even number of sub-vectors: see fused_ok).
template <int MR, int NR, int D, int kCodeBytes, int kC>
void fused_vector(const Problem& p, const float* x, int64_t m0, int64_t n0) {
  constexpr int kStep = D == 8 ? 1 : 2;  // sub-vectors per 8 weights
  // kC: the number of summed codebooks when it is 1 or 2 (a compile-time loop the compiler keeps
  // in registers; a runtime one cost 4x at C = 2), else 0 and p.C is used.
  const int64_t C = kC ? kC : p.C;
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = p.codes + (n0 + r) * p.row_bytes;
  const int64_t entry = p.E * D;
  for (int64_t g = 0; g < p.G; ++g) {
    const float* cbs[NR];
    for (int r = 0; r < NR; ++r) cbs[r] = codebook_of(p, n0 + r, g);
    const int64_t j_end = (g + 1) * p.vecs_per_group;
    for (int64_t j = g * p.vecs_per_group; j < j_end; j += kStep) {
      if ((j & 31) == 0)  // every 32 * C * kCodeBytes bytes
        for (int r = 0; r < NR; ++r) prefetch_tiles_ahead(rows[r] + j * C * kCodeBytes, NR * p.row_bytes);
      __m256 xv[MR];
      for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * p.Kp + j * D);
      for (int r = 0; r < NR; ++r) {
        __m256 w = _mm256_setzero_ps();
#pragma GCC unroll 2
        for (int64_t c = 0; c < C; ++c) {
          const float* cb = cbs[r] + c * entry;
          int64_t i0 = j * C + c, e0, e1 = 0;
          if constexpr (kCodeBytes == 1) {
            e0 = rows[r][i0];
            if constexpr (D == 4) e1 = rows[r][i0 + C];
          } else {
            uint16_t v0, v1 = 0;
            std::memcpy(&v0, rows[r] + 2 * i0, 2);
            if constexpr (D == 4) std::memcpy(&v1, rows[r] + 2 * (i0 + C), 2);
            e0 = v0;
            e1 = v1;
          }
          __m256 e;
          if constexpr (D == 8) e = _mm256_loadu_ps(cb + e0 * 8);
          else e = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(cb + e0 * 4)), _mm_loadu_ps(cb + e1 * 4), 1);
          // c = 0 starts from the entry itself, as the reference's 0 + entry does exactly.
          w = c == 0 ? e : _mm256_add_ps(w, e);
        }
        for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_fmadd_ps(xv[m], w, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      float v = hsum(acc[r][m]);
      if (p.scale) v *= p.scale[n0 + r];
      store_out(p, (m0 + m) * p.N + n0 + r, p.bias ? v + p.bias[n0 + r] : v);
    }
}

// One vector codebook with byte codes (pq2 = d 4, and d 2 / 8): d-float entries loaded straight
// from the L1-resident fp32 codebook into 8-wide registers (d = 4: two entries per register,
// d = 2: four), one FMA per register and row of x, x loaded once for NR rows. Codes: eight from
// one 64-bit load, each entry's byte offset cut out by a rotation and an AND. Session 3 measured
// one byte load per code faster for d = 4 at M = 1 (1.57 vs 1.62 ms, one thread); once the
// accumulators stopped spilling and the offsets lost their extract-and-scale, the shifts won
// (session 5, one thread, warm, 4096 x 4096: byte loads 1.41-1.47 ms, shifts 1.31-1.39, shifts
// with direct offsets 1.26-1.31), so the byte-load decoder is gone. A variant with one 128-bit FMA
// per entry (memory operand, no lane insert) measured the same as the insert (and 5-8% slower
// once the offsets came from rotations).
// Session 8 tried three more ways to cut the instructions per code, in a standalone copy (one
// thread, pinned, warm, 4096 x 4096, d = 4, min of 60, three interleaved runs): this decoder
// 1.35-1.41 ms; byte offsets widened to uint16 by AVX2 into a stack buffer, then one 16-bit
// load per entry offset, 1.38-1.41 ms; the lookup table T[j][e] = x_j . e again, blocked to 32
// sub-vectors (32 KiB, L1) so that it stays cached, with one scalar load-add per code 1.94-2.06
// ms, and with vpgatherdps of 8 codes 1.96-2.03 ms. The uint16-offset form, ported into this
// kernel (32 codes per pass, a volatile 16-bit load per offset so that GCC does not extract
// them from ymm registers with vpextrw, one 128-bit FMA with a memory operand per entry), was
// slower in the op: one thread, warm, 1.43-1.53 ms against this decoder's 1.16-1.19 (four
// interleaved runs). The decoder stays; at about 1.2 codes per cycle it sits near what the
// core's load and issue ports allow for one entry load per code.
// What is left is the format. The one 2-bit PQ layout a register table could decode much faster is
// d = 2 with 16 entries (4-bit codes: FAISS fast-scan's vpshufb lookup of x_j . entry for 32 rows
// at once, exact in fp32 from four byte planes; estimated at about half this decoder's instructions
// per weight, not built). Session 9 measured what it costs in quality, as relative reconstruction
// error |W - W_q|^2 / |W|^2 of product_quantize on all-MiniLM-L6-v2's layer-0 weights (384 x 384
// and 1536 x 384 / 384 x 1536) and a 1024^2 Gaussian: d = 4, 256 entries, G = 8 (pq2) 0.079-0.098,
// Gaussian 0.092; d = 2, 16 entries, G = 8: 0.117-0.173, Gaussian 0.110; with G = 32, or a codebook
// per 64 rows, 0.107-0.170. That is 30-90% more error on the real layers, about what scalar 2-bit
// quantization gives (Lloyd-Max on a Gaussian: 0.118), so pq2 keeps d = 4 and the 6x target at M =
// 1 stays unmet.

// w rotated right by s bits (s mod 64; negative s rotates left), compiled to one rorx.
inline uint64_t rotate_right(uint64_t w, int s) {
  s &= 63;
  return s == 0 ? w : (w >> s) | (w << (64 - s));
}

template <int D>
inline __m256 pq_entries(const float* cb, uint64_t w, int i) {
  // Register i of the 8 sub-vectors whose codes are the bytes of w.
  // d = 4, 8: byte offsets (code * 4d) straight from a rotation and an AND each, instead of a
  // shift, a byte extract and a scale (d = 4, M = 1, one thread: 1.37 -> 1.26 ms; d = 8 equal).
  // A rotation rather than a shift because BMI2's rorx writes a new register: two instructions
  // per offset instead of a copy, a shift and an AND. The loop issues ~4.3 instructions per
  // cycle, so that one counts (d = 4, M = 1, one thread, standalone copy: 1.33 -> 1.20 ms).
  const char* base = reinterpret_cast<const char*>(cb);
  auto entry_at = [base](uint64_t offset) { return reinterpret_cast<const float*>(base + offset); };
  if constexpr (D == 8) {
    return _mm256_loadu_ps(entry_at(rotate_right(w, 8 * i - 5) & 0x1fe0));
  } else if constexpr (D == 4) {
    const uint64_t o0 = rotate_right(w, 16 * i - 4) & 0xff0, o1 = rotate_right(w, 16 * i + 4) & 0xff0;
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(entry_at(o0))), _mm_loadu_ps(entry_at(o1)), 1);
  } else {
    // d = 2 keeps extract-and-scale indexing: direct offsets measured 3-8% slower here.
    const uint64_t c = w >> (32 * i);
    const __m128d lo = _mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(cb + (c & 0xff) * 2)),
                                    reinterpret_cast<const double*>(cb + ((c >> 8) & 0xff) * 2));
    const __m128d hi = _mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(cb + ((c >> 16) & 0xff) * 2)),
                                    reinterpret_cast<const double*>(cb + ((c >> 24) & 0xff) * 2));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_castpd_ps(lo)), _mm_castpd_ps(hi), 1);
  }
}

template <int MR, int NR, int D>
__attribute__((noinline)) void fused_pq_byte(const Problem& p, const float* x, int64_t m0, int64_t n0) {
  constexpr int kRegs = D;  // 8 sub-vectors = 8 * D floats = D registers
  // Two accumulators per row only while they fit in registers with the rest: at NR = 4 GCC
  // spilled four of the eight (the array must also be sized kAccs: an unused half kept it in
  // memory), putting a store-to-load forward into every FMA chain. Measured one thread, warm,
  // 4096 x 4096 d = 4: M = 1 1.72-1.77 -> 1.46-1.52 ms, M = 2 2.24-2.29 -> 1.75-1.82 ms.
  // noinline: inlined into fused_rows it cost aq2 (fused_vector) 5-8% there, by code layout.
  constexpr int kAccs = NR * MR >= 4 ? 1 : 2;
  __m256 acc[NR][MR][kAccs];
  float tail[NR][MR] = {};
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < kAccs; ++a) acc[r][m][a] = _mm256_setzero_ps();
  const uint8_t* rows[NR];
  for (int r = 0; r < NR; ++r) rows[r] = p.codes + (n0 + r) * p.row_bytes;
  for (int64_t g = 0; g < p.G; ++g) {
    const float* cbs[NR];
    for (int r = 0; r < NR; ++r) cbs[r] = codebook_of(p, n0 + r, g);
    const int64_t j_end = (g + 1) * p.vecs_per_group;
    int64_t j = g * p.vecs_per_group;
    for (; j + 8 <= j_end; j += 8) {
      if ((j & 63) == 0)  // every 64 bytes of codes
        for (int r = 0; r < NR; ++r) prefetch_tiles_ahead(rows[r] + j, NR * p.row_bytes);
      uint64_t w[NR];
      for (int r = 0; r < NR; ++r) std::memcpy(&w[r], rows[r] + j, 8);
      // Every loop fully unrolled, so that acc is indexed by constants only and lives in registers.
#pragma GCC unroll 8
      for (int i = 0; i < kRegs; ++i) {
        __m256 xv[MR];
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * p.Kp + j * D + 8 * i);
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
          const __m256 e = pq_entries<D>(cbs[r], w[r], i);
#pragma GCC unroll 4
          for (int m = 0; m < MR; ++m) acc[r][m][i % kAccs] = _mm256_fmadd_ps(xv[m], e, acc[r][m][i % kAccs]);
        }
      }
    }
    for (; j < j_end; ++j)
      for (int r = 0; r < NR; ++r) {
        const float* e = cbs[r] + static_cast<int64_t>(rows[r][j]) * D;
        for (int m = 0; m < MR; ++m)
          for (int t = 0; t < D; ++t) tail[r][m] += x[m * p.Kp + j * D + t] * e[t];
      }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      float v = hsum(kAccs == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][kAccs - 1]) : acc[r][m][0]) + tail[r][m];
      if (p.scale) v *= p.scale[n0 + r];
      store_out(p, (m0 + m) * p.N + n0 + r, p.bias ? v + p.bias[n0 + r] : v);
    }
}

enum class Fused { kNone, kPq2, kPq4, kPq8, kNibble, kScalar8, kScalar16, kVec4x1, kVec8x1, kVec4x2, kVec8x2 };

// 4-bit scalar codes whose column groups are whole 32-blocks (or one group) decode by byte planes.
bool nibble_ok(const Problem& p) {
  return p.d == 1 && p.C == 1 && p.bits == 4 && (p.G == 1 || p.vecs_per_group % kNibbleBlock == 0);
}

Fused fused_kind(const Problem& p) {
  if (nibble_ok(p)) return Fused::kNibble;
  if (p.C == 1 && p.bits == 8 && p.d >= 2)
    return p.d == 2 ? Fused::kPq2 : p.d == 4 ? Fused::kPq4 : Fused::kPq8;
  if (p.d == 1 && p.C == 1 && p.bits <= 4) return p.E > 8 ? Fused::kScalar16 : Fused::kScalar8;
  if ((p.bits == 8 || p.bits == 16) && (p.d == 8 || (p.d == 4 && p.vecs_per_group % 2 == 0))) {
    if (p.bits == 8) return p.d == 8 ? Fused::kVec8x1 : Fused::kVec4x1;
    return p.d == 8 ? Fused::kVec8x2 : Fused::kVec4x2;
  }
  return Fused::kNone;
}

template <int MR, int NR, int D, int kCodeBytes>
void fused_vector_c(const Problem& p, const float* x, int64_t m0, int64_t n0) {
  if (p.C == 1) fused_vector<MR, NR, D, kCodeBytes, 1>(p, x, m0, n0);
  else if (p.C == 2) fused_vector<MR, NR, D, kCodeBytes, 2>(p, x, m0, n0);
  else fused_vector<MR, NR, D, kCodeBytes, 0>(p, x, m0, n0);
}

template <int MR, int NR>
void fused_tile(const Problem& p, Fused kind, const float* x, int64_t m0, int64_t n0) {
  switch (kind) {
    case Fused::kPq2: fused_pq_byte<MR, NR, 2>(p, x, m0, n0); break;
    case Fused::kPq4: fused_pq_byte<MR, NR, 4>(p, x, m0, n0); break;
    case Fused::kPq8: fused_pq_byte<MR, NR, 8>(p, x, m0, n0); break;
    case Fused::kNibble:
      if (n0 / p.rows_per_rgroup == (n0 + NR - 1) / p.rows_per_rgroup) {
        if (p.planes_half) fused_nibble<MR, NR, true, true>(p, x, m0, n0);
        else fused_nibble<MR, NR, false, true>(p, x, m0, n0);
      } else {
        if (p.planes_half) fused_nibble<MR, NR, true, false>(p, x, m0, n0);
        else fused_nibble<MR, NR, false, false>(p, x, m0, n0);
      }
      break;
    case Fused::kScalar8: fused_scalar_small<MR, NR, false>(p, x, m0, n0); break;
    case Fused::kScalar16: fused_scalar_small<MR, NR, true>(p, x, m0, n0); break;
    case Fused::kVec4x1: fused_vector_c<MR, NR, 4, 1>(p, x, m0, n0); break;
    case Fused::kVec8x1: fused_vector_c<MR, NR, 8, 1>(p, x, m0, n0); break;
    case Fused::kVec4x2: fused_vector_c<MR, NR, 4, 2>(p, x, m0, n0); break;
    case Fused::kVec8x2: fused_vector_c<MR, NR, 8, 2>(p, x, m0, n0); break;
    default: break;
  }
}

template <int MR>
void fused_rows(const Problem& p, Fused kind, const float* x, int64_t m0, int64_t n0, int64_t n1) {
  // Several weight rows per pass give the FMAs independent chains and share each x load.
  constexpr int NR = MR == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) fused_tile<MR, NR>(p, kind, x, m0, n);
  for (; n < n1; ++n) fused_tile<MR, 1>(p, kind, x, m0, n);
}

void fused_small_m_avx2(const Problem& p, Fused kind, const float* xp) {
  at::parallel_for(0, (p.N + 7) / 8, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * 8, n1 = std::min(p.N, c1 * 8);
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) fused_rows<4>(p, kind, xp + m * p.Kp, m, n0, n1);
    switch (p.M - m) {
      case 3: fused_rows<3>(p, kind, xp + m * p.Kp, m, n0, n1); break;
      case 2: fused_rows<2>(p, kind, xp + m * p.Kp, m, n0, n1); break;
      case 1: fused_rows<1>(p, kind, xp + m * p.Kp, m, n0, n1); break;
      default: break;
    }
  });
}

void dequant_avx2(const Problem& p, float* out) {
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* row = out + n * p.K;
      decode_avx2(p, n, 0, p.J, row);
      if (p.scale) {
        const __m256 s = _mm256_set1_ps(p.scale[n]);
        int64_t k = 0;
        for (; k + 8 <= p.K; k += 8) _mm256_storeu_ps(row + k, _mm256_mul_ps(_mm256_loadu_ps(row + k), s));
        for (; k < p.K; ++k) row[k] *= p.scale[n];
      }
    }
  });
}

// Rows n0..n1 of the unscaled weight as [n1 - n0, Kp] rows of D (fp32, or bf16 rounded to nearest
// even), zero past K, in x's permuted column order: the decoded-GEMM route's panels,
// decoded tile by tile exactly as mm_avx2 decodes them.
template <typename D>
void decode_panel_avx2(const Problem& p, int64_t n0, int64_t n1, D* panel) {
  at::parallel_for(n0, n1, 8, [&](int64_t r0, int64_t r1) {
    alignas(32) float tile[kTileK];
    for (int64_t n = r0; n < r1; ++n) {
      D* row = panel + (n - n0) * p.Kp;
      for (int64_t k0 = 0; k0 < p.K; k0 += kTileK) {
        const int64_t k1 = std::min(p.K, k0 + kTileK);
        const int64_t len = (k1 - k0 + 7) / 8 * 8;  // the last tile ends at Kp
        if (p.planes) decode_nibble_avx2(p, n, k0, k1, tile);
        else decode_avx2(p, n, k0 / p.d, k1 / p.d, tile);
        for (int64_t k = k1 - k0; k < len; ++k) tile[k] = 0.0f;  // meets x's zero padding
        for (int64_t k = 0; k < len; k += 8) cpu::avx2::store8(row + k0 + k, _mm256_load_ps(tile + k));
      }
    }
  });
}

#pragma GCC pop_options

void dequant_portable(const Problem& p, float* out) {
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      decode_portable(p, n, 0, p.J, out + n * p.K);
      if (p.scale)
        for (int64_t k = 0; k < p.K; ++k) out[n * p.K + k] *= p.scale[n];
    }
  });
}

bool use_avx2() {
  static const bool ok = [] {
    const char* isa = std::getenv("LOWBIT_CPU_ISA");
    if (isa && std::strcmp(isa, "scalar") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  }();
  return ok;
}

// x [M, K] (any float dtype and strides) -> fp32 [M, Kp], zero-padded past K; with `nibble_cols`
// > 0 its first nibble_cols columns (whole 32-blocks) in the nibble decoder's order. Serial on
// purpose: M*K cheap work, and a parallel region costs more than that on a busy machine.
template <typename T>
void fill_x(const at::Tensor& x, int64_t Kp, int64_t nibble_cols, bool half_order, float* dst) {
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const T* src = x.const_data_ptr<T>();
  int64_t pos[kNibbleBlock];
  for (int64_t c = 0; c < kNibbleBlock; ++c) pos[c] = half_order ? nibble_position_half(c) : nibble_position(c);
  for (int64_t m = 0; m < M; ++m) {
    float* row = dst + m * Kp;
    const T* xr = src + m * sm;
    int64_t k = 0;
    for (; k < nibble_cols; k += kNibbleBlock)
      for (int64_t c = 0; c < kNibbleBlock; ++c) row[k + pos[c]] = static_cast<float>(xr[(k + c) * sk]);
    for (; k < K; ++k) row[k] = static_cast<float>(xr[k * sk]);
    for (; k < Kp; ++k) row[k] = 0.0f;
  }
}

at::Tensor x_to_fp32(const at::Tensor& x, int64_t Kp, int64_t nibble_cols = 0, bool half_order = false) {
  at::Tensor out = at::empty({x.size(0), Kp}, x.options().dtype(at::kFloat));
  float* dst = out.mutable_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kHalf: fill_x<c10::Half>(x, Kp, nibble_cols, half_order, dst); break;
    case at::kBFloat16: fill_x<c10::BFloat16>(x, Kp, nibble_cols, half_order, dst); break;
    default: fill_x<float>(x, Kp, nibble_cols, half_order, dst); break;
  }
  return out;
}

// The nibble decoder's tables: per codebook (r, g) its 16 entries as byte planes, each 16 bytes
// repeated in both 128-bit lanes (vpshufb looks up within a lane): the two bytes of their fp16
// values when every entry converts to fp16 and back unchanged (fp16 codebooks, the presets'
// default; *half = true), else the four bytes of the fp32 values.
at::Tensor nibble_planes(const at::Tensor& cb32, bool* half) {
  const int64_t books = cb32.numel() / 16;
  at::Tensor planes = at::zeros({books * 128}, cb32.options().dtype(at::kByte));
  const float* cb = cb32.const_data_ptr<float>();
  uint8_t* out = planes.mutable_data_ptr<uint8_t>();
  *half = true;
  for (int64_t i = 0; i < books * 16 && *half; ++i) {
    const float back = static_cast<float>(c10::Half(cb[i]));
    *half = std::memcmp(&back, cb + i, 4) == 0;
  }
  for (int64_t b = 0; b < books; ++b)
    for (int64_t e = 0; e < 16; ++e) {
      uint32_t bits;
      if (*half) bits = c10::Half(cb[b * 16 + e]).x;
      else std::memcpy(&bits, cb + b * 16 + e, 4);
      for (int plane = 0; plane < (*half ? 2 : 4); ++plane) {
        const uint8_t v = static_cast<uint8_t>(bits >> (8 * plane));
        out[b * 128 + plane * 32 + e] = out[b * 128 + plane * 32 + 16 + e] = v;
      }
    }
  return planes;
}

Problem make_problem(const CodebookShape& s, int64_t K, const at::Tensor& codes, const at::Tensor& cb32,
                     const at::Tensor& scale32) {
  Problem p{};
  p.N = s.N;
  p.K = K;
  p.Kp = (K + 7) / 8 * 8;
  p.R = s.R;
  p.G = s.G;
  p.C = s.C;
  p.E = s.E;
  p.bits = s.bits;
  p.d = s.d;
  p.J = s.J;
  p.rows_per_rgroup = s.N / s.R;
  p.vecs_per_group = s.J / s.G;
  p.row_bytes = codes.size(1);
  p.codes = codes.const_data_ptr<uint8_t>();
  p.cb = cb32.const_data_ptr<float>();
  p.scale = scale32.defined() ? scale32.const_data_ptr<float>() : nullptr;
  return p;
}

// Large M on CPUs wider than lowbit's AVX2 kernels (lowbit/cpu/decoded_gemm.h): the unscaled
// weight is decoded panel by panel in x32's column order and multiplied by at::mm; the row's
// scale and the bias are applied to the panel's product here, as the tiles apply them to their
// dot products. bf16 x (route kBFloat16): x32 holds bf16 values, so x32 -> bf16 is exact.
void decoded_gemm(const Problem& p, const at::Tensor& x32, cpu::DecodedGemm route) {
  const bool bf16 = route == cpu::DecodedGemm::kBFloat16;
  const at::Tensor xd = bf16 ? x32.to(at::kBFloat16) : x32;
  auto decode = [&](int64_t n0, int64_t n1, void* panel) {
    if (bf16)
      decode_panel_avx2(p, n0, n1, static_cast<c10::BFloat16*>(panel));
    else
      decode_panel_avx2(p, n0, n1, static_cast<float*>(panel));
  };
  auto finish = [&](const at::Tensor& y, int64_t n0, int64_t /*n1*/) {
    cpu::for_each_panel_product(y, n0, [&](int64_t m, int64_t n, float v) {
      if (p.scale) v *= p.scale[n];
      store_out(p, m * p.N + n, p.bias ? v + p.bias[n] : v);
    });
  };
  cpu::gemm_over_decoded_panels(xd, p.N, decode, finish);
}

#if LOWBIT_HAVE_AVX2_KERNELS
// bf16 x on CPUs with AMX-BF16 (cpu::amx_weight_gemm): each tile's 16 weight rows are decoded
// whole, unscaled and rounded once to bf16 (decode_panel_avx2, as for the bf16 decoded-GEMM
// route), into a per-thread buffer that the tile steps then copy from; the row's scale and the
// bias are applied to the fp32 product, which is rounded once to x's dtype.
LOWBIT_AMX_CODE_BEGIN
// The AMX kernels' epilogue: out[m, n] = C[n - n0, m - m0] * scale[n] + bias[n], rounded once to
// x's dtype (the row's scale on the product, as the tiles and the decoded-GEMM route apply it).
auto amx_epilogue(const Problem& p) {
  return [&p](int64_t m0, int64_t n0, int rows, int64_t mrows, const float* c) {
    for (int r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      for (int64_t m = 0; m < mrows; ++m) {
        float v = c[r * cpu::kAmxCols + m];
        if (p.scale) v *= p.scale[n];
        store_out(p, (m0 + m) * p.N + n, p.bias ? v + p.bias[n] : v);
      }
    }
  };
}

void amx_mm(const Problem& p, const at::Tensor& x32) {
  const int64_t nblocks = (p.Kp + cpu::kAmxK - 1) / cpu::kAmxK, ld = nblocks * cpu::kAmxK;
  int column_of_word[cpu::kAmxK];
  for (int i = 0; i < cpu::kAmxK; ++i) column_of_word[i] = i;
  // x32 holds bf16 values (in the decoders' column order): the conversion is exact.
  const at::Tensor xb = cpu::x_to_amx_b(x32.to(at::kBFloat16), nblocks, column_of_word);
  auto step_end = [&](int64_t b0) { return std::min(nblocks, b0 + cpu::kAmxStep); };
  auto decode = [&](int64_t n0, int rows, int64_t b0, int64_t b1, cpu::AmxStepBuffer& a) {
    // [16, ld] bf16 rows, decoded at a tile's first step; the decoder writes columns up to Kp and
    // the rest is zeroed here (the buffer outlives calls of other shapes).
    thread_local std::vector<c10::BFloat16> decoded;
    if (static_cast<int64_t>(decoded.size()) < cpu::kAmxRows * ld) decoded.resize(cpu::kAmxRows * ld);
    if (b0 == 0)
      for (int r = 0; r < rows; ++r) {
        c10::BFloat16* row = decoded.data() + r * ld;
        decode_panel_avx2(p, n0 + r, n0 + r + 1, row);
        std::fill(row + p.Kp, row + ld, c10::BFloat16(0.0f));
      }
    for (int r = 0; r < rows; ++r)
      for (int64_t b = b0; b < b1; ++b)
        _mm512_store_si512(a[b - b0][r], _mm512_loadu_si512(decoded.data() + r * ld + b * cpu::kAmxK));
  };
  cpu::amx_weight_gemm(p.M, p.N, nblocks, xb, decode, step_end, amx_epilogue(p));
}

// Scalar 4-bit codebooks (d = 1, C = 1, 16 entries: k-means weight sharing): the row's 16
// entries, rounded once to bf16, are a table that vpermw looks the codes up in, as int4 does: per
// 32 columns, 16 code bytes zero-extended to words, low nibbles (even columns) in words 0-15 and
// high nibbles (odd columns) in 16-31; x's tiles take the same column order. Decode steps end at
// the codebook groups' boundaries (G = 1, or groups of a multiple of 32 columns).
bool amx_nibble_ok(const Problem& p) {
  return p.bits == 4 && p.d == 1 && p.C == 1 && p.E == 16 && (p.G == 1 || p.vecs_per_group % cpu::kAmxK == 0);
}

void amx_nibble_mm(const Problem& p, const at::Tensor& x) {
  const int64_t nblocks = (p.K + cpu::kAmxK - 1) / cpu::kAmxK;
  const int64_t blocks_per_group = p.G == 1 ? nblocks : p.vecs_per_group / cpu::kAmxK;
  int column_of_word[cpu::kAmxK];
  for (int w = 0; w < cpu::kAmxK; ++w) column_of_word[w] = w < 16 ? 2 * w : 2 * (w - 16) + 1;
  const at::Tensor xb = cpu::x_to_amx_b(x, nblocks, column_of_word);
  auto step_end = [&](int64_t b0) {
    return std::min({nblocks, b0 + cpu::kAmxStep, (b0 / blocks_per_group + 1) * blocks_per_group});
  };
  auto decode = [&](int64_t n0, int rows, int64_t b0, int64_t b1, cpu::AmxStepBuffer& a) {
    const __m256i low4 = _mm256_set1_epi16(0x0F);
    const int64_t g = b0 / blocks_per_group;
    for (int r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      const __m512 entries = _mm512_loadu_ps(codebook_of(p, n, g));
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(entries, entries);
      const uint8_t* row = p.codes + n * p.row_bytes;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t k0 = b * cpu::kAmxK, width = std::min<int64_t>(cpu::kAmxK, p.K - k0);
        if (b % 4 == 0)  // the next tile's row, one 64-byte line ahead
          _mm_prefetch(reinterpret_cast<const char*>(row + cpu::kAmxRows * p.row_bytes + k0 / 2), _MM_HINT_T0);
        const int64_t nbytes = (width + 1) / 2;  // a partial last block reads only its own bytes
        const __m128i v = nbytes == 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k0 / 2))
                                       : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << nbytes) - 1), row + k0 / 2);
        const __m256i bytes = _mm256_cvtepu8_epi16(v);
        const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(bytes, low4)),
                                               _mm256_srli_epi16(bytes, 4), 1);
        __m512i words = _mm512_permutexvar_epi16(idx, table);
        if (width < cpu::kAmxK) {  // columns past K decode as zeros, whatever the padding codes
          const uint32_t even = (1u << ((width + 1) / 2)) - 1, odd = (1u << (width / 2)) - 1;
          words = _mm512_maskz_mov_epi16(static_cast<__mmask32>(even | (odd << 16)), words);
        }
        _mm512_store_si512(a[b - b0][r], words);
      }
    }
  };
  cpu::amx_weight_gemm(p.M, p.N, nblocks, xb, decode, step_end, amx_epilogue(p));
}
LOWBIT_AMX_CODE_END
#endif

at::Tensor codebook_mm_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                           const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  const CodebookShape s = check_codebook_mm("codebook_mm", x, codes, codebooks, scale, bias);
  const int64_t M = x.size(0), K = x.size(1), N = s.N;
  const at::Tensor c = codes.contiguous();
  const at::Tensor cb32 = codebooks.to(at::kFloat).contiguous();
  const at::Tensor s32 = scale.has_value() ? scale->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());

  Problem p = make_problem(s, K, c, cb32, s32);
  p.M = M;
  p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.out_type = out.scalar_type();
  p.partial = nullptr;

  if (!use_avx2()) {
    mm_scalar(p, x_to_fp32(x, p.Kp).const_data_ptr<float>());
    return out;
  }
#if LOWBIT_HAVE_AVX2_KERNELS
  if (x.scalar_type() == at::kBFloat16 && amx_nibble_ok(p) &&
      cpu::use_amx_bf16(M, kAmxNibbleMinM, kAmxNibbleMaxM, "LOWBIT_CODEBOOK_AMX")) {
    amx_nibble_mm(p, x);
    return out;
  }
#endif
  at::Tensor planes;
  if (nibble_ok(p)) {
    planes = nibble_planes(cb32, &p.planes_half);
    p.planes = planes.const_data_ptr<uint8_t>();
  }
  const at::Tensor x32 = x_to_fp32(x, p.Kp, p.planes ? p.J / kNibbleBlock * kNibbleBlock : 0, p.planes_half);
  const Fused kind = fused_kind(p);
#if LOWBIT_HAVE_AVX2_KERNELS
  if (x.scalar_type() == at::kBFloat16 && cpu::use_amx_bf16(M, kAmxMinM, kAmxMaxM, "LOWBIT_CODEBOOK_AMX")) {
    amx_mm(p, x32);
    return out;
  }
#endif
  const cpu::DecodedGemm route = M > kSmallM ? cpu::decoded_gemm_route(x.scalar_type(), M, N, K,
                                                                      kDecodedGemmMinMBf16, kDecodedGemmMinMFp32)
                                             : cpu::DecodedGemm::kNone;
  if (route != cpu::DecodedGemm::kNone) {
    decoded_gemm(p, x32, route);
    return out;
  }
  if (M <= kSmallM && kind != Fused::kNone) {
    fused_small_m_avx2(p, kind, x32.const_data_ptr<float>());
    return out;
  }
  at::Tensor partial;
  if (K > kTileK) {
    partial = out.scalar_type() == at::kFloat ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
    p.partial = partial.mutable_data_ptr<float>();
  }
  const int64_t tile_n = M <= kSmallM ? kTileNSmall : kTileNLarge;
  // Indexed by at::get_thread_num(): a call from inside a parallel region runs inline on a
  // thread whose number may exceed get_num_threads() there.
  const int64_t slots = std::max<int64_t>(at::get_num_threads(), at::get_thread_num() + 1);
  at::Tensor scratch = at::empty({slots, tile_n * kTileK}, x.options().dtype(at::kFloat));
  mm_avx2(p, x32.const_data_ptr<float>(), scratch.mutable_data_ptr<float>(), tile_n);
  return out;
}

at::Tensor codebook_dequant_cpu(const at::Tensor& codes, const at::Tensor& codebooks,
                                const std::optional<at::Tensor>& scale, int64_t in_features,
                                std::optional<c10::ScalarType> out_dtype) {
  const CodebookShape s = check_codebook_dequant("codebook_dequant", codes, codebooks, scale, in_features);
  const c10::ScalarType out_type = check_fp8_out_dtype("codebook_dequant", out_dtype);
  const at::Tensor c = codes.contiguous();
  const at::Tensor cb32 = codebooks.to(at::kFloat).contiguous();
  const at::Tensor s32 = scale.has_value() ? scale->to(at::kFloat).contiguous() : at::Tensor();
  Problem p = make_problem(s, in_features, c, cb32, s32);
  at::Tensor out = at::empty({s.N, in_features}, codebooks.options().dtype(at::kFloat));
  if (use_avx2()) dequant_avx2(p, out.mutable_data_ptr<float>());
  else dequant_portable(p, out.mutable_data_ptr<float>());
  return out_type == at::kFloat ? out : out.to(out_type);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("codebook_mm", &codebook_mm_cpu);
  m.impl("codebook_dequant", &codebook_dequant_cpu);
}

}  // namespace lowbit
