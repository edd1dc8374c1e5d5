// FP8 family (E4M3FN, E5M2), CPU kernels: quantize (dynamic / static, every granularity), fp8 x
// fp8 scaled GEMM and fp8-weight-only GEMM. The CPU has no fp8 arithmetic, so fp8 is decoded to
// fp32 (exactly: every fp8 value is an fp32) and multiplied with fp32 FMAs.
// Semantics: lowbit/backends/reference/fp8.py. Quantization is bit exact (IEEE division, RNE,
// lowbit's saturation policy, lowbit/fp8.h); GEMMs accumulate in fp32.
//
// Decoding (AVX2): an e5m2 byte is exactly the high byte of an fp16, and an e4m3 byte, moved
// into fp16 bit positions (sign | exponent-mantissa << 7), is an fp16 worth value / 256
// (subnormals included: the fp16 exponent bias is 8 more). So 16 codes become 16 fp16 with a few
// 16-bit integer ops and vcvtph2ps gives fp32 in hardware, independent of the MXCSR
// denormal flags. The factor 256 (a power of two, exact) is folded into the per-row result or
// the per-block scale. The one e4m3 NaN code (0x7f) would decode to 480 / 256: it is patched to
// an fp16 NaN with the same bits torch produces.
//
// GEMM paths:
// * M <= 4: rows of fp8 weights are streamed once and decoded in registers (never stored as
//   fp32), 32 codes at a time. On Zen 3 this is bound by decode instructions, not memory.
// * 4 < M <= kGemvMaxM: strips of weight rows are decoded once into an L1-resident fp32 buffer
//   that every row of x reuses; same FMA order and values as the M <= 4 tiles (same bits).
// * larger M: bound by FLOPs. Blocks of kDecodeRows weight rows are decoded to fp32 (scaled per
//   block where the scales are per block) and multiplied with at::mm; the full weight is never
//   materialized in fp32. Not taken: int4's bf16 decoded-GEMM route (lowbit/cpu/decoded_gemm.h)
//   for bf16 x on AMX CPUs. It measured 2.6x faster at M = 256 (N = K = 4096, 33 -> 12.7 ms), but
//   CPU at::mm has no bf16 -> fp32 output, so the product would be rounded to bf16 before the
//   scale and bias, outside the fp32 bound this family promises on every backend.
// Portable scalar code (256-entry tables) runs where AVX2/FMA/F16C are missing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lowbit/checks.h"
#include "lowbit/cpu/amx.h"
#include "lowbit/cpu/isa.h"
#include "lowbit/cpu/vec_avx2.h"
#include "lowbit/fp8.h"

namespace lowbit {
namespace {

using c10::BFloat16;
using c10::Half;
using fp8::Format;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

template <typename F>
void dispatch_float(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: f(float{}); return;
    case c10::ScalarType::Half: f(Half{}); return;
    case c10::ScalarType::BFloat16: f(BFloat16{}); return;
    default: TORCH_CHECK(false, "lowbit: unexpected dtype ", c10::toString(t));
  }
}

inline Format format_of(c10::ScalarType t) {
  return t == c10::ScalarType::Float8_e4m3fn ? Format::E4M3 : Format::E5M2;
}

inline c10::ScalarType dtype_of(Format f) {
  return f == Format::E4M3 ? c10::ScalarType::Float8_e4m3fn : c10::ScalarType::Float8_e5m2;
}

const std::array<float, 256>& decode_table(Format f) {
  static const auto tables = [] {
    std::array<std::array<float, 256>, 2> t{};
    for (int c = 0; c < 256; ++c) {
      t[0][c] = fp8::e4m3_to_float(static_cast<uint8_t>(c));
      t[1][c] = fp8::e5m2_to_float(static_cast<uint8_t>(c));
    }
    return t;
  }();
  return tables[f == Format::E4M3 ? 0 : 1];
}

// Rows per task: enough elements (~32K) that a thread's start-up cost is noise.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 32768 / K); }

// ============================================================================ quantization
// Where one row's scales live: scale index = (r / row_div) * row_stride + (k / len) * k_stride.
struct ScaleMap {
  const float* s;
  int64_t row_div, row_stride, len, k_stride;
  float at(int64_t r, int64_t kb) const { return s[(r / row_div) * row_stride + kb * k_stride]; }
};

// max |x| over finite elements: inf and NaN are left out so one bad value cannot zero the group.
template <typename T>
float finite_amax_scalar(const T* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(static_cast<float>(x[i]));
    if (a < INFINITY && a > m) m = a;
  }
  return m;
}

template <typename T>
void encode_scalar(const T* x, int64_t n, float scale, Format f, bool saturate, uint8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = fp8::from_float(static_cast<float>(x[i]) / scale, f, saturate);
}

#if LOWBIT_HAVE_AVX2_KERNELS
namespace avx2 = cpu::avx2;

template <typename T>
LOWBIT_AVX2 float finite_amax_avx2(const T* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_and_ps(avx2::load8(x + i), abs_mask);
    const __m256 b = _mm256_and_ps(avx2::load8(x + i + 8), abs_mask);
    // An ordered a < inf is false for inf and NaN: those lanes contribute 0.
    m0 = _mm256_max_ps(m0, _mm256_and_ps(a, _mm256_cmp_ps(a, inf, _CMP_LT_OQ)));
    m1 = _mm256_max_ps(m1, _mm256_and_ps(b, _mm256_cmp_ps(b, inf, _CMP_LT_OQ)));
  }
  float m = avx2::hmax(_mm256_max_ps(m0, m1));
  return std::max(m, finite_amax_scalar(x + i, n - i));
}

// Eight lanes of fp8::float_to_e4m3 / float_to_e5m2 (same algorithm, branch-free), as int32 codes.
template <Format F, bool SAT>
LOWBIT_AVX2_INLINE __m256i encode8(__m256 v) {
  constexpr bool e4 = F == Format::E4M3;
  constexpr int kShift = e4 ? 20 : 21;
  constexpr uint32_t kRebias = (e4 ? uint32_t(7 - 127) : uint32_t(15 - 127)) << 23;
  constexpr uint32_t kRound = (1u << (kShift - 1)) - 1;
  constexpr uint32_t kDenorm = (e4 ? 141u : 134u) << 23;
  constexpr uint32_t kMinNormal = (e4 ? 121u : 113u) << 23;
  constexpr uint32_t kOver = e4 ? 0x43e80000u : 0x476fffffu;  // above: rounds past the max
  constexpr int kOverCode = e4 ? (SAT ? 0x7e : 0x7f) : (SAT ? 0x7b : 0x7c);
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i sign = _mm256_and_si256(bits, _mm256_set1_epi32(int(0x80000000u)));
  const __m256i a = _mm256_xor_si256(bits, sign);  // < 2^31: signed compares are safe
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, kShift), _mm256_set1_epi32(1));
  const __m256i normal =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(int(kRebias + kRound))), odd), kShift);
  const __m256 denorm_f = _mm256_castsi256_ps(_mm256_set1_epi32(int(kDenorm)));
  const __m256i sub = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), denorm_f)),
                                       _mm256_set1_epi32(int(kDenorm)));
  __m256i r = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(kMinNormal)), a));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(kOverCode), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(int(kOver))));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7f), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000)));
  return _mm256_or_si256(r, _mm256_srli_epi32(sign, 24));
}

template <Format F, bool SAT, typename T>
LOWBIT_AVX2 void encode_avx2(const T* x, int64_t n, float scale, uint8_t* q) {
  const __m256 s = _mm256_set1_ps(scale);
  // packus works within 128-bit lanes; this permutation puts the 4-byte groups back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i c0 = encode8<F, SAT>(_mm256_div_ps(avx2::load8(x + i), s));
    const __m256i c1 = encode8<F, SAT>(_mm256_div_ps(avx2::load8(x + i + 8), s));
    const __m256i c2 = encode8<F, SAT>(_mm256_div_ps(avx2::load8(x + i + 16), s));
    const __m256i c3 = encode8<F, SAT>(_mm256_div_ps(avx2::load8(x + i + 24), s));
    const __m256i w01 = _mm256_packus_epi32(c0, c1), w23 = _mm256_packus_epi32(c2, c3);
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(w01, w23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), bytes);
  }
  encode_scalar(x + i, n - i, scale, F, SAT, q + i);
}
#endif  // LOWBIT_HAVE_AVX2_KERNELS

template <typename T>
float finite_amax(const T* x, int64_t n, bool avx) {
#if LOWBIT_HAVE_AVX2_KERNELS
  if (avx) return finite_amax_avx2(x, n);
#endif
  return finite_amax_scalar(x, n);
}

template <typename T>
void encode(const T* x, int64_t n, float scale, Format f, bool saturate, uint8_t* q, bool avx) {
#if LOWBIT_HAVE_AVX2_KERNELS
  if (avx) {
    if (f == Format::E4M3)
      saturate ? encode_avx2<Format::E4M3, true>(x, n, scale, q) : encode_avx2<Format::E4M3, false>(x, n, scale, q);
    else
      saturate ? encode_avx2<Format::E5M2, true>(x, n, scale, q) : encode_avx2<Format::E5M2, false>(x, n, scale, q);
    return;
  }
#endif
  encode_scalar(x, n, scale, f, saturate, q);
}

// q[r, :] for rows of x [rows, K] with the scales given by `map`.
void quantize_rows(const at::Tensor& x, int64_t rows, int64_t K, const ScaleMap& map, Format f, bool saturate,
                   uint8_t* q) {
  const bool avx = cpu::has_avx2();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k0 = 0, kb = 0; k0 < K; k0 += map.len, ++kb) {
          const int64_t n = std::min(map.len, K - k0);
          encode(xp + r * K + k0, n, map.at(r, kb), f, saturate, q + r * K + k0, avx);
        }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_dynamic_cpu(const at::Tensor& x_in, c10::string_view format,
                                                            c10::string_view granularity, bool saturate) {
  const char* op = "fp8_quantize_dynamic";
  const std::string fmt_s(format), gran(granularity);
  check_fp8_quantize_dynamic(op, x_in, fmt_s, gran);
  const Format f = check_fp8_format(op, fmt_s) ? Format::E4M3 : Format::E5M2;
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), rows = x.numel() / K;
  const bool blocks = gran == "block1x128" || gran == "block128x128";
  const int64_t len = blocks ? kFp8Block : K, kb = cdiv(K, len);

  // Finite amax per (row, k-block), then reduced over the rows that share a scale.
  at::Tensor amax = at::empty({rows, kb}, x.options().dtype(at::kFloat));
  float* ap = amax.data_ptr<float>();
  const bool avx = cpu::has_avx2();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < kb; ++j)
          ap[r * kb + j] = finite_amax(xp + r * K + j * len, std::min(len, K - j * len), avx);
    });
  });
  const int64_t row_div = gran == "tensor" ? rows : (gran == "block128x128" ? kFp8Block : 1);
  std::vector<int64_t> scale_shape;
  if (gran == "row") scale_shape.assign(x.sizes().begin(), x.sizes().end() - 1);
  if (gran == "block1x128") {
    scale_shape.assign(x.sizes().begin(), x.sizes().end() - 1);
    scale_shape.push_back(kb);
  }
  if (gran == "block128x128") scale_shape = {cdiv(rows, kFp8Block), kb};
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  float* sp = scale.data_ptr<float>();
  const float fmax = fp8::max_value(f);
  const int64_t srows = cdiv(rows, row_div);
  for (int64_t g = 0; g < srows; ++g)
    for (int64_t j = 0; j < kb; ++j) {
      float m = 0.0f;
      for (int64_t r = g * row_div; r < std::min(rows, (g + 1) * row_div); ++r) m = std::max(m, ap[r * kb + j]);
      const float s = m / fmax;
      sp[g * kb + j] = s > 0.0f ? s : 1.0f;  // amax 0 (or underflow): scale 1, never a division by 0
    }

  at::Tensor q = at::empty(x.sizes(), x.options().dtype(dtype_of(f)));
  quantize_rows(x, rows, K, ScaleMap{sp, row_div, kb, len, 1}, f, saturate, static_cast<uint8_t*>(q.data_ptr()));
  return {q, scale};
}

at::Tensor fp8_quantize_static_cpu(const at::Tensor& x_in, const at::Tensor& scale_in, c10::string_view format,
                                   bool saturate) {
  const char* op = "fp8_quantize_static";
  const std::string fmt_s(format);
  check_fp8_quantize_static(op, x_in, scale_in, fmt_s);
  const Format f = check_fp8_format(op, fmt_s) ? Format::E4M3 : Format::E5M2;
  const at::Tensor x = x_in.contiguous(), scale = scale_in.contiguous();
  const int64_t K = x.size(-1), rows = x.numel() / K;
  ScaleMap map{scale.const_data_ptr<float>(), 1, 0, K, 0};  // one scale for everything
  if (!fp8_is_scalar(scale)) {
    if (scale.dim() == x.dim() - 1)
      map.row_stride = 1;  // per row
    else
      map = ScaleMap{map.s, 1, cdiv(K, kFp8Block), kFp8Block, 1};  // per 1x128 block
  }
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(dtype_of(f)));
  quantize_rows(x, rows, K, map, f, saturate, static_cast<uint8_t*>(q.data_ptr()));
  return q;
}

// ============================================================================ decoding
#if LOWBIT_HAVE_AVX2_KERNELS
// 16 codes -> 16 fp32 in two vectors; e4m3 values come out divided by 256 (see the top).
template <Format F>
LOWBIT_AVX2_INLINE void decode16(__m128i codes, __m256& lo, __m256& hi) {
  __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(codes), 8);
  if constexpr (F == Format::E4M3) {
    // s eeee mmm 0.. -> s 0 eeee mmm 0..: an arithmetic shift, then clear the copied sign bit.
    h = _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16(int16_t(0xbfff)));
    const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7fff)), _mm256_set1_epi16(0x3f80));
    h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x4000)));
  }
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// 32 codes -> 32 fp32 in four vectors, in order, the exact values (e4m3 NOT divided by 256).
// The GEMV is bound by decode instructions, not by memory, so this path is cheaper than two
// decode16: e4m3 codes that are all normal numbers or zeros (nearly always, for scaled weights)
// become fp32 with integer ops and one multiply (no vcvtph2ps, no NaN fixup); a block of 32
// holding a subnormal or NaN takes the fp16 route, which handles every code.
template <Format F>
LOWBIT_AVX2 __attribute__((noinline)) void decode32_special(const uint8_t* p, __m256 v[4]) {
  // vpermq puts codes 0-15 in the low qword of each 128-bit lane so that the in-lane byte unpacks
  // with zero (each code into the high byte of an fp16) come out in order.
  const __m256i c = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 0xd8);
  __m256i h[2] = {_mm256_unpacklo_epi8(_mm256_setzero_si256(), c), _mm256_unpackhi_epi8(_mm256_setzero_si256(), c)};
  for (int t = 0; t < 2; ++t) {
    if constexpr (F == Format::E4M3) {
      h[t] = _mm256_and_si256(_mm256_srai_epi16(h[t], 1), _mm256_set1_epi16(int16_t(0xbfff)));
      const __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(h[t], _mm256_set1_epi16(0x7fff)), _mm256_set1_epi16(0x3f80));
      h[t] = _mm256_or_si256(h[t], _mm256_and_si256(nan, _mm256_set1_epi16(0x4000)));
    }
    // e4m3 comes out as value / 256; * 256 is exact (the result is a normal fp32 or NaN).
    const __m256 unit = _mm256_set1_ps(F == Format::E4M3 ? 256.0f : 1.0f);
    v[2 * t] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h[t])), unit);
    v[2 * t + 1] = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h[t], 1)), unit);
  }
}

// True when the 32 e4m3 codes at p are all normal numbers or zeros: the common path of decode32
// and decode32_avx512. Normal iff 1 <= exponent field <= 15 and not NaN, i.e. (c & 0x7f) in
// [8, 126], zero iff (c & 0x7f) == 0: shifted by +1 (127 + 1 wraps negative) that is y > 8 or y == 1.
LOWBIT_AVX2_INLINE bool e4m3_normal_or_zero32(const uint8_t* p) {
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i y = _mm256_add_epi8(_mm256_and_si256(c, _mm256_set1_epi8(0x7f)), _mm256_set1_epi8(1));
  const __m256i normal_or_zero =
      _mm256_or_si256(_mm256_cmpgt_epi8(y, _mm256_set1_epi8(8)), _mm256_cmpeq_epi8(y, _mm256_set1_epi8(1)));
  return _mm256_movemask_epi8(normal_or_zero) == -1;
}

template <Format F>
LOWBIT_AVX2_INLINE void decode32(const uint8_t* p, __m256 v[4]) {
  if constexpr (F == Format::E5M2) {
    // e5m2 is the high byte of an fp16 (exact for every code, inf and NaN included), and the
    // fp16 route measured faster than the integer one for it.
    const __m256i c = _mm256_permute4x64_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 0xd8);
    const __m256i h0 = _mm256_unpacklo_epi8(_mm256_setzero_si256(), c);
    const __m256i h1 = _mm256_unpackhi_epi8(_mm256_setzero_si256(), c);
    v[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h0));
    v[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h0, 1));
    v[2] = _mm256_cvtph_ps(_mm256_castsi256_si128(h1));
    v[3] = _mm256_cvtph_ps(_mm256_extracti128_si256(h1, 1));
    return;
  }
  if (__builtin_expect(!e4m3_normal_or_zero32(p), 0)) {
    decode32_special<F>(p, v);
    return;
  }
  // (sign-extended code) << 20: sign copies in bits 27-31, exponent-mantissa in bits 20-26, right
  // below where the fp32 exponent's low bits are; keeping bit 31 and those gives an fp32 equal to
  // the value * 2^-120 (exponent bias 127 instead of 7): a normal fp32 for a normal code, +-0 for
  // a zero code. One exact multiply by 2^120 then gives the value. Why a multiply rather than
  // adding 120 to the exponent field: the add turns a zero into 2^-7, so zeros had to take the
  // fp16 route, and weights with zeros scattered through them (pruned, or small values rounded
  // to zero) paid for it and for the mispredicted branch: measured (two threads, M = 1, 4096 x
  // 4096, cold, median of 60, three interleaved runs) 1.8-2.1 ms with no zeros, 3.2-3.9 ms with
  // 1% zeros, 3.8-5.0 ms with 10-50%; now 1.4-1.7 ms at every zero fraction. Subnormal codes
  // would reach the multiply as fp32 subnormals, which the MXCSR DAZ flag would zero and which
  // measured slower (about 2.2 ms when most codes are subnormal), so they keep the fp16 route;
  // properly scaled weights rarely have them.
  const __m256i keep = _mm256_set1_epi32(int(0x87f00000u));
  const __m256 two_pow_120 = _mm256_castsi256_ps(_mm256_set1_epi32((127 + 120) << 23));
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m256i t = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * q)));
    v[q] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(t, 20), keep)), two_pow_120);
  }
}

LOWBIT_AVX2_INLINE __m128i load_codes(const uint8_t* p, int64_t n) {
  if (n >= 16) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return avx2::load_partial_i8x16(reinterpret_cast<const int8_t*>(p), n);  // code 0 is +0
}

template <Format F>
LOWBIT_AVX2 void decode_row_avx2(const uint8_t* w, int64_t K, const float* block_scale, float* out) {
  constexpr float kUnit = F == Format::E4M3 ? 256.0f : 1.0f;
  for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kFp8Block, ++kb) {
    // (v / 256) * (256 * s) rounds once, like v * s; 256 * s is exact.
    const __m256 m = _mm256_set1_ps(block_scale != nullptr ? kUnit * block_scale[kb] : kUnit);
    const int64_t k1 = std::min(K, k0 + kFp8Block);
    for (int64_t k = k0; k < k1; k += 16) {
      __m256 lo, hi;
      decode16<F>(load_codes(w + k, k1 - k), lo, hi);
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, _mm256_mul_ps(lo, m));
      _mm256_store_ps(tmp + 8, _mm256_mul_ps(hi, m));
      std::memcpy(out + k, tmp, sizeof(float) * std::min<int64_t>(16, k1 - k));
    }
  }
}
#endif  // LOWBIT_HAVE_AVX2_KERNELS

// out[k] = decode(w[k]) * block_scale[k / 128] (block_scale may be null: unscaled, exact).
void decode_row(const uint8_t* w, int64_t K, Format f, const float* block_scale, float* out, bool avx) {
#if LOWBIT_HAVE_AVX2_KERNELS
  if (avx) {
    f == Format::E4M3 ? decode_row_avx2<Format::E4M3>(w, K, block_scale, out)
                      : decode_row_avx2<Format::E5M2>(w, K, block_scale, out);
    return;
  }
#endif
  const auto& lut = decode_table(f);
  for (int64_t k = 0; k < K; ++k) {
    const float v = lut[w[k]];
    out[k] = block_scale != nullptr ? v * block_scale[k / kFp8Block] : v;
  }
}

// ============================================================================ GEMM
// out[m, n] = acc [* row_scale[m]] [* col_scale[n]] [+ bias[n]], op by op in fp32, like the reference.
struct Epilogue {
  c10::ScalarType out_dtype;
  void* out;
  int64_t ldo;
  const float* row_scale;  // [M] or null
  const float* col_scale;  // [N] or null
  const float* bias;       // [N] or null
};

template <typename OutT>
void epilogue_tile(const Epilogue& e, const float* acc, int64_t lda, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  OutT* out = static_cast<OutT*>(e.out);
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float y = acc[(m - m0) * lda + (n - n0)];
      if (e.row_scale != nullptr) y = y * e.row_scale[m];
      if (e.col_scale != nullptr) y = y * e.col_scale[n];
      cpu::fp_barrier(y);  // no FMA contraction with the bias add
      if (e.bias != nullptr) y = y + e.bias[n];
      out[m * e.ldo + n] = static_cast<OutT>(y);
    }
}

void apply_epilogue(const Epilogue& e, const float* acc, int64_t lda, int64_t m0, int64_t m1, int64_t n0,
                    int64_t n1) {
  dispatch_float(e.out_dtype, [&](auto tag) { epilogue_tile<decltype(tag)>(e, acc, lda, m0, m1, n0, n1); });
}

constexpr int64_t kGemvMaxM = 16;
// On CPUs with AMX-BF16, from M = 2 the AMX kernel (fp8_amx; bf16 x for fp8_weight_only_mm, any
// fp8_scaled_mm), vector scales only. Measured on the 2-vCPU AMX Xeon VM (e4m3, N = K = 4096,
// 2 threads, 1 GiB read before each call, median of 11, speed over fp32 F.linear), weight-only
// with bf16 x, AMX vs the GEMV tiles / decoded blocks: M = 1 1.68-1.77x / 1.04-1.07x, 4 3.46-3.57
// / 1.81-1.83, 8 4.66 / 1.70, 16 4.53 / 1.44, 64 4.12 / 0.70, 256 2.69 / 0.83; fp8_scaled_mm
// (W8A8) M = 1 1.64-1.70 / 1.02-1.07, 16 4.02 / 1.44, 256 2.19 / 0.81. (On this VM the AVX-512
// GEMV tiles ran at half the speed they had in session 10's measurements, 2.07x at M = 1, while
// fp32 F.linear did not change. In a later run on the same VM, at that speed again, M = 1 gave
// GEMV 1.10 ms / AMX 1.24 ms and M = 4 1.33 / 1.22: M = 1 stays on the GEMV tiles.)
constexpr int64_t kFp8AmxMinM = 2;
constexpr int64_t kFp8AmxMaxM = INT64_MAX;
constexpr int64_t kGemvCols = 36;     // weight rows per small-M task: a multiple of every tile width
constexpr int64_t kDecodeRows = 256;  // weight rows decoded per at::mm call (large M)

#if LOWBIT_HAVE_AVX2_KERNELS
template <int MB>
constexpr int gemv_nb() {
  return MB <= 2 ? 4 : (MB == 3 ? 3 : 2);  // MB * NB accumulators + decode temporaries fit 16 ymm
}

// c[i, j] = sum_k x[i, k] * decode(w[j, k]) (* block scale) for MB rows of x (zero-padded to a
// multiple of 16) and NB weight rows. noinline with every loop unrolled: inlined into its caller,
// GCC kept the accumulators on the stack (a store-to-load chain per FMA).
template <Format F, int MB, int NB, bool BLOCK>
LOWBIT_AVX2 __attribute__((noinline)) void gemv_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t K,
                                                     const float* bscale, int64_t ldb, float* c, int64_t ldc) {
  constexpr float kUnit = F == Format::E4M3 ? 256.0f : 1.0f;  // decode16's e4m3 values are / 256
  // Sums start from -0 (the additive identity, unlike +0): a row of -0 products sums to -0 as
  // in an exact IEEE sum, and x's padding is -0 for the same reason.
  __m256 acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_set1_ps(-0.0f);
  for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kFp8Block, ++kb) {
    __m256 m[NB];
    if constexpr (BLOCK)
      for (int j = 0; j < NB; ++j) m[j] = _mm256_set1_ps(bscale[j * ldb + kb]);
    const int64_t k1 = std::min(K, k0 + kFp8Block);
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      // The rows cpu::kPrefetchTilesAhead tiles ahead. Measured one thread, M = 1, 4096 x 4096,
      // cold caches, min of 31, under load, three A/B pairs, none -> one tile ahead: 2.43-2.55 ->
      // 2.13-2.45 ms. One -> two tiles (two threads, 64 MiB read before each call, median of 100,
      // four interleaved runs): 1.57-1.87 -> 1.36-1.65 ms.
      if ((k & 63) == 0)
        for (int j = 0; j < NB; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(w + (cpu::kPrefetchTilesAhead * NB + j) * K + k), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        __m256 v[4];
        decode32<F>(w + j * K + k, v);
        if constexpr (BLOCK)
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) v[q] = _mm256_mul_ps(v[q], m[j]);
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q)
            acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + k + 8 * q), v[q], acc[i][j]);
      }
    }
    for (; k < k1; k += 16) {
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        __m256 lo, hi;
        decode16<F>(load_codes(w + j * K + k, k1 - k), lo, hi);
        if constexpr (F == Format::E4M3) {  // exact: the true values, like decode32's
          lo = _mm256_mul_ps(lo, _mm256_set1_ps(kUnit));
          hi = _mm256_mul_ps(hi, _mm256_set1_ps(kUnit));
        }
        if constexpr (BLOCK) {
          lo = _mm256_mul_ps(lo, m[j]);
          hi = _mm256_mul_ps(hi, m[j]);
        }
#pragma GCC unroll 4
        for (int i = 0; i < MB; ++i) {
          acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + k), lo, acc[i][j]);
          acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + k + 8), hi, acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) c[i * ldc + j] = avx2::hsum(acc[i][j]);
}


// The same tiles with AVX-512F, on CPUs that have it (M <= 4): 16 lanes per decode and FMA. The
// decode was the bound at AVX2 width (see decode32); per 32 codes of e4m3 the common path takes
// two vpmovsxbd/shift/AND/multiply groups instead of four, and each row of x two FMAs instead of
// four. Codes in a block of 32 that are subnormal or NaN take decode32_special (AVX2, VEX-encoded:
// no transition penalty next to 512-bit code), the K tail decode16, as in gemv_tile. The same
// fp32 bound; the lane sums are added in a different order than gemv_tile's (and than the M = 5-16
// strips'). Measured on the 2-vCPU AMX Xeon VM (bf16 x, N = K = 4096, per-row scales, 2 threads,
// 1 GiB read before each call, median of 15, two runs, ms), AVX-512 vs AVX2 tiles: e4m3 M = 1
// 1.11-1.20 / 1.23-1.24, 2 1.27-1.28 / 1.38-1.41, 4 1.48-1.50 / 1.91-2.05; e5m2 M = 1 0.91-0.92 /
// 0.98-1.03, 4 1.27-1.28 / 1.46-1.49.
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
// GCC 12's own avx512fintrin.h trips these in _mm512_set1_* and casts (_mm512_undefined_*).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

LOWBIT_AVX512 inline __m512 join(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

// 32 codes -> two vectors of 16 fp32, in order, the exact values.
template <Format F>
LOWBIT_AVX512 inline __attribute__((always_inline)) void decode32_avx512(const uint8_t* p, __m512& v01, __m512& v23) {
  if constexpr (F == Format::E5M2) {
    // Codes to fp16 16 at a time with 256-bit integer ops (AVX512F has no 16-bit ones).
    const __m256i h0 = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 8);
    const __m256i h1 =
        _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))), 8);
    v01 = _mm512_cvtph_ps(h0);
    v23 = _mm512_cvtph_ps(h1);
    return;
  }
  if (__builtin_expect(!e4m3_normal_or_zero32(p), 0)) {
    __m256 v[4];
    decode32_special<F>(p, v);
    v01 = join(v[0], v[1]);
    v23 = join(v[2], v[3]);
    return;
  }
  // As in decode32: (sign-extended code) << 20, keep sign and exponent-mantissa, times 2^120.
  const __m512i keep = _mm512_set1_epi32(int(0x87f00000u));
  const __m512 two_pow_120 = _mm512_castsi512_ps(_mm512_set1_epi32((127 + 120) << 23));
  const __m512i t0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i t1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
  v01 = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(t0, 20), keep)), two_pow_120);
  v23 = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(t1, 20), keep)), two_pow_120);
}

template <Format F, int MB, int NB, bool BLOCK>
LOWBIT_AVX512 __attribute__((noinline)) void gemv_tile_avx512(const float* x, int64_t ldx, const uint8_t* w, int64_t K,
                                                              const float* bscale, int64_t ldb, float* c, int64_t ldc) {
  constexpr float kUnit = F == Format::E4M3 ? 256.0f : 1.0f;  // decode16's e4m3 values are / 256
  __m512 acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_set1_ps(-0.0f);  // see gemv_tile
  for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kFp8Block, ++kb) {
    __m512 m[NB];
    if constexpr (BLOCK)
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) m[j] = _mm512_set1_ps(bscale[j * ldb + kb]);
    const int64_t k1 = std::min(K, k0 + kFp8Block);
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      if ((k & 63) == 0)
#pragma GCC unroll 16
        for (int j = 0; j < NB; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(w + (cpu::kPrefetchTilesAhead * NB + j) * K + k), _MM_HINT_T0);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        __m512 v01, v23;
        decode32_avx512<F>(w + j * K + k, v01, v23);
        if constexpr (BLOCK) {
          v01 = _mm512_mul_ps(v01, m[j]);
          v23 = _mm512_mul_ps(v23, m[j]);
        }
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          acc[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k), v01, acc[i][j]);
          acc[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k + 16), v23, acc[i][j]);
        }
      }
    }
    for (; k < k1; k += 16) {
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        __m256 lo, hi;
        decode16<F>(load_codes(w + j * K + k, k1 - k), lo, hi);
        __m512 v = join(lo, hi);
        if constexpr (F == Format::E4M3) v = _mm512_mul_ps(v, _mm512_set1_ps(kUnit));  // exact
        if constexpr (BLOCK) v = _mm512_mul_ps(v, m[j]);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k), v, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const __m512 a = acc[i][j];
      const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
      c[i * ldc + j] = avx2::hsum(h);
    }
}

#pragma GCC diagnostic pop

// NB weight rows at a time through the AVX2 (gemv_tile) or AVX-512 (gemv_tile_avx512) tiles, both
// noinline: this loop needs no target of its own.
template <Format F, int MB, bool BLOCK, bool kAvx512>
void gemv_rows(const float* x, int64_t ldx, const uint8_t* w, int64_t K, int64_t rows, const float* bscale,
               int64_t ldb, float* c, int64_t ldc) {
  auto tile = [&](auto nb, int64_t j) {
    constexpr int NB = decltype(nb)::value;
    const float* bs = BLOCK ? bscale + j * ldb : nullptr;
    if constexpr (kAvx512)
      gemv_tile_avx512<F, MB, NB, BLOCK>(x, ldx, w + j * K, K, bs, ldb, c + j, ldc);
    else
      gemv_tile<F, MB, NB, BLOCK>(x, ldx, w + j * K, K, bs, ldb, c + j, ldc);
  };
  constexpr int NB = gemv_nb<MB>();
  int64_t j = 0;
  for (; j + NB <= rows; j += NB) tile(std::integral_constant<int, NB>{}, j);
  for (; j < rows; ++j) tile(std::integral_constant<int, 1>{}, j);
}

// M in 5..16: decoding each weight again per group of 4 rows of x cost more than the FMAs, so a
// strip of kStripRows weight rows is decoded once per kStripK codes into an L1-resident fp32
// buffer (with the x rows it meets, ~24 KiB) and every row of x runs over it. Per (x row, weight
// row) the 8 lane sums are kept in memory between chunks: the FMAs happen in the same order, on
// the same values, as in gemv_tile, so both paths give the same bits.
constexpr int64_t kStripRows = 6;
constexpr int64_t kStripK = 256;  // a multiple of the 128-code scale blocks

template <int MB, int NB>
LOWBIT_AVX2 __attribute__((noinline)) void strip_tile(const float* x, int64_t ldx, const float* wbuf, int64_t kc,
                                                      float* lanes) {
  // lanes: [MB][kStripRows][8] floats of this tile's (x row, weight row) sums.
  __m256 acc[MB][NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_loadu_ps(lanes + (i * kStripRows + j) * 8);
  for (int64_t k = 0; k < kc; k += 8) {
    __m256 wv[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) wv[j] = _mm256_load_ps(wbuf + j * kStripK + k);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) _mm256_storeu_ps(lanes + (i * kStripRows + j) * 8, acc[i][j]);
}

// c[m, j] for all M rows of x and weight rows [0, rows) (rows <= kStripRows) of w.
template <Format F, bool BLOCK>
LOWBIT_AVX2 void gemv_strip_avx2(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, int64_t rows,
                                 const float* bscale, int64_t ldb, float* c, int64_t ldc) {
  constexpr float kUnit = F == Format::E4M3 ? 256.0f : 1.0f;  // decode16's e4m3 values are / 256
  alignas(32) float wbuf[kStripRows * kStripK];
  std::vector<float> lanes(M * kStripRows * 8, -0.0f);  // -0: see gemv_tile
  for (int64_t k0 = 0; k0 < K; k0 += kStripK) {
    const int64_t k1 = std::min(K, k0 + kStripK), kc = round_up(k1 - k0, 16);
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* wr = w + r * K;
      float* dst = wbuf + r * kStripK;
      for (int64_t kb0 = k0; kb0 < k1; kb0 += kFp8Block) {
        const int64_t kb1 = std::min(k1, kb0 + kFp8Block);
        const __m256 m = _mm256_set1_ps(BLOCK ? bscale[r * ldb + kb0 / kFp8Block] : 1.0f);
        int64_t k = kb0;
        for (; k + 32 <= kb1; k += 32) {
          __m256 v[4];
          decode32<F>(wr + k, v);
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) _mm256_store_ps(dst + (k - k0) + 8 * q, BLOCK ? _mm256_mul_ps(v[q], m) : v[q]);
        }
        for (; k < kb1; k += 16) {
          __m256 lo, hi;
          decode16<F>(load_codes(wr + k, kb1 - k), lo, hi);
          if constexpr (F == Format::E4M3) {
            lo = _mm256_mul_ps(lo, _mm256_set1_ps(kUnit));
            hi = _mm256_mul_ps(hi, _mm256_set1_ps(kUnit));
          }
          _mm256_store_ps(dst + (k - k0), BLOCK ? _mm256_mul_ps(lo, m) : lo);
          _mm256_store_ps(dst + (k - k0) + 8, BLOCK ? _mm256_mul_ps(hi, m) : hi);
        }
      }
    }
    for (int64_t i = 0; i < M; i += 4) {
      const int64_t mb = std::min<int64_t>(4, M - i);
      for (int64_t j = 0; j < rows;) {
        const float* xi = x + i * ldx + k0;
        const float* wj = wbuf + j * kStripK;
        float* li = lanes.data() + (i * kStripRows + j) * 8;
        if (rows - j >= 3) {
          switch (mb) {
            case 4: strip_tile<4, 3>(xi, ldx, wj, kc, li); break;
            case 3: strip_tile<3, 3>(xi, ldx, wj, kc, li); break;
            case 2: strip_tile<2, 3>(xi, ldx, wj, kc, li); break;
            default: strip_tile<1, 3>(xi, ldx, wj, kc, li); break;
          }
          j += 3;
        } else {
          switch (mb) {
            case 4: strip_tile<4, 1>(xi, ldx, wj, kc, li); break;
            case 3: strip_tile<3, 1>(xi, ldx, wj, kc, li); break;
            case 2: strip_tile<2, 1>(xi, ldx, wj, kc, li); break;
            default: strip_tile<1, 1>(xi, ldx, wj, kc, li); break;
          }
          j += 1;
        }
      }
    }
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < rows; ++j)
      c[i * ldc + j] = avx2::hsum(_mm256_loadu_ps(lanes.data() + (i * kStripRows + j) * 8));
}

template <Format F, bool BLOCK>
LOWBIT_AVX2 void gemv_block_avx2(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, int64_t n0,
                                 int64_t n1, const float* bscale, int64_t ldb, float* c, int64_t ldc) {
  // Block scales are per 128 weight rows; the pointer per row keeps the tiles oblivious to that.
  std::vector<float> rows_scale;
  if (BLOCK) {
    rows_scale.resize((n1 - n0) * ldb);
    for (int64_t n = n0; n < n1; ++n)
      std::memcpy(&rows_scale[(n - n0) * ldb], bscale + (n / kFp8Block) * ldb, sizeof(float) * ldb);
  }
  const float* rs = BLOCK ? rows_scale.data() : nullptr;
  if (M > 4) {
    for (int64_t n = n0; n < n1; n += kStripRows)
      gemv_strip_avx2<F, BLOCK>(x, ldx, M, w + n * K, K, std::min(kStripRows, n1 - n),
                                BLOCK ? rs + (n - n0) * ldb : nullptr, ldb, c + (n - n0), ldc);
    return;
  }
  for (int64_t m = 0; m < M;) {
    const int64_t mb = std::min<int64_t>(4, M - m);
    const float* xm = x + m * ldx;
    const uint8_t* wn = w + n0 * K;
    float* cm = c + m * ldc;
    auto rows = [&](auto wide) {
      constexpr bool W = decltype(wide)::value;
      switch (mb) {
        case 4: gemv_rows<F, 4, BLOCK, W>(xm, ldx, wn, K, n1 - n0, rs, ldb, cm, ldc); break;
        case 3: gemv_rows<F, 3, BLOCK, W>(xm, ldx, wn, K, n1 - n0, rs, ldb, cm, ldc); break;
        case 2: gemv_rows<F, 2, BLOCK, W>(xm, ldx, wn, K, n1 - n0, rs, ldb, cm, ldc); break;
        default: gemv_rows<F, 1, BLOCK, W>(xm, ldx, wn, K, n1 - n0, rs, ldb, cm, ldc); break;
      }
    };
    if (cpu::has_avx512f())
      rows(std::true_type{});
    else
      rows(std::false_type{});
    m += mb;
  }
}
#endif  // LOWBIT_HAVE_AVX2_KERNELS

void gemv_block_scalar(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t K, int64_t n0, int64_t n1,
                       Format f, const float* bscale, int64_t ldb, float* c, int64_t ldc) {
  std::vector<float> row(K);
  for (int64_t n = n0; n < n1; ++n) {
    decode_row(w + n * K, K, f, bscale != nullptr ? bscale + (n / kFp8Block) * ldb : nullptr, row.data(), false);
    for (int64_t m = 0; m < M; ++m) {
      float s = -0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * row[k];
      c[m * ldc + (n - n0)] = s;
    }
  }
}

// out = epilogue(x32 @ (decode(w) [* block scales]).T). x32: fp32 [M, K] contiguous.
// wscale: the weight's 128x128 block scales [ceil(N/128), ceil(K/128)], or null.
void fp8_gemm(const at::Tensor& x32, const at::Tensor& w, const float* wscale, const Epilogue& e) {
  const int64_t M = x32.size(0), K = x32.size(1), N = w.size(0), kb = cdiv(K, kFp8Block);
  const Format f = format_of(w.scalar_type());
  const uint8_t* wp = static_cast<const uint8_t*>(w.const_data_ptr());
  const bool avx = cpu::has_avx2();

  if (M > kGemvMaxM) {
    at::Tensor wblock = at::empty({std::min(N, kDecodeRows), K}, x32.options());
    float* wb = wblock.data_ptr<float>();
    for (int64_t n0 = 0; n0 < N; n0 += kDecodeRows) {
      const int64_t rows = std::min(kDecodeRows, N - n0);
      at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = n0 + r;
          decode_row(wp + n * K, K, f, wscale != nullptr ? wscale + (n / kFp8Block) * kb : nullptr, wb + r * K, avx);
        }
      });
      const at::Tensor acc = at::mm(x32, wblock.narrow(0, 0, rows).t());  // [M, rows], contiguous
      const float* ap = acc.const_data_ptr<float>();
      at::parallel_for(0, M, row_grain(rows), [&](int64_t m0, int64_t m1) {
        apply_epilogue(e, ap + m0 * rows, rows, m0, m1, n0, n0 + rows);
      });
    }
    return;
  }

  // x rows padded (with -0) to a multiple of 16: the tiles read whole vectors without a tail on x.
  const int64_t K16 = round_up(K, 16);
  at::Tensor xp_t = at::full({M, K16}, -0.0, x32.options());
  xp_t.narrow(1, 0, K).copy_(x32);
  const float* xp = xp_t.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (M * K * kGemvCols));
  at::parallel_for(0, cdiv(N, kGemvCols), grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(M * kGemvCols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kGemvCols, n1 = std::min(N, n0 + kGemvCols);
#if LOWBIT_HAVE_AVX2_KERNELS
      if (avx) {
        if (f == Format::E4M3)
          wscale ? gemv_block_avx2<Format::E4M3, true>(xp, K16, M, wp, K, n0, n1, wscale, kb, acc.data(), kGemvCols)
                 : gemv_block_avx2<Format::E4M3, false>(xp, K16, M, wp, K, n0, n1, wscale, kb, acc.data(), kGemvCols);
        else
          wscale ? gemv_block_avx2<Format::E5M2, true>(xp, K16, M, wp, K, n0, n1, wscale, kb, acc.data(), kGemvCols)
                 : gemv_block_avx2<Format::E5M2, false>(xp, K16, M, wp, K, n0, n1, wscale, kb, acc.data(), kGemvCols);
      } else
#endif
        gemv_block_scalar(xp, K16, M, wp, K, n0, n1, f, wscale, kb, acc.data(), kGemvCols);
      apply_epilogue(e, acc.data(), kGemvCols, 0, M, n0, n1);
    }
  });
}

#if LOWBIT_HAVE_AVX2_KERNELS
// out = epilogue(x @ decode(w).T) on AMX-BF16 tiles (cpu::amx_weight_gemm), for bf16 x: every fp8
// value (e4m3 and e5m2, subnormals included) is exactly a normal bf16, so the products are exact
// in fp32 and accumulate in fp32 as the reference's, and the epilogue is the usual one: the fp32
// bound holds (AMX counts subnormal bf16 activations, below 1.2e-38, as zero; fp8 activations
// widened to bf16 have none). Per 32 codes: zero-extended to words, two vpermi2w look the low 7
// bits up in a 128-entry bf16 table (which of the two by bit 6), bit 7 becomes the sign.
LOWBIT_AMX_CODE_BEGIN
void fp8_amx(const at::Tensor& x, const uint8_t* w, int64_t N, int64_t K, Format f, const Epilogue& e) {
  alignas(64) uint16_t bf16_of_code[128];  // |value| of codes 0..127 as bf16 bits (exact: <= 3 mantissa bits)
  const std::array<float, 256>& values = decode_table(f);
  for (int c = 0; c < 128; ++c) {
    uint32_t bits;
    std::memcpy(&bits, &values[c], sizeof bits);
    bf16_of_code[c] = static_cast<uint16_t>(bits >> 16);
  }
  const __m512i t0 = _mm512_load_si512(bf16_of_code), t1 = _mm512_load_si512(bf16_of_code + 32);
  const __m512i t2 = _mm512_load_si512(bf16_of_code + 64), t3 = _mm512_load_si512(bf16_of_code + 96);
  const __m512i bit6 = _mm512_set1_epi16(0x40), sign = _mm512_set1_epi16(static_cast<int16_t>(0x8000));
  auto look_up = [&](__m256i v) {
    const __m512i codes = _mm512_cvtepu8_epi16(v);
    const __m512i low = _mm512_permutex2var_epi16(t0, codes, t1);   // codes & 63 from entries 0..63
    const __m512i high = _mm512_permutex2var_epi16(t2, codes, t3);  // ... from entries 64..127
    const __m512i mag = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(codes, bit6), low, high);
    return _mm512_or_si512(mag, _mm512_and_si512(_mm512_slli_epi16(codes, 8), sign));
  };
  cpu::amx_byte_weight_gemm(x, w, N, K, look_up, [&](const float* acc, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    apply_epilogue(e, acc, cpu::kAmxRows, m0, m1, n0, n1);
  });
}
LOWBIT_AMX_CODE_END
#endif

// Whether M rows take fp8_amx (bf16 activations, or fp8 ones widened to bf16; no 128x128 block
// scales, which would multiply into the weights before the product).
bool use_fp8_amx(int64_t M, bool block) {
#if LOWBIT_HAVE_AVX2_KERNELS
  return !block && cpu::use_amx_bf16(M, kFp8AmxMinM, kFp8AmxMaxM, "LOWBIT_FP8_AMX");
#else
  (void)M, (void)block;
  return false;
#endif
}

// A scalar-or-vector scale as a contiguous fp32 vector of `length`.
at::Tensor as_vector(const at::Tensor& s, int64_t length) {
  at::Tensor f = s.reshape({-1});
  if (f.numel() != length) f = f.expand({length});
  return f.contiguous();
}

at::Tensor fp8_scaled_mm_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale_a,
                             const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                             std::optional<c10::ScalarType> out_dtype_arg) {
  bool block = false;
  const c10::ScalarType out_dtype =
      check_fp8_scaled_mm("fp8_scaled_mm", a_in, b_in, scale_a, scale_b, bias, out_dtype_arg, &block);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1), kb = cdiv(K, kFp8Block);
  const bool avx = cpu::has_avx2();
  // A is small next to B for the shapes that matter: decode it once to fp32, scaled per block.
  const at::Tensor sa = block ? scale_a.contiguous() : as_vector(scale_a, M);
  const at::Tensor sb = block ? scale_b.contiguous() : as_vector(scale_b, N);
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  const Epilogue e{out_dtype, out.data_ptr(), N, block ? nullptr : sa.const_data_ptr<float>(),
                   block ? nullptr : sb.const_data_ptr<float>(), bias32.defined() ? bias32.const_data_ptr<float>() : nullptr};
#if LOWBIT_HAVE_AVX2_KERNELS
  if (use_fp8_amx(M, block)) {
    fp8_amx(a.to(at::kBFloat16), static_cast<const uint8_t*>(b.const_data_ptr()), N, K, format_of(b.scalar_type()), e);
    return out;
  }
#endif
  at::Tensor x32 = at::empty({M, K}, a.options().dtype(at::kFloat));
  {
    const uint8_t* ap = static_cast<const uint8_t*>(a.const_data_ptr());
    float* xp = x32.data_ptr<float>();
    const float* sap = sa.const_data_ptr<float>();
    const Format fa = format_of(a.scalar_type());
    at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) decode_row(ap + m * K, K, fa, block ? sap + m * kb : nullptr, xp + m * K, avx);
    });
  }
  fp8_gemm(x32, b, block ? sb.const_data_ptr<float>() : nullptr, e);
  return out;
}

at::Tensor fp8_weight_only_mm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias) {
  check_fp8_weight_only_mm("fp8_weight_only_mm", x_in, w_in, scale, bias);
  const at::Tensor w = w_in.contiguous();
  const int64_t M = x_in.size(0), N = w.size(0);
  // 2-D scales are 128x128 blocks, except that [1, 1] with N, K <= 128 means the same as a scalar.
  const bool block = scale.dim() == 2;
  const at::Tensor s = block ? scale.contiguous() : as_vector(scale, N);
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x_in.options());
  const Epilogue e{x_in.scalar_type(), out.data_ptr(), N, nullptr, block ? nullptr : s.const_data_ptr<float>(),
                   bias32.defined() ? bias32.const_data_ptr<float>() : nullptr};
#if LOWBIT_HAVE_AVX2_KERNELS
  if (x_in.scalar_type() == at::kBFloat16 && use_fp8_amx(M, block)) {
    fp8_amx(x_in, static_cast<const uint8_t*>(w.const_data_ptr()), N, w.size(1), format_of(w.scalar_type()), e);
    return out;
  }
#endif
  fp8_gemm(x_in.to(at::kFloat).contiguous(), w, block ? s.const_data_ptr<float>() : nullptr, e);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("fp8_quantize_dynamic", &fp8_quantize_dynamic_cpu);
  m.impl("fp8_quantize_static", &fp8_quantize_static_cpu);
  m.impl("fp8_scaled_mm", &fp8_scaled_mm_cpu);
  m.impl("fp8_weight_only_mm", &fp8_weight_only_mm_cpu);
}

}  // namespace lowbit
