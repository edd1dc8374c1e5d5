// SPARSE24 family, CPU kernels: dense activations times a compressed 2:4 weight (format:
// lowbit/formats/sparse24.py, spec: lowbit/backends/reference/sparse24.py).
//
// The weight is not decompressed (except by sparse24_mm from 64 rows of x, and for bf16 values
// and x on AMX-BF16 CPUs; below): each kept value is multiplied by the activation its metadata
// names, gathered in registers, so the kernel streams half the values of the dense weight plus
// 1 bit of metadata per weight, and does half the multiply-adds.
//
// Float values (sparse24_mm). x is copied once per call into fp32 with the middle two column
// quads of every 16 swapped: A = columns 0-3 | 8-11, B = 4-7 | 12-15. A vector of 8 kept values
// (groups 0, 1 | 2, 3) then finds its activations with two in-lane vpermilps (A for the even
// group of each 128-bit half, B for the odd one) and one blend, and vpermilps reads only the
// low 2 bits of each index lane: the 16-bit metadata word shifted by 2j is the index of value j,
// no mask and no table. Accumulation fp32, scale and bias in the epilogue.
//
// int8 values and int8 activations (sparse24_int8_scaled_mm). 32 kept values (64 columns) per
// step: six vector operations turn their 8 metadata bytes into vpshufb indices, two vpshufb and
// a blend gather the activations (x stored with the middle 16-column quarters of every 64
// swapped), and vpmaddubsw(|w|, sign(x) * sign(w)) + vpmaddwd accumulate in int32: exact. An x
// holding -128 (which sign() cannot negate; int8_quantize_dynamic never writes it) switches to
// vpmaddubsw(|x|, sign(w) * sign(x)), whose tiles holding a value -128 are recomputed in scalar.
// About 3.6 cycles per 32 kept values of one row at M = 1 (Zen 3, L1/L2-resident), ~15 vector
// operations on 4 pipes; the pdep version took 7-10.
//
// Parallel over output channels in blocks of 16, one at::parallel_for per call, each block's
// metadata validated just before its use; for M > 4 the float kernel splits K into chunks so a
// block's values stay in L1/L2 while every row of x passes. From M = 64 sparse24_mm instead
// decompresses the weight into dense fp32 panels and calls torch's GEMM (see kDenseMinM): the
// in-register gather costs as much as the multiply-adds it saves once x rows are many. bf16 or
// int8 values with bf16 x from M = 3, on CPUs with AMX-BF16, expand 16 rows x 32 columns at a
// time into AMX tiles instead (float_amx, kAmxMinM), and from M = 224 into bf16 panels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

#include "lowbit/checks.h"
#include "lowbit/cpu/amx.h"
#include "lowbit/cpu/decoded_gemm.h"
#include "lowbit/cpu/isa.h"
#include "lowbit/cpu/vec_avx2.h"
#include "lowbit/sparse24_layout.h"
#include "lowbit/validated_once.h"

namespace lowbit {
namespace {

// The small-M tiles prefetch values and metadata cpu::kPrefetchTilesAhead tiles ahead. Two tiles
// rather than one (two threads, M = 1, 4096 x 4096, 64 MiB read before each call, median of 100,
// mean over eight interleaved runs): fp32 values 1.95 -> 1.87 ms, int8 values 0.84 -> 0.77 ms.

namespace L = ::lowbit::sparse24_layout;

constexpr int64_t kRowBlock = 16;   // output channels per work item
constexpr int64_t kSmallM = 4;      // up to here, one pass over K per row block

enum class ValueKind { kFloat, kHalf, kBFloat16, kInt8 };

ValueKind value_kind(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Half: return ValueKind::kHalf;
    case c10::ScalarType::BFloat16: return ValueKind::kBFloat16;
    case c10::ScalarType::Char: return ValueKind::kInt8;
    default: return ValueKind::kFloat;
  }
}

struct FloatProblem {
  int64_t M, N, K, Kp;
  const void* values;     // [N, Kp/2]
  ValueKind kind;
  const uint8_t* meta;    // [N, Kp/8]
  const float* scale;     // [N] or nullptr
  const float* bias;      // [N] fp32 or nullptr
  const float* x;         // [M, Kp] fp32, zero-padded, quads permuted when `permuted`
  float* partial;         // [M, N] sums over earlier K chunks (large M) or nullptr
  void* out;              // [M, N] in out_type
  c10::ScalarType out_type;
};

struct Int8Problem {
  int64_t M, N, K, Kp, Kx;  // Kx: row stride of x (Kp rounded up to 64)
  const int8_t* values;     // [N, Kp/2]
  const uint8_t* meta;      // [N, Kp/8]
  const int8_t* x;          // [M, Kx], zero-padded, columns in order (the scalar path)
  const float* scale_a;     // [M] or [1]
  bool scale_a_scalar;
  const float* scale_b;     // [N] or [1]
  bool scale_b_scalar;
  const float* bias;        // [N] fp32 or nullptr
  void* out;
  c10::ScalarType out_type;
};

// Final rounding to the output dtype, inside the parallel region. Defined outside the AVX2
// target so out-of-line copies of c10's conversions stay portable.
inline void store_out(void* out, c10::ScalarType t, int64_t i, float v) {
  switch (t) {
    case c10::ScalarType::Half: static_cast<c10::Half*>(out)[i] = c10::Half(v); break;
    case c10::ScalarType::BFloat16: static_cast<c10::BFloat16*>(out)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

// (acc * scale + bias), rounded op by op like the reference.
inline void float_epilogue(const FloatProblem& p, int64_t m, int64_t n, float v) {
  if (p.scale) {
    v = v * p.scale[n];
    cpu::fp_barrier(v);
  }
  if (p.bias) v = v + p.bias[n];
  store_out(p.out, p.out_type, m * p.N + n, v);
}

// float(acc) * scale_a * scale_b + bias, each step rounded, as in int8_scaled_mm's reference.
inline void int8_epilogue(const Int8Problem& p, int64_t m, int64_t n, int32_t acc) {
  float v = static_cast<float>(acc) * p.scale_a[p.scale_a_scalar ? 0 : m];
  cpu::fp_barrier(v);
  v = v * p.scale_b[p.scale_b_scalar ? 0 : n];
  cpu::fp_barrier(v);
  if (p.bias) v = v + p.bias[n];
  store_out(p.out, p.out_type, m * p.N + n, v);
}

float value_at(const FloatProblem& p, int64_t i) {
  switch (p.kind) {
    case ValueKind::kHalf: return static_cast<float>(static_cast<const c10::Half*>(p.values)[i]);
    case ValueKind::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p.values)[i]);
    case ValueKind::kInt8: return static_cast<float>(static_cast<const int8_t*>(p.values)[i]);
    default: return static_cast<const float*>(p.values)[i];
  }
}

// Position of column c (0..15) of a 16-column block in the permuted x (middle quads swapped).
inline int64_t permuted_pos(int64_t c) {
  const int64_t q = c / 4;
  return (q == 1 ? 2 : q == 2 ? 1 : q) * 4 + c % 4;
}

// ----------------------------------------------------------------------------- portable path
void float_scalar(const FloatProblem& p) {
  const int64_t half = p.Kp / 2;
  at::parallel_for(0, p.N, kRowBlock, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* meta = p.meta + n * (p.Kp / 8);
      for (int64_t m = 0; m < p.M; ++m) {
        const float* x = p.x + m * p.Kp;
        float acc = 0.0f;
        for (int64_t j = 0; j < half; ++j) acc += value_at(p, n * half + j) * x[L::kept_column(meta, j)];
        float_epilogue(p, m, n, acc);
      }
    }
  });
}

int32_t int8_dot_scalar(const Int8Problem& p, int64_t m, int64_t n, int64_t j0, int64_t j1) {
  const uint8_t* meta = p.meta + n * (p.Kp / 8);
  const int8_t* v = p.values + n * (p.Kp / 2);
  const int8_t* x = p.x + m * p.Kx;
  int32_t acc = 0;
  for (int64_t j = j0; j < j1; ++j) acc += int32_t(v[j]) * int32_t(x[L::kept_column(meta, j)]);
  return acc;
}

void int8_scalar(const Int8Problem& p) {
  at::parallel_for(0, p.N, kRowBlock, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < p.M; ++m) int8_epilogue(p, m, n, int8_dot_scalar(p, m, n, 0, p.Kp / 2));
  });
}

// ----------------------------------------------------------------------------- AVX2 path
#if LOWBIT_HAVE_AVX2_KERNELS
#define S24_AVX2 __attribute__((target("avx2,fma,f16c")))
#define S24_AVX2_INLINE S24_AVX2 inline __attribute__((always_inline))

// True when every metadata nibble is valid: a 16-entry vpshufb table per nibble, 32 bytes a step
// (the portable byte-table scan in checks.h costs a quarter of a M = 1 GEMM). The kernels run
// it on each row block's metadata just before using it, inside their parallel region: the
// whole-tensor scan before the GEMM took 41 us for N = K = 4096 on one thread (13% of the
// two-thread W8A8 GEMV); spread over the threads it also brings the block's metadata into L1.
S24_AVX2 bool meta_valid_avx2(const uint8_t* p, int64_t n) {
  const __m256i table = _mm256_setr_epi8(0, 0, 0, 0, -1, 0, 0, 0, -1, -1, 0, 0, -1, -1, -1, 0,  //
                                         0, 0, 0, 0, -1, 0, 0, 0, -1, -1, 0, 0, -1, -1, -1, 0);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256i ok = _mm256_set1_epi8(-1);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(b, low));
    const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b, 4), low));
    ok = _mm256_and_si256(ok, _mm256_and_si256(lo, hi));
  }
  bool all = _mm256_movemask_epi8(ok) == -1;
  for (; i < n; ++i) all &= L::byte_valid(p[i]);
  return all;
}
S24_AVX2_INLINE __m256 load_values8(const float* p) { return _mm256_loadu_ps(p); }
S24_AVX2_INLINE __m256 load_values8(const c10::Half* p) { return cpu::avx2::load8(p); }
S24_AVX2_INLINE __m256 load_values8(const c10::BFloat16* p) { return cpu::avx2::load8(p); }
S24_AVX2_INLINE __m256 load_values8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

S24_AVX2_INLINE uint32_t load_u16(const uint8_t* p) {
  uint16_t w;
  std::memcpy(&w, p, 2);
  return w;
}

S24_AVX2_INLINE uint32_t load_u32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// MR rows of x times NR weight rows over 16-column blocks [b0, b1).
// Blocks go in pairs: one 32-bit broadcast load of metadata serves both (shifts 0..14 and
// 16..30; vpermilps reads only the low 2 bits of each lane, so the bits above need no mask).
template <typename V, int MR, int NR>
S24_AVX2_INLINE void float_block(const FloatProblem& p, const V* vals, const float* x, int64_t b, __m256i idx[NR],
                                 __m256 acc[NR][MR]) {
  __m256 xa[MR], xb[MR];
  for (int m = 0; m < MR; ++m) {
    xa[m] = _mm256_loadu_ps(x + m * p.Kp + 16 * b);
    xb[m] = _mm256_loadu_ps(x + m * p.Kp + 16 * b + 8);
  }
  for (int r = 0; r < NR; ++r) {
    const __m256 w = load_values8(vals + r * (p.Kp / 2) + 8 * b);
    for (int m = 0; m < MR; ++m) {
      const __m256 g = _mm256_blend_ps(_mm256_permutevar_ps(xa[m], idx[r]), _mm256_permutevar_ps(xb[m], idx[r]), 0xCC);
      acc[r][m] = _mm256_fmadd_ps(w, g, acc[r][m]);
    }
  }
}

template <typename V, int MR, int NR>
S24_AVX2 void float_tile(const FloatProblem& p, int64_t m0, int64_t n0, int64_t b0, int64_t b1, bool first,
                         bool last) {
  const __m256i shift_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shift_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const V* vals = static_cast<const V*>(p.values) + n0 * (p.Kp / 2);
  const uint8_t* meta = p.meta + n0 * (p.Kp / 8);
  const float* x = p.x + m0 * p.Kp;
  int64_t b = b0;
  for (; b + 2 <= b1; b += 2) {
    // See cpu::kPrefetchTilesAhead.
    for (int r = 0; r < NR; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(vals + (cpu::kPrefetchTilesAhead * NR + r) * (p.Kp / 2) + 8 * b), _MM_HINT_T0);
    if (b % 32 == 0)
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(meta + (cpu::kPrefetchTilesAhead * NR + r) * (p.Kp / 8) + 2 * b), _MM_HINT_T0);
    __m256i word[NR], idx[NR];
    for (int r = 0; r < NR; ++r)
      word[r] = _mm256_set1_epi32(static_cast<int32_t>(load_u32(meta + r * (p.Kp / 8) + 2 * b)));
    for (int r = 0; r < NR; ++r) idx[r] = _mm256_srlv_epi32(word[r], shift_lo);
    float_block<V, MR, NR>(p, vals, x, b, idx, acc);
    for (int r = 0; r < NR; ++r) idx[r] = _mm256_srlv_epi32(word[r], shift_hi);
    float_block<V, MR, NR>(p, vals, x, b + 1, idx, acc);
  }
  if (b < b1) {
    __m256i idx[NR];
    for (int r = 0; r < NR; ++r)
      idx[r] = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(load_u16(meta + r * (p.Kp / 8) + 2 * b))),
                                 shift_lo);
    float_block<V, MR, NR>(p, vals, x, b, idx, acc);
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      const int64_t i = (m0 + m) * p.N + n0 + r;
      float s = cpu::avx2::hsum(acc[r][m]);
      if (!first) s = p.partial[i] + s;
      if (last) float_epilogue(p, m0 + m, n0 + r, s);
      else p.partial[i] = s;
    }
}

template <typename V, int MR>
S24_AVX2 void float_rows(const FloatProblem& p, int64_t m0, int64_t n0, int64_t n1, int64_t b0, int64_t b1,
                         bool first, bool last) {
  // Four weight rows share each x load for one row of x; with more rows of x, registers hold
  // 2 x 2MR activations, so two weight rows.
  constexpr int NR = MR == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) float_tile<V, MR, NR>(p, m0, n, b0, b1, first, last);
  for (; n < n1; ++n) float_tile<V, MR, 1>(p, m0, n, b0, b1, first, last);
}

// Returns false (and leaves the output unfinished) when some metadata is invalid.
template <typename V>
S24_AVX2 bool float_avx2(const FloatProblem& p, int64_t chunk_blocks, bool check_meta) {
  const int64_t nblocks = p.Kp / 16;
  std::atomic<bool> meta_ok{true};
  at::parallel_for(0, (p.N + kRowBlock - 1) / kRowBlock, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kRowBlock, n1 = std::min(p.N, n0 + kRowBlock);
      if (check_meta && !meta_valid_avx2(p.meta + n0 * (p.Kp / 8), (n1 - n0) * (p.Kp / 8))) {
        meta_ok.store(false, std::memory_order_relaxed);
        continue;
      }
      for (int64_t b0 = 0; b0 < nblocks; b0 += chunk_blocks) {
        const int64_t b1 = std::min(nblocks, b0 + chunk_blocks);
        const bool first = b0 == 0, last = b1 == nblocks;
        int64_t m = 0;
        for (; m + 4 <= p.M; m += 4) float_rows<V, 4>(p, m, n0, n1, b0, b1, first, last);
        switch (p.M - m) {
          case 3: float_rows<V, 3>(p, m, n0, n1, b0, b1, first, last); break;
          case 2: float_rows<V, 2>(p, m, n0, n1, b0, b1, first, last); break;
          case 1: float_rows<V, 1>(p, m, n0, n1, b0, b1, first, last); break;
          default: break;
        }
      }
    }
  });
  return meta_ok.load();
}

// 32 kept values of one weight row (64 columns): byte j of the result is the vpshufb index of
// value j inside its 16-column quarter of x, from the row's 8 metadata bytes (value j uses the
// nibble of group j/2, i.e. nibble (j/2)%2 of byte j/4, bits 0-1 for even j and 2-3 for odd j).
// All in vector registers, 6 operations: the 8 bytes broadcast next to a copy shifted right by 4
// (high nibbles in the low 4 bits), one vpshufb puts value j's nibble in byte j, the mask keeps
// its 2 bits (bits 0-1, or 2-3 giving 4, 8, 12), a 16-entry table maps 0-3 and 4, 8, 12 to the
// index 0-3, and the group offsets (0, 0, 4, 4, ... 12, 12) are OR-ed in. (The scalar pdep
// version spent most of the loop moving four 64-bit halves into a ymm; a vpermd + vpsrlvd
// version with one shuffle fewer measured 10-15% slower on Zen 3.)
struct IndexConsts {
  __m256i spread, field_mask, to_index, offsets;
};

S24_AVX2_INLINE IndexConsts index_consts() {
  IndexConsts c;
  // Lane L holds values 16L..16L+15: value j' of the lane reads byte (4L + j'/4) for an even
  // group, the shifted copy of it (8 bytes further) for an odd one.
  c.spread = _mm256_setr_epi8(0, 0, 8, 8, 1, 1, 9, 9, 2, 2, 10, 10, 3, 3, 11, 11,  //
                              4, 4, 12, 12, 5, 5, 13, 13, 6, 6, 14, 14, 7, 7, 15, 15);
  c.field_mask = _mm256_set1_epi16(0x0C03);
  c.to_index = _mm256_setr_epi8(0, 1, 2, 3, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0,  //
                                0, 1, 2, 3, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0);
  c.offsets = _mm256_setr_epi8(0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12,  //
                               0, 0, 4, 4, 8, 8, 12, 12, 0, 0, 4, 4, 8, 8, 12, 12);
  return c;
}

S24_AVX2_INLINE __m256i shuffle_index(const uint8_t* meta, const IndexConsts& c) {
  int64_t bytes;
  std::memcpy(&bytes, meta, 8);
  const __m256i m = _mm256_set1_epi64x(bytes);
  // Dwords 0-1 of each lane: the 8 bytes; dwords 2-3: the same shifted right by 4 (16-bit
  // shift: each byte's low nibble is then its own high nibble).
  const __m256i both = _mm256_blend_epi32(m, _mm256_srli_epi16(m, 4), 0xCC);
  const __m256i field = _mm256_and_si256(_mm256_shuffle_epi8(both, c.spread), c.field_mask);
  return _mm256_or_si256(_mm256_shuffle_epi8(c.to_index, field), c.offsets);
}

// How vpmaddubsw (u8 x s8, pairs summed in int16) multiplies a kept value w by its gathered
// activation g exactly: one operand must be made unsigned with abs() and the other take its sign.
//   kAbsWeight: |w| * sign(g, w). abs(-128) = 0x80 is 128 as u8, so every w is exact; g = -128
//     is not (sign cannot negate it). Used when x holds no -128 (int8_quantize_dynamic never
//     writes it); |w| is computed once per weight vector and shared by the MR rows of x.
//   kAbsActivation: |g| * sign(w, g), exact for every g but not for w = -128: a tile holding
//     that value is recomputed in scalar.
// Either way the int16 pair sums stay within 2 * 128 * 127 < 32768: no saturation.
enum class Int8Product { kAbsWeight, kAbsActivation };

// MR rows of x times NR weight rows over all of K, 64 columns (32 kept values) a step. x is
// stored with the middle 16-byte quarters of every 64 columns swapped (A = columns 0-15 | 32-47,
// B = 16-31 | 48-63), so two vpshufb and a dword blend gather the 32 activations in value order;
// vpmaddubsw then vpmaddwd by 1 accumulate in int32, exactly (see Int8Product).
template <int MR, int NR, Int8Product kProduct>
S24_AVX2 void int8_tile(const Int8Problem& p, const int8_t* xperm, int64_t m0, int64_t n0) {
  const int64_t nblocks = p.Kp / 64;
  const IndexConsts ic = index_consts();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i minus128 = _mm256_set1_epi8(-128);
  __m256i acc[NR][MR];
  __m256i bad = _mm256_setzero_si256();
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_si256();
  const int8_t* vals = p.values + n0 * (p.Kp / 2);
  const uint8_t* meta = p.meta + n0 * (p.Kp / 8);
  const int8_t* x = xperm + m0 * p.Kx;
  for (int64_t b = 0; b < nblocks; ++b) {
    __m256i xa[MR], xb[MR];
    for (int m = 0; m < MR; ++m) {
      xa[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * p.Kx + 64 * b));
      xb[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * p.Kx + 64 * b + 32));
    }
    // See cpu::kPrefetchTilesAhead.
    if (b % 2 == 0)
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(vals + (cpu::kPrefetchTilesAhead * NR + r) * (p.Kp / 2) + 32 * b), _MM_HINT_T0);
    if (b % 8 == 0)
      for (int r = 0; r < NR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(meta + (cpu::kPrefetchTilesAhead * NR + r) * (p.Kp / 8) + 8 * b), _MM_HINT_T0);
    for (int r = 0; r < NR; ++r) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vals + r * (p.Kp / 2) + 32 * b));
      const __m256i idx = shuffle_index(meta + r * (p.Kp / 8) + 8 * b, ic);
      __m256i w_abs;
      if constexpr (kProduct == Int8Product::kAbsWeight) w_abs = _mm256_abs_epi8(w);
      else bad = _mm256_or_si256(bad, _mm256_cmpeq_epi8(w, minus128));
      for (int m = 0; m < MR; ++m) {
        const __m256i g = _mm256_blend_epi32(_mm256_shuffle_epi8(xa[m], idx), _mm256_shuffle_epi8(xb[m], idx), 0xCC);
        __m256i prod;
        if constexpr (kProduct == Int8Product::kAbsWeight) prod = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(g, w));
        else prod = _mm256_maddubs_epi16(_mm256_abs_epi8(g), _mm256_sign_epi8(w, g));
        acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(prod, ones));
      }
    }
  }
  const bool exact = _mm256_testz_si256(bad, bad);
  // The last Kp % 64 columns (16, 32 or 48) in scalar.
  const int64_t j_tail = nblocks * 32;
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      int32_t s;
      if (exact) s = cpu::avx2::hsum(acc[r][m]) + int8_dot_scalar(p, m0 + m, n0 + r, j_tail, p.Kp / 2);
      else s = int8_dot_scalar(p, m0 + m, n0 + r, 0, p.Kp / 2);
      int8_epilogue(p, m0 + m, n0 + r, s);
    }
}

template <int MR, Int8Product kProduct>
S24_AVX2 void int8_rows(const Int8Problem& p, const int8_t* xperm, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = MR == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) int8_tile<MR, NR, kProduct>(p, xperm, m0, n);
  for (; n < n1; ++n) int8_tile<MR, 1, kProduct>(p, xperm, m0, n);
}

// Returns false (and leaves the output unfinished) when some metadata is invalid.
template <Int8Product kProduct>
S24_AVX2 bool int8_avx2(const Int8Problem& p, const int8_t* xperm, bool check_meta) {
  std::atomic<bool> meta_ok{true};
  // A row block's values (16 rows x Kp/2 bytes) stay in L2 while every 4 rows of x pass.
  at::parallel_for(0, (p.N + kRowBlock - 1) / kRowBlock, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kRowBlock, n1 = std::min(p.N, n0 + kRowBlock);
      if (check_meta && !meta_valid_avx2(p.meta + n0 * (p.Kp / 8), (n1 - n0) * (p.Kp / 8))) {
        meta_ok.store(false, std::memory_order_relaxed);
        continue;
      }
      int64_t m = 0;
      for (; m + 4 <= p.M; m += 4) int8_rows<4, kProduct>(p, xperm, m, n0, n1);
      switch (p.M - m) {
        case 3: int8_rows<3, kProduct>(p, xperm, m, n0, n1); break;
        case 2: int8_rows<2, kProduct>(p, xperm, m, n0, n1); break;
        case 1: int8_rows<1, kProduct>(p, xperm, m, n0, n1); break;
        default: break;
      }
    }
  });
  return meta_ok.load();
}

#endif  // LOWBIT_HAVE_AVX2_KERNELS

bool use_avx2() {
  static const bool ok = [] {
#if LOWBIT_HAVE_AVX2_KERNELS
    return cpu::has_avx2();
#else
    return false;
#endif
  }();
  return ok;
}

// The AVX2 kernels check the metadata block by block as they go (meta_valid_avx2); when one
// reports a bad block, the portable scan finds the first bad byte and raises the message every
// backend gives (the output computed so far is discarded).
[[noreturn]] void fail_bad_meta(const char* op, const at::Tensor& meta_c) {
  check_sparse24_meta_data(op, meta_c);
  TORCH_CHECK(false, "lowbit: ", op, ": the AVX2 metadata check and the portable one disagree");
}

// The metadata check through the ValidationCache (lowbit/validated_once.h): a weight whose
// metadata passed once, and has not been written through torch since, is not scanned again.
// The in-kernel block check is cheap but not free. Skipping it, one thread, under load (minimum
// and 10th percentile of 100-1000 interleaved hit/check pairs): W8A8 M = 1 and M = 4 at
// N = K = 4096 7-10% faster, fp16 values M = 1 at 1024 x 1024 and 1024 x 4096 5%, fp16 / fp32
// M = 1 at 4096 x 4096 (bound by the weight stream) 1-4%; never slower. Using the cache on the
// CPU also gives the CPU and CUDA ops one guarantee, tested here without a GPU. A write that
// bypasses the version counter is then not re-checked (see the header), which on the CPU stays
// memory-safe: every kernel reads only 2-bit indices, which cannot leave their 4-column group,
// so such metadata gives wrong values, never an out-of-bounds read.
struct MetaCheck {
  std::optional<ValidationCache::Key> key;
  bool known_valid = false;
  explicit MetaCheck(const at::Tensor& meta) : key(validation_cache().key(meta, L::kMetaNibblesValid)) {
    known_valid = key && validation_cache().contains(*key);
  }
  // Call once the kernel has checked every nibble (the key was taken before, see record()).
  void passed(const at::Tensor& meta) const {
    if (key && !known_valid) validation_cache().record(meta, *key);
  }
};

// x [M, K] (any float dtype, any strides) -> fp32 [M, Kp], zero past K, quads permuted for AVX2.
template <typename T>
void fill_x(const at::Tensor& x, int64_t Kp, bool permute, float* dst) {
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const T* src = x.const_data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) {
    float* row = dst + m * Kp;
    for (int64_t k = K; k < Kp; ++k) row[k / 16 * 16 + (permute ? permuted_pos(k % 16) : k % 16)] = 0.0f;
    for (int64_t k = 0; k < K; ++k)
      row[k / 16 * 16 + (permute ? permuted_pos(k % 16) : k % 16)] = static_cast<float>(src[m * sm + k * sk]);
  }
}

at::Tensor x_to_fp32(const at::Tensor& x, int64_t Kp, bool permute) {
  at::Tensor out = at::empty({x.size(0), Kp}, x.options().dtype(at::kFloat));
  float* dst = out.mutable_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kHalf: fill_x<c10::Half>(x, Kp, permute, dst); break;
    case at::kBFloat16: fill_x<c10::BFloat16>(x, Kp, permute, dst); break;
    default: fill_x<float>(x, Kp, permute, dst); break;
  }
  return out;
}

// Large M: per 8 kept values and row of x the AVX2 kernel spends two vpermilps and a blend on
// the gather and one FMA, while a dense GEMM spends one FMA per 8 columns (16 weights): the
// sparse kernel ran at 0.6-0.8x of fp32 F.linear at M = 256 (N = K = 4096). From kDenseMinM
// rows of x the weight is instead decompressed, a panel of rows at a time, into dense fp32
// (8 columns per vpermps) and multiplied by torch's GEMM; then the same epilogue. Measured
// (one thread, under load, N = K = 4096), speed over F.linear, sparse kernel / dense panels:
// M = 16 1.45-1.68 / 0.92-1.05, M = 32 1.16-1.26 / 0.98-0.99, M = 64 0.87-0.97 / 1.07,
// M = 128 0.73-0.75 / 0.98-1.02, M = 256 0.58-0.59 / 0.94-0.95 (decompressing costs ~5%).
constexpr int64_t kDenseMinM = 64;
// bf16 x with bf16 or int8 values from this M, on CPUs with AMX-BF16: the AMX kernel
// (float_amx), up to kDecodedMinM (it replaces the fp32 dense panels there). Measured on the
// 2-vCPU AMX Xeon VM (bf16 values, N = K = 4096, 2 threads, 1 GiB read before each call, median
// of 21 or 9, ms), AMX vs the AVX2 gather (from M = 64 the fp32 dense panels) vs bf16 F.linear
// on the dense weight: M = 1 1.21 / 0.93 / 1.84, 2 1.21 / 1.08 / 1.82, 3 1.24 / 1.39 / 1.84, 4
// 1.20 / 1.64 / 1.86, 8 1.30 / 3.16 / 1.98, 16 1.40 / 5.93 / 1.98, 64 2.69 / 15.3 / 2.93, 256
// 11.0 / 31.8 / 5.24 (the AMX kernel then decoded the weight once per 64 rows of x).
constexpr int64_t kAmxMinM = 3;
// From this M (bf16 x, bf16 or int8 values, AMX-BF16) the weight is expanded into dense bf16
// panels for torch's bf16 GEMM (oneDNN on AMX) instead: the AMX kernel moves 5 tiles from L2 per 4 tile
// multiplies (lowbit/cpu/amx.h) and oneDNN does about twice its FLOP/s at large M. The product
// is rounded to bf16 by at::mm before scale and bias (then rounded again): eps_bf16 * |x||w| more
// than the fp32 bound where there is a scale or a bias, nothing more without. Measured as for
// kAmxMinM (median of 7, ms), AMX kernel vs bf16 panels vs bf16 F.linear on the dense weight:
// M = 192 7.43 / 8.35 / 4.76, 256 10.8 / 8.47 / 5.60, 512 24.0 / 12.6 / 9.93, 1024 47.1 / 20.0 /
// 16.8 (with a bias the panels' epilogue adds 1-4 ms).
constexpr int64_t kDecodedMinM = 224;
// Panel rows: 16 MiB of fp32 (1024 rows at K = 4096). Fewer, larger panels: each costs two
// parallel regions (decompress, GEMM), and on a loaded machine every region waits for a thread.
constexpr int64_t kDensePanelFloats = int64_t(1) << 22;

#if LOWBIT_HAVE_AVX2_KERNELS
// For each metadata byte (2 groups, 8 columns, 4 kept values): the vpermps index of every
// column into [v0, v1, v2, v3, 0, 0, 0, 0]: its kept value, or a zero lane.
struct ScatterTable {
  alignas(32) int32_t idx[256][8];
  ScatterTable() {
    for (int b = 0; b < 256; ++b)
      for (int h = 0; h < 2; ++h) {
        const int nibble = (b >> (4 * h)) & 0xF;
        for (int c = 0; c < 4; ++c) idx[b][4 * h + c] = 4;
        idx[b][4 * h + (nibble & 3)] = 2 * h;
        idx[b][4 * h + (nibble >> 2)] = 2 * h + 1;  // valid metadata: nibble >> 2 != nibble & 3
      }
  }
};

S24_AVX2_INLINE __m128 load_values4(const float* p) { return _mm_loadu_ps(p); }
S24_AVX2_INLINE __m128 load_values4(const c10::Half* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
S24_AVX2_INLINE __m128 load_values4(const c10::BFloat16* p) {
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16));
}
S24_AVX2_INLINE __m128 load_values4(const int8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(w)));
}

// 8 columns per step: one table load, one vpermps; every column is written (no memset).
template <typename V>
S24_AVX2 void decompress_rows_avx2(const FloatProblem& p, const ScatterTable& t, int64_t r0, int64_t r1, int64_t n0,
                                   float* dst) {
  const V* vals = static_cast<const V*>(p.values);
  for (int64_t n = r0; n < r1; ++n) {
    float* row = dst + (n - n0) * p.Kp;
    const uint8_t* meta = p.meta + n * (p.Kp / 8);
    const V* v = vals + n * (p.Kp / 2);
    for (int64_t b = 0; b < p.Kp / 8; ++b) {
      const __m256 src = _mm256_zextps128_ps256(load_values4(v + 4 * b));
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.idx[meta[b]]));
      _mm256_storeu_ps(row + 8 * b, _mm256_permutevar8x32_ps(src, idx));
    }
  }
}

// Rows n0..n1 of the weight as dense fp32 rows of Kp columns at dst (the metadata is valid).
template <typename V>
void decompress_panel(const FloatProblem& p, int64_t n0, int64_t n1, float* dst) {
  static const ScatterTable table;
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) { decompress_rows_avx2<V>(p, table, r0, r1, n0, dst); });
}

// x32: [M, Kp] fp32 in column order. The metadata has been validated.
void float_dense_panels(const FloatProblem& p, const at::Tensor& x32) {
  const int64_t panel_rows = std::min(p.N, std::max<int64_t>(16, kDensePanelFloats / p.Kp));
  at::Tensor panel = at::empty({panel_rows, p.Kp}, x32.options());
  at::Tensor acc = at::empty({p.M, p.N}, x32.options());
  for (int64_t n0 = 0; n0 < p.N; n0 += panel_rows) {
    const int64_t n1 = std::min(p.N, n0 + panel_rows);
    float* dst = panel.mutable_data_ptr<float>();
    switch (p.kind) {
      case ValueKind::kHalf: decompress_panel<c10::Half>(p, n0, n1, dst); break;
      case ValueKind::kBFloat16: decompress_panel<c10::BFloat16>(p, n0, n1, dst); break;
      case ValueKind::kInt8: decompress_panel<int8_t>(p, n0, n1, dst); break;
      default: decompress_panel<float>(p, n0, n1, dst); break;
    }
    at::Tensor acc_cols = acc.narrow(1, n0, n1 - n0);
    at::mm_out(acc_cols, x32, panel.narrow(0, 0, n1 - n0).t());
  }
  const float* a = acc.const_data_ptr<float>();
  at::parallel_for(0, p.M, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.N)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < p.N; ++n) float_epilogue(p, m, n, a[m * p.N + n]);
  });
}

// ---- sparse24_int8_scaled_mm at larger M on CPUs with AMX-INT8 (see kInt8DenseMinM).
// For each metadata byte (2 groups, 8 columns, 4 kept int8 values): the vpshufb index of every
// column into the 4 value bytes, or 0x80 (a zero byte).
struct Int8ScatterTable {
  alignas(16) uint8_t idx[256][16];
  Int8ScatterTable() {
    std::memset(idx, 0x80, sizeof idx);
    for (int b = 0; b < 256; ++b)
      for (int h = 0; h < 2; ++h) {
        const int nibble = (b >> (4 * h)) & 0xF;
        idx[b][4 * h + (nibble & 3)] = static_cast<uint8_t>(2 * h);
        idx[b][4 * h + (nibble >> 2)] = static_cast<uint8_t>(2 * h + 1);  // valid metadata: distinct
      }
  }
};

// Rows r0..r1 of the weight as dense int8 rows of Kp columns at dst (row n0 first); the metadata
// has been validated. 8 columns per step: one 4-byte load, one vpshufb, one 8-byte store.
S24_AVX2 void decompress_int8_rows_avx2(const Int8Problem& p, const Int8ScatterTable& t, int64_t r0, int64_t r1,
                                        int64_t n0, int8_t* dst) {
  for (int64_t n = r0; n < r1; ++n) {
    int8_t* row = dst + (n - n0) * p.Kp;
    const uint8_t* meta = p.meta + n * (p.Kp / 8);
    const int8_t* v = p.values + n * (p.Kp / 2);
    for (int64_t b = 0; b < p.Kp / 8; ++b) {
      int32_t four;
      std::memcpy(&four, v + 4 * b, 4);
      const __m128i idx = _mm_load_si128(reinterpret_cast<const __m128i*>(t.idx[meta[b]]));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(row + 8 * b), _mm_shuffle_epi8(_mm_cvtsi32_si128(four), idx));
    }
  }
}

// out = epilogue(a @ decompress(W).T) with the int32 product from at::_int_mm (oneDNN's AMX
// tiles), exact like int8_avx2's, so the outputs are the same bits. Panels of 8 MiB of dense
// int8 rows. a: [M, Kp] int8, zero past K.
void int8_dense_panels(const Int8Problem& p, const at::Tensor& a) {
  static const Int8ScatterTable table;
  const int64_t panel_rows = std::min(p.N, std::max<int64_t>(64, (int64_t(8) << 20) / p.Kp / 64 * 64));
  at::Tensor panel = at::empty({panel_rows, p.Kp}, a.options());
  for (int64_t n0 = 0; n0 < p.N; n0 += panel_rows) {
    const int64_t n1 = std::min(p.N, n0 + panel_rows);
    int8_t* dst = panel.mutable_data_ptr<int8_t>();
    at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) { decompress_int8_rows_avx2(p, table, r0, r1, n0, dst); });
    const at::Tensor acc = at::_int_mm(a, panel.narrow(0, 0, n1 - n0).t());
    const int32_t* c = acc.const_data_ptr<int32_t>();
    const int64_t cols = n1 - n0;
    at::parallel_for(0, p.M, std::max<int64_t>(1, 32768 / cols), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t j = 0; j < cols; ++j) int8_epilogue(p, m, n0 + j, c[m * cols + j]);
    });
  }
}
#endif  // LOWBIT_HAVE_AVX2_KERNELS

// ---- sparse24_mm with bf16 x and bf16 or int8 values on CPUs with AMX-BF16 (see kAmxMinM).
// lowbit/cpu/amx.h's tile loop, fed by a decoder that expands each weight row's kept values into
// its dense 32-column tile row: the row's 4 metadata bytes of the block give, through a 256-entry
// table, the 32-bit mask of its kept columns, and one vpexpandw (AVX512-VBMI2) writes the 16
// values to the set bits in order, zeros elsewhere; valid metadata (i0 < i1, checked before) names
// two distinct columns per group in increasing order, which is the order the values are stored
// in. Activations are bf16 and the values bf16 or int8 (widened to bf16 exactly; their row
// scale goes in the epilogue), so every product is exact and only the fp32 accumulation (AMX's)
// rounds; AMX treats subnormal bf16 inputs as zero (lowbit/cpu/amx.h).
LOWBIT_AMX_CODE_BEGIN

// For each metadata byte (groups 2j and 2j + 1 of a 32-column block): the 8-bit mask of the
// columns it keeps (kept_column_masks()). Invalid nibbles never reach it (the metadata is
// validated first).
struct KeptColumnMasks {
  uint8_t bits[256];
  KeptColumnMasks() {
    for (int b = 0; b < 256; ++b) {
      bits[b] = 0;
      for (int h = 0; h < 2; ++h) {
        const int nibble = (b >> (4 * h)) & 0xF;
        bits[b] |= static_cast<uint8_t>(((1 << (nibble & 3)) | (1 << (nibble >> 2))) << (4 * h));
      }
    }
  }
};

const KeptColumnMasks& kept_column_masks() {
  static const KeptColumnMasks masks;
  return masks;
}

// 32-column blocks of an AMX row (Kp is a multiple of 16 only: the last may be half a block).
inline int64_t amx_blocks(int64_t Kp) { return (Kp + cpu::kAmxK - 1) / cpu::kAmxK; }

// A block's kept values (16, or 8 for a half block: the rest zero) as bf16 words: bf16 values
// as they are; int8 values widened, exactly (|v| <= 128 has 8 significant bits).
inline __m256i kept_values_bf16(const uint16_t* v, bool half) {
  return half ? _mm256_maskz_loadu_epi16(0xFF, v) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
}
inline __m256i kept_values_bf16(const int8_t* v, bool half) {
  const __m128i bytes = half ? _mm_maskz_loadu_epi8(0xFF, v) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  return (__m256i)_mm512_cvtneps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
}

// Blocks b0..b1 of weight row n as dense bf16: block b's 32 words at dst + (b - b0) * dst_step.
// Kp is a multiple of 16: the last block may hold 16 columns only (8 values, 2 metadata bytes),
// and then its columns 16-31 are zero. V: the values' type (bf16 as uint16_t, or int8).
template <typename V>
inline void expand_row_blocks(const FloatProblem& p, int64_t n, int64_t b0, int64_t b1, uint16_t* dst,
                              int64_t dst_step, bool prefetch_next_tile) {
  const KeptColumnMasks& masks = kept_column_masks();
  const int64_t row_values = p.Kp / 2, row_meta = p.Kp / 8, full_blocks = p.Kp / cpu::kAmxK;
  const V* v = static_cast<const V*>(p.values) + n * row_values;
  const uint8_t* m = p.meta + n * row_meta;
  const int64_t full_end = std::min(b1, full_blocks);
  // One 64-byte line of values covers 64 / (16 sizeof(V)) blocks.
  constexpr int64_t kBlocksPerLine = 64 / (16 * sizeof(V));
  int64_t b = b0;
  for (; b < full_end; ++b) {
    if (prefetch_next_tile) {  // the next tile's row, one line ahead
      if (b % kBlocksPerLine == 0)
        _mm_prefetch(reinterpret_cast<const char*>(v + cpu::kAmxRows * row_values + 16 * b), _MM_HINT_T0);
      if (b % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(m + cpu::kAmxRows * row_meta + 4 * b), _MM_HINT_T0);
    }
    uint32_t meta4;
    std::memcpy(&meta4, m + 4 * b, 4);
    const uint32_t kept = masks.bits[meta4 & 0xFF] | uint32_t(masks.bits[(meta4 >> 8) & 0xFF]) << 8 |
                          uint32_t(masks.bits[(meta4 >> 16) & 0xFF]) << 16 | uint32_t(masks.bits[meta4 >> 24]) << 24;
    const __m256i vals = kept_values_bf16(v + 16 * b, false);
    _mm512_storeu_si512(dst + (b - b0) * dst_step, _mm512_maskz_expand_epi16(kept, _mm512_castsi256_si512(vals)));
  }
  if (b < b1) {  // the half block
    const uint32_t kept = masks.bits[m[4 * b]] | uint32_t(masks.bits[m[4 * b + 1]]) << 8;
    const __m256i vals = kept_values_bf16(v + 16 * b, true);
    _mm512_storeu_si512(dst + (b - b0) * dst_step, _mm512_maskz_expand_epi16(kept, _mm512_castsi256_si512(vals)));
  }
}

template <typename V>
void float_amx(const FloatProblem& p, const at::Tensor& xb) {
  const int64_t nblocks = amx_blocks(p.Kp);
  auto step_end = [&](int64_t b0) { return std::min(nblocks, b0 + cpu::kAmxStep); };
  auto decode = [&](int64_t n0, int rows, int64_t b0, int64_t b1, cpu::AmxStepBuffer& a) {
    for (int r = 0; r < rows; ++r)
      expand_row_blocks<V>(p, n0 + r, b0, b1, a[0][r], cpu::kAmxRows * cpu::kAmxK, /*prefetch_next_tile=*/true);
  };
  auto finish = [&](int64_t m0, int64_t n0, int rows, int64_t mrows, const float* c) {
    for (int r = 0; r < rows; ++r)
      for (int64_t m = 0; m < mrows; ++m) float_epilogue(p, m0 + m, n0 + r, c[r * cpu::kAmxCols + m]);
  };
  cpu::amx_weight_gemm(p.M, p.N, nblocks, xb, decode, step_end, finish);
}

// From kDecodedMinM rows (bf16 x, bf16 or int8 values, AMX-BF16): rows n0..n1 expanded into
// dense bf16 panel rows of 32 * amx_blocks(Kp) columns, for torch's bf16 GEMM
// (cpu::gemm_over_decoded_panels).
template <typename V>
void expand_panel_bf16(const FloatProblem& p, int64_t n0, int64_t n1, uint16_t* panel) {
  const int64_t nblocks = amx_blocks(p.Kp);
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n)
      expand_row_blocks<V>(p, n, 0, nblocks, panel + (n - n0) * nblocks * cpu::kAmxK, cpu::kAmxK, false);
  });
}

LOWBIT_AMX_CODE_END

// On CPUs with AMX-INT8, from this M sparse24_int8_scaled_mm decompresses its weight into dense
// int8 panels and takes the exact int32 product from at::_int_mm, as W8A8 does from M = 10
// (csrc/cpu/int8.cpp): on AMX tiles the dense GEMM does twice the multiply-adds and is still far
// faster than the 2:4 gather. Measured on the 2-vCPU AMX Xeon VM (N = K = 4096, 2 threads, 1 GiB
// read before each call, median of 9, two interleaved runs, ms), AVX2 kernel vs dense panels:
// M = 12 1.98-2.02 / 2.03-2.04, 16 2.53-2.60 / 2.88-3.00, 24 3.68-3.74 / 3.06-3.23, 32 4.75-4.86
// / 3.18-3.21, 64 9.3 / 3.6-4.0, 256 35.5-36.2 / 6.8-7.4. LOWBIT_INT8_ONEDNN: see
// cpu::use_onednn_int8.
constexpr int64_t kInt8DenseMinM = 20;

at::Tensor sparse24_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias) {
  const char* op = "sparse24_mm";
  const at::Tensor meta_c = (meta.scalar_type() == at::kByte && meta.dim() == 2) ? meta.contiguous() : meta;
  check_sparse24_mm(op, x, values, meta, scale, bias, nullptr);
  const MetaCheck meta_check(meta);
  if (!use_avx2() && !meta_check.known_valid) check_sparse24_meta_data(op, meta_c);
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0), Kp = L::padded_k(K);
  const at::Tensor v = values.contiguous();
  const at::Tensor s = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  const bool avx2 = use_avx2();
#if LOWBIT_HAVE_AVX2_KERNELS
  // bf16 x with values exact in bf16: bf16 ones, or int8 ones (times their per-row scale).
  const bool bf16_pair = avx2 && x.scalar_type() == at::kBFloat16 &&
                         (v.scalar_type() == at::kBFloat16 || v.scalar_type() == at::kChar);
  // The panels' decoder is the AMX kernel's (AVX512-VBMI2): only where that one could run. With
  // the panels off (LOWBIT_DECODED_GEMM=0) the AMX kernel takes every M from kAmxMinM; with
  // LOWBIT_SPARSE24_AMX=1, every M.
  const char* amx_env = std::getenv("LOWBIT_SPARSE24_AMX");
  const bool panels_bf16 = bf16_pair && !(amx_env && amx_env[0] == '1') && cpu::amx_bf16_ready() &&
                           cpu::decoded_gemm_route(at::kBFloat16, M, N, K, kDecodedMinM,
                                                   std::numeric_limits<int64_t>::max()) == cpu::DecodedGemm::kBFloat16;
  const bool amx = bf16_pair && !panels_bf16 &&
                   cpu::use_amx_bf16(M, kAmxMinM, std::numeric_limits<int64_t>::max(), "LOWBIT_SPARSE24_AMX");
#else
  const bool amx = false, panels_bf16 = false;
#endif
  const bool dense = avx2 && !amx && !panels_bf16 && M >= kDenseMinM;
  const at::Tensor x32 = amx || panels_bf16 ? at::Tensor() : x_to_fp32(x, Kp, avx2 && !dense);

  FloatProblem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.Kp = Kp;
  p.values = v.const_data_ptr();
  p.kind = value_kind(v.scalar_type());
  p.meta = meta_c.const_data_ptr<uint8_t>();
  p.scale = s.defined() ? s.const_data_ptr<float>() : nullptr;
  p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  p.x = x32.defined() ? x32.const_data_ptr<float>() : nullptr;
  p.partial = nullptr;
  p.out = out.mutable_data_ptr();
  p.out_type = out.scalar_type();
  if (!avx2) {
    float_scalar(p);
    meta_check.passed(meta);
    return out;
  }
#if LOWBIT_HAVE_AVX2_KERNELS
  // These routes read the whole metadata up front (the gather kernels check it block by block).
  if (amx || panels_bf16 || dense) {
    if (!meta_check.known_valid && !meta_valid_avx2(p.meta, meta_c.numel())) fail_bad_meta(op, meta_c);
    meta_check.passed(meta);
  }
  if (amx) {
    int column_of_word[cpu::kAmxK];
    for (int w = 0; w < cpu::kAmxK; ++w) column_of_word[w] = w;
    const at::Tensor xb = cpu::x_to_amx_b(x, amx_blocks(Kp), column_of_word);
    if (p.kind == ValueKind::kInt8)
      float_amx<int8_t>(p, xb);
    else
      float_amx<uint16_t>(p, xb);
    return out;
  }
  if (panels_bf16) {
    const int64_t Kd = amx_blocks(Kp) * cpu::kAmxK;
    at::Tensor xd = at::zeros({M, Kd}, x.options());
    xd.narrow(1, 0, K).copy_(x);
    auto decode = [&](int64_t n0, int64_t n1, void* panel) {
      if (p.kind == ValueKind::kInt8)
        expand_panel_bf16<int8_t>(p, n0, n1, static_cast<uint16_t*>(panel));
      else
        expand_panel_bf16<uint16_t>(p, n0, n1, static_cast<uint16_t*>(panel));
    };
    auto finish = [&](const at::Tensor& y, int64_t n0, int64_t /*n1*/) {
      cpu::for_each_panel_product(y, n0, [&](int64_t m, int64_t n, float val) { float_epilogue(p, m, n, val); });
    };
    // No scale or bias: at::mm's own rounding of the fp32 sum to bf16 is the only one.
    cpu::gemm_over_decoded_panels(xd, N, decode, finish, p.scale || p.bias ? at::Tensor() : out);
    return out;
  }
  if (dense) {
    float_dense_panels(p, x32);
    return out;
  }
  // Small M: one pass over all of K. Large M: chunks of 64 blocks (1024 columns), so a row
  // block's values (16 x 512 values) stay in L1/L2 while every row of x passes over them.
  const int64_t nblocks = Kp / 16;
  const int64_t chunk = M <= kSmallM ? nblocks : 64;
  at::Tensor partial;
  if (chunk < nblocks) {
    partial = at::empty({M, N}, x.options().dtype(at::kFloat));
    p.partial = partial.mutable_data_ptr<float>();
  }
  const bool check = !meta_check.known_valid;
  bool meta_ok;
  switch (p.kind) {
    case ValueKind::kHalf: meta_ok = float_avx2<c10::Half>(p, chunk, check); break;
    case ValueKind::kBFloat16: meta_ok = float_avx2<c10::BFloat16>(p, chunk, check); break;
    case ValueKind::kInt8: meta_ok = float_avx2<int8_t>(p, chunk, check); break;
    default: meta_ok = float_avx2<float>(p, chunk, check); break;
  }
  if (!meta_ok) fail_bad_meta(op, meta_c);
  meta_check.passed(meta);
#endif
  return out;
}

at::Tensor sparse24_int8_scaled_mm_cpu(const at::Tensor& a, const at::Tensor& values, const at::Tensor& meta,
                                       const at::Tensor& scale_a, const at::Tensor& scale_b,
                                       const std::optional<at::Tensor>& bias,
                                       std::optional<c10::ScalarType> out_dtype) {
  const char* op = "sparse24_int8_scaled_mm";
  const at::Tensor meta_c = (meta.scalar_type() == at::kByte && meta.dim() == 2) ? meta.contiguous() : meta;
  const c10::ScalarType out_type =
      check_sparse24_int8_scaled_mm(op, a, values, meta, scale_a, scale_b, bias, out_dtype, nullptr);
  const MetaCheck meta_check(meta);
  if (!use_avx2() && !meta_check.known_valid) check_sparse24_meta_data(op, meta_c);
  const int64_t M = a.size(0), K = a.size(1), N = values.size(0), Kp = L::padded_k(K);
  const int64_t Kx = (Kp + 63) / 64 * 64;
  const at::Tensor v = values.contiguous();
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor xpad = at::zeros({M, Kx}, a.options());
  xpad.narrow(1, 0, K).copy_(a);
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_type));

  Int8Problem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.Kp = Kp;
  p.Kx = Kx;
  p.values = v.const_data_ptr<int8_t>();
  p.meta = meta_c.const_data_ptr<uint8_t>();
  p.x = xpad.const_data_ptr<int8_t>();
  p.scale_a = sa.const_data_ptr<float>();
  p.scale_a_scalar = sa.numel() == 1;
  p.scale_b = sb.const_data_ptr<float>();
  p.scale_b_scalar = sb.numel() == 1;
  p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.out_type = out_type;
  if (!use_avx2()) {
    int8_scalar(p);
    meta_check.passed(meta);
    return out;
  }
#if LOWBIT_HAVE_AVX2_KERNELS
  if (cpu::use_onednn_int8(M, N, K, kInt8DenseMinM)) {
    if (!meta_check.known_valid && !meta_valid_avx2(p.meta, meta_c.numel())) fail_bad_meta(op, meta_c);
    meta_check.passed(meta);
    int8_dense_panels(p, Kx == Kp ? xpad : xpad.narrow(1, 0, Kp).contiguous());
    return out;
  }
  // The AVX2 copy of x: the middle 16-column quarters of every 64 columns swapped (int8_tile).
  at::Tensor xperm = at::empty({M, Kx}, a.options());
  {
    const int8_t* src = xpad.const_data_ptr<int8_t>();
    int8_t* dst = xperm.mutable_data_ptr<int8_t>();
    static constexpr int kQuarter[4] = {0, 2, 1, 3};
    for (int64_t i = 0; i < M * Kx / 64; ++i)
      for (int q = 0; q < 4; ++q) std::memcpy(dst + 64 * i + 16 * q, src + 64 * i + 16 * kQuarter[q], 16);
  }
  // x (M x Kx bytes) is scanned once for -128 to pick the product form (see Int8Product).
  const bool x_has_min = std::memchr(xperm.const_data_ptr<int8_t>(), 0x80, M * Kx) != nullptr;
  const bool check = !meta_check.known_valid;
  const bool meta_ok = x_has_min ? int8_avx2<Int8Product::kAbsActivation>(p, xperm.const_data_ptr<int8_t>(), check)
                                 : int8_avx2<Int8Product::kAbsWeight>(p, xperm.const_data_ptr<int8_t>(), check);
  if (!meta_ok) fail_bad_meta(op, meta_c);
  meta_check.passed(meta);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("sparse24_mm", &sparse24_mm_cpu);
  m.impl("sparse24_int8_scaled_mm", &sparse24_int8_scaled_mm_cpu);
}

}  // namespace lowbit
