// AVX2 building blocks shared by the CPU kernels: float loads/stores for every activation dtype,
// horizontal sums, and the int16 transpose used to pack int8 GEMM panels.
// Every function here is LOWBIT_AVX2 and may only be reached after lowbit::cpu::has_avx2().
#pragma once

#include "lowbit/cpu/isa.h"

#if LOWBIT_HAVE_AVX2_KERNELS

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define LOWBIT_AVX2_INLINE LOWBIT_AVX2 inline __attribute__((always_inline))

namespace lowbit::cpu::avx2 {

// ---------------------------------------------------------------- 8 lanes of fp32 from/to T
LOWBIT_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

LOWBIT_AVX2_INLINE __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// bf16 is the top half of an fp32: widening is a shift, exact.
LOWBIT_AVX2_INLINE __m256 load8(const c10::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

LOWBIT_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// F16C rounds to nearest even, as c10::Half(float) does.
LOWBIT_AVX2_INLINE void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Round to nearest even exactly like c10::BFloat16(float): add 0x7fff plus the lsb of the kept
// half, keep the top 16 bits; NaN becomes the canonical quiet NaN 0x7fc0.
LOWBIT_AVX2_INLINE void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // packus works per 128-bit lane: [r0-3 r0-3 | r4-7 r4-7]; gather qwords 0 and 2.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// Keeps the compiler from fusing the multiply that produced v with a following add into an FMA
// (see lowbit::cpu::fp_barrier): epilogues must round like the reference, op by op.
LOWBIT_AVX2_INLINE __m256 fp_barrier(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

// ---------------------------------------------------------------- horizontal sums
LOWBIT_AVX2_INLINE int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

LOWBIT_AVX2_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LOWBIT_AVX2_INLINE float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------- transposes
// 8x8 transpose of 32-bit elements: r[i] lane j  ->  r[j] lane i.
LOWBIT_AVX2_INLINE void transpose8x8_epi32(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
  }
}

// ---------------------------------------------------------------- partial loads
// Loads n < 16 bytes (zero-filled): K tails of rows that may end at the last mapped byte.
LOWBIT_AVX2_INLINE __m128i load_partial_i8x16(const int8_t* p, int64_t n) {
  alignas(16) int8_t tmp[16] = {};
  std::memcpy(tmp, p, static_cast<size_t>(n));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
}

LOWBIT_AVX2_INLINE __m128i load_partial_i8x8(const int8_t* p, int64_t n) {
  alignas(16) int8_t tmp[16] = {};
  std::memcpy(tmp, p, static_cast<size_t>(n));
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(tmp));
}

}  // namespace lowbit::cpu::avx2

#endif  // LOWBIT_HAVE_AVX2_KERNELS
