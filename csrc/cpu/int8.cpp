// INT8 family, CPU kernels: quantize (dynamic / static), int8 x int8 GEMM (raw int32 and with a
// fused scale/bias epilogue) and int8-weight-only GEMM with float activations.
// Semantics: lowbit/backends/reference/int8.py. Integer results are exact; quantization is bit
// exact (true IEEE division, round half to even); float epilogues round op by op like the
// reference.
//
// Two code paths, chosen at runtime (lowbit/cpu/isa.h): AVX2/FMA/F16C kernels (LOWBIT_AVX2
// functions) and portable scalar loops. The host functions (checks, allocation, threading with
// at::parallel_for) are baseline code shared by both.
//
// Why vpmaddwd (int16 x int16 -> int32, adjacent pairs summed): it is exact for every int8
// input, -128 included. vpmaddubsw (u8 x s8) would do twice the products per instruction but
// saturates its int16 pair sums (255 * 127 * 2 > 32767); making it exact (|a| against
// vpsignb(b, a), valid when b has no -128) costs a vpsignb and a widening vpmaddwd per
// vpmaddubsw, no fewer operations per product. AVX-VNNI is absent on Zen 3. So
// both operands are sign-extended to int16 and each 16 multiply-adds cost one vpmaddwd + one
// vpaddd; with K <= 131071 (checked) the int32 accumulators cannot overflow.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lowbit/checks.h"
#include "lowbit/cpu/amx.h"
#include "lowbit/cpu/decoded_gemm.h"
#include "lowbit/cpu/isa.h"
#include "lowbit/cpu/vec_avx2.h"

namespace lowbit {
namespace {

using c10::BFloat16;
using c10::Half;

constexpr float kQmax = 127.0f;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Calls f(T{}) with T the C++ type of a float dtype (checks have restricted it to these three).
template <typename F>
void dispatch_float(c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: f(float{}); return;
    case c10::ScalarType::Half: f(Half{}); return;
    case c10::ScalarType::BFloat16: f(BFloat16{}); return;
    default: TORCH_CHECK(false, "lowbit: unexpected dtype ", c10::toString(t));
  }
}

// ============================================================================ quantization
// scale = amax / 127 in fp32 (1.0 when amax == 0, and when amax is NaN, as torch.where(amax > 0)
// gives), q = clamp(rne(x / scale), -127, 127). NaN quantizes to 0, as torch's float->int8 cast.
inline float scale_from_amax(float amax) { return amax > 0.0f ? amax / kQmax : 1.0f; }

inline int8_t quantize_one(float v, float scale) {
  float r = std::nearbyint(v / scale);  // the default FP environment rounds half to even
  if (std::isnan(r)) return 0;
  r = std::min(std::max(r, -kQmax), kQmax);
  return static_cast<int8_t>(static_cast<int>(r));
}

// max |x| that propagates NaN, as torch.amax does.
inline float nan_max(float a, float b) { return (std::isnan(a) || std::isnan(b)) ? NAN : std::max(a, b); }

template <typename T>
float amax_scalar(const T* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = nan_max(m, std::fabs(static_cast<float>(x[i])));
  return m;
}

template <typename T>
void quantize_row_scalar(const T* x, int64_t n, float scale, int8_t* q) {
  for (int64_t i = 0; i < n; ++i) q[i] = quantize_one(static_cast<float>(x[i]), scale);
}

#if LOWBIT_HAVE_AVX2_KERNELS
namespace avx2 = cpu::avx2;

template <typename T>
LOWBIT_AVX2 float amax_avx2(const T* x, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // Two running maxima hide the max latency; vmaxps drops NaN, so NaN is tracked on the side.
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_and_ps(avx2::load8(x + i), abs_mask);
    const __m256 b = _mm256_and_ps(avx2::load8(x + i + 8), abs_mask);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
  }
  float m = avx2::hmax(_mm256_max_ps(m0, m1));
  if (_mm256_movemask_ps(nan) != 0) m = NAN;
  for (; i < n; ++i) m = nan_max(m, std::fabs(static_cast<float>(x[i])));
  return m;
}

// Eight lanes of quantize_one. vdivps and vroundps(nearest) are the IEEE operations torch uses,
// so the result is bit identical; the clamp happens in float, where it is exact.
LOWBIT_AVX2_INLINE __m256i quantize8(__m256 v, __m256 scale) {
  __m256 r = _mm256_round_ps(_mm256_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));  // NaN -> 0
  r = _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-kQmax)), _mm256_set1_ps(kQmax));
  return _mm256_cvtps_epi32(r);
}

template <typename T>
LOWBIT_AVX2 void quantize_row_avx2(const T* x, int64_t n, float scale, int8_t* q) {
  const __m256 s = _mm256_set1_ps(scale);
  // packs works within 128-bit lanes; this permutation puts the 4-byte groups back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i q01 = _mm256_packs_epi32(quantize8(avx2::load8(x + i), s), quantize8(avx2::load8(x + i + 8), s));
    const __m256i q23 =
        _mm256_packs_epi32(quantize8(avx2::load8(x + i + 16), s), quantize8(avx2::load8(x + i + 24), s));
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q01, q23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), bytes);
  }
  for (; i < n; ++i) q[i] = quantize_one(static_cast<float>(x[i]), scale);
}
#endif  // LOWBIT_HAVE_AVX2_KERNELS

template <typename T>
float amax_row(const T* x, int64_t n, bool avx) {
#if LOWBIT_HAVE_AVX2_KERNELS
  if (avx) return amax_avx2(x, n);
#endif
  return amax_scalar(x, n);
}

template <typename T>
void quantize_row(const T* x, int64_t n, float scale, int8_t* q, bool avx) {
#if LOWBIT_HAVE_AVX2_KERNELS
  if (avx) return quantize_row_avx2(x, n, scale, q);
#endif
  quantize_row_scalar(x, n, scale, q);
}

// Rows per task for the streaming passes (quantize, widen, pack): ~512K elements, so that only
// work of ~0.1 ms or more forks. On a loaded machine a fork can wait a scheduler time slice for
// the second thread, which would dwarf a small activation's quantization.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, (int64_t(1) << 19) / K); }

std::tuple<at::Tensor, at::Tensor> int8_quantize_dynamic_cpu(const at::Tensor& x_in, bool per_row) {
  check_int8_quantize_dynamic("int8_quantize_dynamic", x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1);
  const int64_t rows = x.numel() / K;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = per_row ? at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat))
                             : at::empty({}, x.options().dtype(at::kFloat));
  const bool avx = cpu::has_avx2();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    if (per_row) {
      // One fused pass per row: the row is still in L1 when it is quantized after its amax.
      at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          sp[r] = scale_from_amax(amax_row(xp + r * K, K, avx));
          quantize_row(xp + r * K, K, sp[r], qp + r * K, avx);
        }
      });
      return;
    }
    const float amax = at::parallel_reduce(
        0, rows, row_grain(K), 0.0f,
        [&](int64_t r0, int64_t r1, float m) {
          for (int64_t r = r0; r < r1; ++r) m = nan_max(m, amax_row(xp + r * K, K, avx));
          return m;
        },
        nan_max);
    const float s = scale_from_amax(amax);
    *sp = s;
    at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * K, K, s, qp + r * K, avx);
    });
  });
  return {q, scale};
}

at::Tensor int8_quantize_static_cpu(const at::Tensor& x_in, const at::Tensor& scale_in) {
  check_int8_quantize_static("int8_quantize_static", x_in, scale_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const int64_t K = x.size(-1);
  const int64_t rows = x.numel() / K;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  const bool avx = cpu::has_avx2();
  const bool per_row = scale.numel() != 1;  // a single scale, whatever its shape, serves every row
  const float* sp = scale.const_data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    at::parallel_for(0, rows, row_grain(K), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) quantize_row(xp + r * K, K, sp[per_row ? r : 0], qp + r * K, avx);
    });
  });
  return q;
}

// ============================================================================ GEMM epilogue
// Turns a block of accumulators into output rows:
//   int32 out (int8_mm): copy;
//   float out: y = acc [* scale_a[m]] * scale_b[n] [+ bias[n]], rounded op by op in fp32 (the
//   reference's order), then converted to the output dtype.
struct GemmEpilogue {
  c10::ScalarType out_dtype;
  void* out;
  int64_t ldo;
  const float* scale_a;  // [M], or nullptr (int8_weight_only_mm has no row scale)
  const float* scale_b;  // [N]
  const float* bias;     // [N], or nullptr
};

template <typename AccT>
inline float epilogue_one(AccT acc, const float* sa, float sb, const float* bias) {
  float y = static_cast<float>(acc);
  if (sa != nullptr) y = y * *sa;
  y = y * sb;
  cpu::fp_barrier(y);
  if (bias != nullptr) y = y + *bias;
  return y;
}

template <typename AccT, typename OutT>
void epilogue_row_scalar(const AccT* acc, int64_t n, const float* sa, const float* sb, const float* bias,
                         OutT* out) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<OutT>(epilogue_one(acc[j], sa, sb[j], bias != nullptr ? bias + j : nullptr));
}

#if LOWBIT_HAVE_AVX2_KERNELS
LOWBIT_AVX2_INLINE __m256 load_acc8(const int32_t* p) {
  return _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LOWBIT_AVX2_INLINE __m256 load_acc8(const float* p) { return _mm256_loadu_ps(p); }

template <typename AccT, typename OutT>
LOWBIT_AVX2 void epilogue_row_avx2(const AccT* acc, int64_t n, const float* sa, const float* sb, const float* bias,
                                   OutT* out) {
  const __m256 vsa = _mm256_set1_ps(sa != nullptr ? *sa : 1.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 y = load_acc8(acc + j);
    if (sa != nullptr) y = _mm256_mul_ps(y, vsa);
    y = avx2::fp_barrier(_mm256_mul_ps(y, _mm256_loadu_ps(sb + j)));
    if (bias != nullptr) y = _mm256_add_ps(y, _mm256_loadu_ps(bias + j));
    avx2::store8(out + j, y);
  }
  for (; j < n; ++j)
    out[j] = static_cast<OutT>(epilogue_one(acc[j], sa, sb[j], bias != nullptr ? bias + j : nullptr));
}
#endif

// acc points at element (m0, n0) of a block with leading dimension ld.
template <typename AccT>
void apply_epilogue(const GemmEpilogue& e, const AccT* acc, int64_t ld, int64_t m0, int64_t m1, int64_t n0,
                    int64_t n1, bool avx) {
  const int64_t n = n1 - n0;
  if constexpr (std::is_same_v<AccT, int32_t>) {
    if (e.out_dtype == c10::ScalarType::Int) {
      for (int64_t m = m0; m < m1; ++m)
        std::memcpy(static_cast<int32_t*>(e.out) + m * e.ldo + n0, acc + (m - m0) * ld, n * sizeof(int32_t));
      return;
    }
  }
  dispatch_float(e.out_dtype, [&](auto tag) {
    using OutT = decltype(tag);
    for (int64_t m = m0; m < m1; ++m) {
      const AccT* a = acc + (m - m0) * ld;
      const float* sa = e.scale_a != nullptr ? e.scale_a + m : nullptr;
      const float* bias = e.bias != nullptr ? e.bias + n0 : nullptr;
      OutT* out = static_cast<OutT*>(e.out) + m * e.ldo + n0;
#if LOWBIT_HAVE_AVX2_KERNELS
      if (avx) {
        epilogue_row_avx2(a, n, sa, e.scale_b + n0, bias, out);
        continue;
      }
#endif
      epilogue_row_scalar(a, n, sa, e.scale_b + n0, bias, out);
    }
  });
}

// ============================================================================ int8 x int8 GEMM
// Regimes (AVX2):
// * M <= kDotMaxM, "dot" tiles: rows of B are read once (from memory at small M, where that is
//   the bound) and widened in registers; a 12-row block of B stays in L1/L2 while every group of
//   up to 4 rows of A (widened to int16 once) passes over it. Each register tile holds MB rows
//   of A x NB rows of B as int32x8 partial dot products, reduced horizontally at the end.
// * larger M, packed panels: B is packed into int16 panels (kKC x 16, L1 resident) once per
//   block and reused by every 6-row panel of A (packed once, streamed from L2); the 6x16 tile
//   keeps 12 int32x8 accumulators in registers, with no horizontal reduction.
// Both run at the same ~70 GMAC/s per Zen 3 core (the vpmaddwd + vpaddd pair per 16 MACs is
// the bound); measured on N = K = 4096 the dot tiles win up to M = 64, tie at 128 and 256, and
// the packed path avoids re-streaming A from L3 for every 12 rows of B as M grows.
constexpr int64_t kDotMaxM = 128;
constexpr int64_t kDotCols = 96;  // N columns per dot-path task (a multiple of every NB below)
constexpr int64_t kKC = 256;      // K depth of a packed panel: 256 x 16 int16 = 8 KiB of L1
constexpr int64_t kMC = 288;      // rows of A per block (multiple of kMR): 288 x 256 int16 = 144 KiB of L2
constexpr int64_t kNC = 128;      // columns per packed-path task (8 panels)
constexpr int kMR = 6;            // tile rows: 6 x 2 accumulators + 2 B + 1 A = 15 of 16 ymm

#if LOWBIT_HAVE_AVX2_KERNELS
// Writes round_up(K, 16) int16: the row sign-extended, then zeros.
LOWBIT_AVX2 void widen_row_avx2(const int8_t* a, int64_t K, int16_t* out) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k))));
  if (k < K)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                        _mm256_cvtepi8_epi16(avx2::load_partial_i8x16(a + k, K - k)));
}

// ---- small M: dot-product tiles
// Register allocation note: GCC keeps the accumulators in ymm registers only when they are a flat
// array indexed by constants inside a single loop (2-D arrays, helpers taking the array, or a
// second tail loop make it spill them every iteration). Hence one loop over whole 16-wide steps:
// A is zero-padded to K16 and B rows may be read up to K16 (see BRows), so no tail code.

// Rows of an int8 matrix [N, K] (B, or the weight) as the dot tiles read them: whole vectors up
// to a padded length Kp (round_up(K, 16) or round_up(K, 8)). Bytes past K belong to the next
// row and meet the other operand's zero padding, so they add nothing; only the last row could be
// read past the end of its allocation, so it is read from a zero-padded copy.
struct BRows {
  const int8_t* b;  // [N, K], contiguous
  int64_t K;
  int64_t N;
  const int8_t* last_row;  // row N-1 zero-padded to Kp, or nullptr when K == Kp
  int64_t safe_end() const { return last_row != nullptr ? N - 1 : N; }
};

// Owns the zero-padded copy of the last row for BRows.
struct PaddedLastRow {
  std::vector<int8_t> row;
  BRows rows(const int8_t* b, int64_t N, int64_t K, int64_t Kp) {
    if (K == Kp) return {b, K, N, nullptr};
    row.assign(Kp, 0);
    std::memcpy(row.data(), b + (N - 1) * K, K);
    return {b, K, N, row.data()};
  }
};

// The dot tiles prefetch the rows cpu::kPrefetchTilesAhead tiles ahead (at K = 4096 each row is
// a whole 4 KiB page). Against none (2 threads, N = K = 4096, 64 MiB read before each call,
// median of 100, five interleaved runs), ms: M = 1 weight-only fp32 1.06-1.27 -> 0.78-1.01, bf16
// 1.06-1.23 -> 0.76-0.96, W8A8 0.80-1.05 -> 0.64-0.75; M = 16 4-6% faster. Three tiles ahead
// measured the same as two, one tile mixed.

// c[i, j] = sum_k a[i, k] * b[j, k] for an MB x NB tile (lda = K16, ldb = row stride of b).
// Per 16-deep step: NB loads-and-widen of B, MB loads of A, MB*NB vpmaddwd + vpaddd; MB*NB
// accumulators + NB B vectors + 1 A vector fit the 16 ymm registers.
template <int MB, int NB>
LOWBIT_AVX2 __attribute__((noinline)) void int8_dot_tile_avx2(const int16_t* a, int64_t lda, const int8_t* b,
                                                              int64_t ldb, int64_t K16, int32_t* c, int64_t ldc) {
  __m256i acc[MB * NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB * NB; ++i) acc[i] = _mm256_setzero_si256();
  for (int64_t k = 0; k < K16; k += 16) {
    if ((k & 63) == 0)  // once per 64-byte line of each row
      for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(b + (j + cpu::kPrefetchTilesAhead * NB) * ldb + k), _MM_HINT_T0);
    __m256i bw[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j)
      bw[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + j * ldb + k)));
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i * lda + k));
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j)
        acc[i * NB + j] = _mm256_add_epi32(acc[i * NB + j], _mm256_madd_epi16(av, bw[j]));
    }
  }
  // Reducing from memory rather than registers keeps GCC from spilling acc inside the loop.
  alignas(32) int32_t lanes[MB * NB][8];
#pragma GCC unroll 16
  for (int t = 0; t < MB * NB; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[t]), acc[t]);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) c[i * ldc + j] = avx2::hsum(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes[i * NB + j])));
}

// Tile width per MB: MB*NB accumulators + NB widened B rows + 1 A vector within 16 ymm, and
// where GCC's allocator actually keeps them there (3x4 spills).
template <int MB>
constexpr int dot_nb() {
  return MB == 1 ? 6 : MB == 2 ? 4 : 3;
}

// One group of MB rows of A against rows [n0, n1) of B.
template <int MB>
LOWBIT_AVX2 void int8_dot_group_avx2(const int16_t* a, int64_t K16, const BRows& b, int64_t n0, int64_t n1,
                                     int32_t* c, int64_t ldc) {
  constexpr int NB = dot_nb<MB>();
  const int64_t end = std::min(n1, b.safe_end());
  int64_t n = n0;
  for (; n + NB <= end; n += NB) int8_dot_tile_avx2<MB, NB>(a, K16, b.b + n * b.K, b.K, K16, c + (n - n0), ldc);
  for (; n < end; ++n) int8_dot_tile_avx2<MB, 1>(a, K16, b.b + n * b.K, b.K, K16, c + (n - n0), ldc);
  if (end < n1) int8_dot_tile_avx2<MB, 1>(a, K16, b.last_row, K16, K16, c + (end - n0), ldc);
}

// c[m, n - n0] for all M rows of A and n in [n0, n1). B goes through in blocks of 12 rows
// (divisible by every NB) that stay in L1/L2 while each group of up to 4 A rows passes over them.
LOWBIT_AVX2 void int8_dot_block_avx2(const int16_t* a16, int64_t K16, int64_t M, const BRows& b, int64_t n0,
                                     int64_t n1, int32_t* c, int64_t ldc) {
  for (int64_t n = n0; n < n1; n += 12) {
    const int64_t nn = std::min<int64_t>(n + 12, n1);
    for (int64_t m = 0; m < M;) {
      const int64_t mb = std::min<int64_t>(4, M - m);
      const int16_t* am = a16 + m * K16;
      int32_t* cm = c + m * ldc + (n - n0);
      switch (mb) {
        case 4: int8_dot_group_avx2<4>(am, K16, b, n, nn, cm, ldc); break;
        case 3: int8_dot_group_avx2<3>(am, K16, b, n, nn, cm, ldc); break;
        case 2: int8_dot_group_avx2<2>(am, K16, b, n, nn, cm, ldc); break;
        default: int8_dot_group_avx2<1>(am, K16, b, n, nn, cm, ldc); break;
      }
      m += mb;
    }
  }
}

// ---- large M: packed panels
// Both operands are packed so that the tile reads each of them sequentially (six strided A rows
// stalled on L2 latency; a sequential stream is prefetched):
// * A panel q = rows 6q..6q+5, as [K16 / 2 pairs][6] int32, each int32 the (k = 2p, 2p+1) int16
//   pair of one row, ready for vpbroadcastd; rows past M are zero. Packed once per GEMM.
// * B panel = 16 rows x kc, as [pair][16 rows] int32 pairs = two aligned ymm per pair; rows past
//   N and k past kc are zero. Packed once per (task, K block) and reused by every A panel.
// Packing widens 16 k at a time per row, then an 8x8 transpose of 32-bit pairs turns rows into
// k-pair vectors.
LOWBIT_AVX2_INLINE __m256i widen16_or_zero(const int8_t* src, int64_t len) {
  if (len <= 0) return _mm256_setzero_si256();
  return _mm256_cvtepi8_epi16(len >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src))
                                        : avx2::load_partial_i8x16(src, len));
}

LOWBIT_AVX2 void pack_a_panel_avx2(const int8_t* a, int64_t K, int64_t rows, int64_t K16, int32_t* dst) {
  const __m256i first6 = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
  for (int64_t k = 0; k < K16; k += 16) {
    __m256i r[8];
    for (int i = 0; i < 8; ++i) r[i] = i < rows ? widen16_or_zero(a + i * K + k, K - k) : _mm256_setzero_si256();
    avx2::transpose8x8_epi32(r);
    for (int p = 0; p < 8; ++p) _mm256_maskstore_epi32(dst + (k / 2 + p) * kMR, first6, r[p]);
  }
}

LOWBIT_AVX2 void pack_b_panel_avx2(const int8_t* b, int64_t ldb, int64_t rows, int64_t kc, int16_t* panel) {
  for (int64_t k = 0; k < kc; k += 16) {
    int16_t* dst = panel + (k / 2) * 32;
    for (int half = 0; half < 2; ++half) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = half * 8 + i;
        r[i] = row < rows ? widen16_or_zero(b + row * ldb + k, kc - k) : _mm256_setzero_si256();
      }
      avx2::transpose8x8_epi32(r);
      for (int p = 0; p < 8; ++p) _mm256_store_si256(reinterpret_cast<__m256i*>(dst + p * 32 + half * 16), r[p]);
    }
  }
}

// c[0:6, 0:16] (+)= A panel . B panel over `pairs` k pairs. Per pair: 2 B loads, 6 broadcasts,
// 12 vpmaddwd + 12 vpaddd; 12 accumulators + 2 B + 1 A = 15 of the 16 ymm registers.
// noinline and the up-front load of earlier partial sums (rather than an add after the loop):
// otherwise GCC spills accumulators inside the loop.
template <bool kAccumulate>
LOWBIT_AVX2 __attribute__((noinline)) void int8_packed_tile_avx2(const int32_t* a, const int16_t* panel,
                                                                 int64_t pairs, int32_t* c, int64_t ldc) {
  __m256i acc[kMR][2];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) {
    for (int h = 0; h < 2; ++h)
      acc[i][h] = kAccumulate ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i * ldc + 8 * h))
                              : _mm256_setzero_si256();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 32 * p));
    const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(panel + 32 * p + 16));
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m256i ai = _mm256_set1_epi32(a[p * kMR + i]);
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(ai, b0));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(ai, b1));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + i * ldc + 8 * h), acc[i][h]);
}

// c[0:round_up(rows_m, 6), 0:round_up(cols, 16)] = A panels . b[0:cols, :K]^T.
// ap: the packed A panels of these rows (K16 / 2 * 6 int32 each); panel: kKC * 16 int16, aligned.
LOWBIT_AVX2 void int8_packed_block_avx2(const int32_t* ap, int64_t K16, int64_t rows_m, const int8_t* b, int64_t K,
                                        int64_t cols, int32_t* c, int64_t ldc, int16_t* panel) {
  const int64_t a_panel_stride = K16 / 2 * kMR;
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t pairs = ceil_div(std::min(kKC, K - k0), 2);
    for (int64_t n = 0; n < cols; n += 16) {
      pack_b_panel_avx2(b + n * K + k0, K, std::min<int64_t>(16, cols - n), std::min(kKC, K - k0), panel);
      for (int64_t m = 0; m < rows_m; m += kMR) {
        const int32_t* am = ap + (m / kMR) * a_panel_stride + (k0 / 2) * kMR;
        if (k0 == 0)
          int8_packed_tile_avx2<false>(am, panel, pairs, c + m * ldc + n, ldc);
        else
          int8_packed_tile_avx2<true>(am, panel, pairs, c + m * ldc + n, ldc);
      }
    }
  }
}
#endif  // LOWBIT_HAVE_AVX2_KERNELS

// A sign-extended to int16, each row zero-padded to K16 = round_up(K, 16): kernels read whole
// 16-wide vectors (and k pairs) without tail cases on A, and the zeros annihilate whatever the B
// tail holds.
void widen_rows_int16(const int8_t* a, int64_t M, int64_t K, int16_t* a16, int64_t K16) {
  const bool avx = cpu::has_avx2();
  at::parallel_for(0, M, row_grain(K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int16_t* out = a16 + m * K16;
#if LOWBIT_HAVE_AVX2_KERNELS
      if (avx) {
        widen_row_avx2(a + m * K, K, out);
        continue;
      }
#endif
      for (int64_t k = 0; k < K; ++k) out[k] = a[m * K + k];
      for (int64_t k = K; k < K16; ++k) out[k] = 0;
    }
  });
}

// Portable path: one row of B against every row of A at a time (B is read once; the compiler
// vectorizes the int32 dot product with baseline SSE2).
void int8_dot_block_scalar(const int8_t* a, int64_t M, const int8_t* b, int64_t K, int64_t n0, int64_t n1,
                           int32_t* c, int64_t ldc) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* bn = b + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* am = a + m * K;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int32_t(am[k]) * int32_t(bn[k]);
      c[m * ldc + (n - n0)] = s;
    }
  }
}

// out = epilogue(a @ b.T) for contiguous a [M, K], b [N, K].
void int8_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const GemmEpilogue& epi) {
  const bool avx = cpu::has_avx2();
  // Per-task work is at least ~1M multiply-adds, so a single small GEMM does not fork threads.
  const int64_t dot_grain = std::max<int64_t>(1, (int64_t(1) << 20) / (M * K * kDotCols));
  if (!avx) {
    at::parallel_for(0, ceil_div(N, kDotCols), dot_grain, [&](int64_t t0, int64_t t1) {
      std::vector<int32_t> acc(M * kDotCols);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kDotCols, n1 = std::min(N, n0 + kDotCols);
        int8_dot_block_scalar(a, M, b, K, n0, n1, acc.data(), kDotCols);
        apply_epilogue(epi, acc.data(), kDotCols, 0, M, n0, n1, false);
      }
    });
    return;
  }
#if LOWBIT_HAVE_AVX2_KERNELS
  const int64_t K16 = round_up(K, 16);
  if (M <= kDotMaxM) {
    std::vector<int16_t> a16(M * K16);
    widen_rows_int16(a, M, K, a16.data(), K16);
    PaddedLastRow last;
    const BRows brows = last.rows(b, N, K, K16);
    at::parallel_for(0, ceil_div(N, kDotCols), dot_grain, [&](int64_t t0, int64_t t1) {
      std::vector<int32_t> acc(M * kDotCols);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kDotCols, n1 = std::min(N, n0 + kDotCols);
        int8_dot_block_avx2(a16.data(), K16, M, brows, n0, n1, acc.data(), kDotCols);
        apply_epilogue(epi, acc.data(), kDotCols, 0, M, n0, n1, true);
      }
    });
    return;
  }

  const int64_t a_panels = ceil_div(M, kMR), a_panel_stride = K16 / 2 * kMR;
  std::vector<int32_t> ap(a_panels * a_panel_stride);
  at::parallel_for(0, a_panels, std::max<int64_t>(1, 4096 / K16), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      pack_a_panel_avx2(a + q * kMR * K, K, std::min<int64_t>(kMR, M - q * kMR), K16, ap.data() + q * a_panel_stride);
  });
  const int64_t m_blocks = ceil_div(M, kMC), n_blocks = ceil_div(N, kNC);
  // Consecutive tasks share an A block (row-major task order), which then stays in L2.
  at::parallel_for(0, m_blocks * n_blocks, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) int16_t panel[kKC * 16];
    std::vector<int32_t> acc(kMC * kNC);  // kMC is a multiple of kMR: whole tiles always fit
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / n_blocks) * kMC, m1 = std::min(M, m0 + kMC);
      const int64_t n0 = (t % n_blocks) * kNC, n1 = std::min(N, n0 + kNC);
      int8_packed_block_avx2(ap.data() + (m0 / kMR) * a_panel_stride, K16, m1 - m0, b + n0 * K, K, n1 - n0,
                             acc.data(), kNC, panel);
      apply_epilogue(epi, acc.data(), kNC, m0, m1, n0, n1, true);
    }
  });
#endif
}

// On CPUs with AMX-INT8, torch's own int8 GEMM (at::_int_mm, oneDNN's AMX tiles: exact int32
// like the kernels above) is faster from small M on, so W8A8 hands it the product there and
// applies its epilogue to the int32 result. Measured on a 2-vCPU AVX-512/AMX Xeon VM (N = K =
// 4096, 2 threads, cold, median of 30), lowbit AVX2 vs at::_int_mm, ms: M = 1 0.73 vs 1.44, 4 0.91
// vs 1.41, 8 1.49 vs 1.61, 12 1.96 vs 1.56, 16 2.85 vs 1.78, 64 9.1 vs 2.2, 256 29 vs 5.5. Without
// AMX (the Zen 3 machines the AVX2 kernels were tuned on) nothing changes. LOWBIT_INT8_ONEDNN: see
// cpu::use_onednn_int8.
constexpr int64_t kTorchIntMmMinM = 10;

bool use_torch_int_mm(int64_t M, int64_t N, int64_t K) { return cpu::use_onednn_int8(M, N, K, kTorchIntMmMinM); }

// epilogue(a @ b.T) from at::_int_mm's int32 product, one parallel pass over rows.
void epilogue_of_torch_int_mm(const at::Tensor& a, const at::Tensor& b, const GemmEpilogue& epi) {
  const at::Tensor acc = at::_int_mm(a, b.t());
  const int32_t* c = acc.const_data_ptr<int32_t>();
  const int64_t M = acc.size(0), N = acc.size(1);
  const bool avx = cpu::has_avx2();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t m0, int64_t m1) {
    apply_epilogue(epi, c + m0 * N, N, m0, m1, 0, N, avx);
  });
}

at::Tensor int8_mm_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_int8_mm("int8_mm", a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(at::kInt));
  if (use_torch_int_mm(M, N, K)) return at::_int_mm_out(out, a, b.t());
  const GemmEpilogue epi{c10::ScalarType::Int, out.data_ptr(), N, nullptr, nullptr, nullptr};
  int8_gemm(a.const_data_ptr<int8_t>(), b.const_data_ptr<int8_t>(), M, N, K, epi);
  return out;
}

// A scale that is a scalar or one value per row, as a contiguous fp32 vector of `length`.
at::Tensor as_float_vector(const at::Tensor& s, int64_t length) {
  at::Tensor f = s.to(at::kFloat).reshape({-1});
  if (f.numel() != length) f = f.expand({length});
  return f.contiguous();
}

at::Tensor int8_scaled_mm_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale_a,
                              const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                              std::optional<c10::ScalarType> out_dtype_arg) {
  const c10::ScalarType out_dtype =
      check_int8_scaled_mm("int8_scaled_mm", a_in, b_in, scale_a, scale_b, bias, out_dtype_arg);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  const at::Tensor sa = as_float_vector(scale_a, M), sb = as_float_vector(scale_b, N);
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, a.options().dtype(out_dtype));
  const GemmEpilogue epi{out_dtype, out.data_ptr(), N, sa.const_data_ptr<float>(), sb.const_data_ptr<float>(),
                         bias32.defined() ? bias32.const_data_ptr<float>() : nullptr};
  if (use_torch_int_mm(M, N, K))
    epilogue_of_torch_int_mm(a, b, epi);
  else
    int8_gemm(a.const_data_ptr<int8_t>(), b.const_data_ptr<int8_t>(), M, N, K, epi);
  return out;
}

#if LOWBIT_HAVE_AVX2_KERNELS
// n int8 values -> fp32 (exact), 16 at a time.
LOWBIT_AVX2 void int8_to_fp32_avx2(const int8_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)));
    _mm256_storeu_ps(dst + i + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
#endif

// ============================================================================ weight-only GEMM
// out = (x @ w.T) * scale + bias with fp32 accumulation.
// * M < kWoGemmMinM, dot tiles (bound by reading w at small M): each block of 12 weight rows
//   is widened int8 -> int32 -> fp32 in registers and FMA'd against every group of up to 4 rows
//   of x (converted to fp32 once); the scale is applied once per output. Measured faster than
//   the packed path below up to M = 64 on N = K = 4096.
// * large M: bound by FLOPs. The int8 GEMM's packed blocking with an fp32 FMA tile: weight
//   panels are converted to fp32 (exact, unscaled) while packed, so the full weight is never
//   materialized in fp32, and the whole GEMM is one parallel region. (Converting blocks and
//   calling at::mm was slower on 2 shared cores: three fork/joins per block, and at::mm may not
//   run inside at::parallel_for because ATen turns off MKL's dynamic threading.)
constexpr int64_t kWoGemmMinM = 96;
// bf16 x from kWoAmxMinM rows, on CPUs with AMX-BF16: the AMX kernel (wo_amx), at any larger M
// too (it decodes the weight again for every 64 rows of x, which costs little next to the rest).
// Measured on the 2-vCPU AMX Xeon VM (N = K = 4096, 2 threads, 1 GiB read before each call, median
// of 15, speed over fp32 F.linear), AMX vs without it (the dot tiles, from M = 96 the decoded
// fp32 panels): M = 1 2.07x / 2.67x, 4 3.28 / 3.45, 8 5.07 / 3.43, 16 5.29 / 2.11, 64 4.37 /
// 0.81, 256 2.88 / 0.95, 512 2.18 / 0.90 (torch._weight_int8pack_mm: 2.32, 3.71, 3.14, 1.94,
// 0.82, 0.57, 0.54).
constexpr int64_t kWoAmxMinM = 5;
constexpr int64_t kWoAmxMaxM = INT64_MAX;
constexpr int64_t kWoCols = 96;  // N columns per small-M task

#if LOWBIT_HAVE_AVX2_KERNELS
LOWBIT_AVX2_INLINE __m256 widen8_i8_ps(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)); }

// c[i, j] = sum_k x[i, k] * w[j, k] for an MB x NB tile, over K8 = round_up(K, 8) (x zero-padded,
// w read through BRows). Per 8-deep step: NB widenings int8 -> int32 -> fp32 and MB*NB FMAs into
// MB*NB accumulators (12 for 4x3: enough independent chains to cover the 4-cycle FMA latency on
// both FMA pipes). Same register-allocation constraints as int8_dot_tile_avx2.
template <int MB, int NB>
LOWBIT_AVX2 __attribute__((noinline)) void wo_dot_tile_avx2(const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                                                            int64_t K8, float* c, int64_t ldc) {
  __m256 acc[MB * NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB * NB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    if ((k & 63) == 0)  // once per 64-byte line of each row
      for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + (j + cpu::kPrefetchTilesAhead * NB) * ldw + k), _MM_HINT_T0);
    __m256 wv[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j)
      wv[j] = widen8_i8_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j * ldw + k)));
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) acc[i * NB + j] = _mm256_fmadd_ps(xv, wv[j], acc[i * NB + j]);
    }
  }
  alignas(32) float lanes[MB * NB][8];
#pragma GCC unroll 16
  for (int t = 0; t < MB * NB; ++t) _mm256_store_ps(lanes[t], acc[t]);
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) c[i * ldc + j] = avx2::hsum(_mm256_load_ps(lanes[i * NB + j]));
}

template <int MB>
LOWBIT_AVX2 void wo_dot_group_avx2(const float* x, int64_t K8, const BRows& w, int64_t n0, int64_t n1, float* c,
                                   int64_t ldc) {
  constexpr int NB = dot_nb<MB>();
  const int64_t end = std::min(n1, w.safe_end());
  int64_t n = n0;
  for (; n + NB <= end; n += NB) wo_dot_tile_avx2<MB, NB>(x, K8, w.b + n * w.K, w.K, K8, c + (n - n0), ldc);
  for (; n < end; ++n) wo_dot_tile_avx2<MB, 1>(x, K8, w.b + n * w.K, w.K, K8, c + (n - n0), ldc);
  if (end < n1) wo_dot_tile_avx2<MB, 1>(x, K8, w.last_row, K8, K8, c + (end - n0), ldc);
}

// Same blocking as int8_dot_block_avx2.
LOWBIT_AVX2 void wo_dot_block_avx2(const float* x, int64_t K8, int64_t M, const BRows& w, int64_t n0, int64_t n1,
                                   float* c, int64_t ldc) {
  for (int64_t n = n0; n < n1; n += 12) {
    const int64_t nn = std::min<int64_t>(n + 12, n1);
    for (int64_t m = 0; m < M;) {
      const int64_t mb = std::min<int64_t>(4, M - m);
      const float* xm = x + m * K8;
      float* cm = c + m * ldc + (n - n0);
      switch (mb) {
        case 4: wo_dot_group_avx2<4>(xm, K8, w, n, nn, cm, ldc); break;
        case 3: wo_dot_group_avx2<3>(xm, K8, w, n, nn, cm, ldc); break;
        case 2: wo_dot_group_avx2<2>(xm, K8, w, n, nn, cm, ldc); break;
        default: wo_dot_group_avx2<1>(xm, K8, w, n, nn, cm, ldc); break;
      }
      m += mb;
    }
  }
}

// ---- large M: packed fp32 panels, the int8 GEMM's blocking with an FMA tile.
// x panel q = rows 6q..6q+5 as [K][6] fp32 (zero rows past M), packed once; weight panel = 16
// rows x kc converted int8 -> fp32 (exact) as [k][16], packed once per (task, K block) and
// L1 resident (kc = 256: 16 KiB). Per k the 6x16 tile does 2 loads, 6 broadcasts and 12 FMAs
// into 12 accumulators: the two FMA pipes are the only bottleneck.
constexpr int64_t kWoKC = 256;
constexpr int64_t kWoMC = 144;  // 144 x 256 fp32 = 144 KiB of x per block in L2

LOWBIT_AVX2 void pack_x_panel_avx2(const float* x, int64_t K, int64_t rows, float* dst) {
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < kMR; ++i) dst[k * kMR + i] = i < rows ? x[i * K + k] : 0.0f;
}

LOWBIT_AVX2 void pack_w_panel_avx2(const int8_t* w, int64_t ldw, int64_t rows, int64_t kc, float* panel) {
  for (int64_t k = 0; k < kc; k += 8) {
    const int64_t len = std::min<int64_t>(8, kc - k);
    for (int half = 0; half < 2; ++half) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t row = half * 8 + i;
        if (row >= rows) {
          r[i] = _mm256_setzero_si256();
          continue;
        }
        const int8_t* src = w + row * ldw + k;
        const __m128i bytes = len == 8 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))
                                       : avx2::load_partial_i8x8(src, len);
        r[i] = _mm256_castps_si256(widen8_i8_ps(bytes));
      }
      avx2::transpose8x8_epi32(r);
      for (int p = 0; p < 8; ++p)
        _mm256_store_ps(panel + (k + p) * 16 + half * 8, _mm256_castsi256_ps(r[p]));
    }
  }
}

template <bool kAccumulate>
LOWBIT_AVX2 __attribute__((noinline)) void wo_packed_tile_avx2(const float* x, const float* panel, int64_t kc,
                                                               float* c, int64_t ldc) {
  __m256 acc[kMR][2];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i)
    for (int h = 0; h < 2; ++h) acc[i][h] = kAccumulate ? _mm256_loadu_ps(c + i * ldc + 8 * h) : _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(panel + 16 * k);
    const __m256 b1 = _mm256_load_ps(panel + 16 * k + 8);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m256 xi = _mm256_broadcast_ss(x + k * kMR + i);
      acc[i][0] = _mm256_fmadd_ps(xi, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xi, b1, acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(c + i * ldc + 8 * h, acc[i][h]);
}

// c[0:round_up(rows_m, 6), 0:round_up(cols, 16)] = x panels . w[0:cols, :K]^T.
LOWBIT_AVX2 void wo_packed_block_avx2(const float* xp, int64_t K, int64_t rows_m, const int8_t* w, int64_t cols,
                                      float* c, int64_t ldc, float* panel) {
  for (int64_t k0 = 0; k0 < K; k0 += kWoKC) {
    const int64_t kc = std::min(kWoKC, K - k0);
    for (int64_t n = 0; n < cols; n += 16) {
      pack_w_panel_avx2(w + n * K + k0, K, std::min<int64_t>(16, cols - n), kc, panel);
      for (int64_t m = 0; m < rows_m; m += kMR) {
        const float* xm = xp + (m / kMR) * K * kMR + k0 * kMR;
        if (k0 == 0)
          wo_packed_tile_avx2<false>(xm, panel, kc, c + m * ldc + n, ldc);
        else
          wo_packed_tile_avx2<true>(xm, panel, kc, c + m * ldc + n, ldc);
      }
    }
  }
}
#endif  // LOWBIT_HAVE_AVX2_KERNELS

void wo_dot_block_scalar(const float* x, int64_t ldx, int64_t M, const int8_t* w, int64_t K, int64_t n0, int64_t n1,
                         float* c, int64_t ldc) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * ldx;
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += xm[k] * static_cast<float>(wn[k]);
      c[m * ldc + (n - n0)] = s;
    }
  }
}

#if LOWBIT_HAVE_AVX2_KERNELS
// bf16 x on CPUs with AMX-BF16 (cpu::amx_weight_gemm): each 32-column block of a weight row is
// widened int8 -> fp32 -> bf16, exact (|q| <= 128 has 8 significant bits), so the products are
// exact in fp32 and accumulate in fp32 as the reference's: the fp32 bound holds, and the usual
// epilogue follows (AMX counts subnormal bf16 activations, below 1.2e-38, as zero).
LOWBIT_AMX_CODE_BEGIN
void wo_amx(const at::Tensor& x, const int8_t* w, int64_t N, int64_t K, const GemmEpilogue& epi) {
  auto widen = [&](__m256i v) {  // [&]: a capture-less lambda gets a static invoker compiled without the target
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  };
  cpu::amx_byte_weight_gemm(x, reinterpret_cast<const uint8_t*>(w), N, K, widen,
                            [&](const float* acc, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
                              apply_epilogue(epi, acc, cpu::kAmxRows, m0, m1, n0, n1, true);
                            });
}
LOWBIT_AMX_CODE_END
#endif

at::Tensor int8_weight_only_mm_cpu(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& bias) {
  check_int8_weight_only_mm("int8_weight_only_mm", x_in, w_in, scale, bias);
  const at::Tensor w = w_in.contiguous();
  const int64_t M = x_in.size(0), N = w.size(0), K = w.size(1);
  const at::Tensor scale32 = scale.to(at::kFloat).contiguous();
  const at::Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x_in.options());
  const GemmEpilogue epi{x_in.scalar_type(), out.data_ptr(), N, nullptr, scale32.const_data_ptr<float>(),
                         bias32.defined() ? bias32.const_data_ptr<float>() : nullptr};
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const bool avx = cpu::has_avx2();

#if LOWBIT_HAVE_AVX2_KERNELS
  if (x_in.scalar_type() == at::kBFloat16 && cpu::use_amx_bf16(M, kWoAmxMinM, kWoAmxMaxM, "LOWBIT_INT8_WO_AMX")) {
    wo_amx(x_in, wp, N, K, epi);
    return out;
  }
  // On AVX-512F CPUs torch's sgemm over int8 rows widened to fp32 (exact) beats the packed AVX2
  // kernel below at every M it serves (lowbit/cpu/decoded_gemm.h; the same fp32 bound: exact
  // weights, fp32 accumulation, the same epilogue). Measured on the 2-vCPU AMX Xeon VM (N = K =
  // 4096, 2 threads, 1 GiB read before each call, median of 7, two interleaved runs, ms), packed
  // AVX2 vs decoded panels: M = 96 16.6-16.9 / 14.0-14.5, 128 21.4-22.1 / 17.6-18.3, 256
  // 45.9-48.4 / 29.5-31.2 (fp32 and bf16 x alike).
  // No bf16 route: the product would be rounded to bf16 before the scale, outside that bound.
  if (avx && cpu::decoded_gemm_route(x_in.scalar_type(), M, N, K, INT64_MAX, kWoGemmMinM) ==
                 cpu::DecodedGemm::kFloat32) {
    const at::Tensor x32 = x_in.to(at::kFloat).contiguous();
    auto decode = [&](int64_t n0, int64_t n1, void* panel) {
      float* dst = static_cast<float*>(panel);
      at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
        int8_to_fp32_avx2(wp + r0 * K, (r1 - r0) * K, dst + (r0 - n0) * K);
      });
    };
    auto finish = [&](const at::Tensor& y, int64_t n0, int64_t n1) {
      const float* yp = y.const_data_ptr<float>();
      const int64_t cols = n1 - n0;
      at::parallel_for(0, M, std::max<int64_t>(1, 32768 / cols), [&](int64_t m0, int64_t m1) {
        apply_epilogue(epi, yp + m0 * cols, cols, m0, m1, n0, n1, true);
      });
    };
    cpu::gemm_over_decoded_panels(x32, N, decode, finish);
    return out;
  }
  if (avx && M >= kWoGemmMinM) {
    const at::Tensor x32 = x_in.to(at::kFloat).contiguous();
    const float* xs = x32.const_data_ptr<float>();
    const int64_t x_panels = ceil_div(M, kMR);
    std::vector<float> xp(x_panels * K * kMR);
    at::parallel_for(0, x_panels, std::max<int64_t>(1, 4096 / K), [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q)
        pack_x_panel_avx2(xs + q * kMR * K, K, std::min<int64_t>(kMR, M - q * kMR), xp.data() + q * K * kMR);
    });
    const int64_t m_blocks = ceil_div(M, kWoMC), n_blocks = ceil_div(N, kNC);
    at::parallel_for(0, m_blocks * n_blocks, 1, [&](int64_t t0, int64_t t1) {
      alignas(64) float panel[kWoKC * 16];
      std::vector<float> acc(kWoMC * kNC);  // kWoMC is a multiple of kMR
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = (t / n_blocks) * kWoMC, m1 = std::min(M, m0 + kWoMC);
        const int64_t n0 = (t % n_blocks) * kNC, n1 = std::min(N, n0 + kNC);
        wo_packed_block_avx2(xp.data() + (m0 / kMR) * K * kMR, K, m1 - m0, wp + n0 * K, n1 - n0, acc.data(), kNC,
                             panel);
        apply_epilogue(epi, acc.data(), kNC, m0, m1, n0, n1, true);
      }
    });
    return out;
  }
#endif

  // x in fp32, rows zero-padded to a multiple of 8 so the tiles never need a tail on x.
  const int64_t K8 = round_up(K, 8);
  at::Tensor x32 = at::zeros({M, K8}, x_in.options().dtype(at::kFloat));
  x32.narrow(1, 0, K).copy_(x_in);
  const float* xp = x32.const_data_ptr<float>();
  PaddedLastRow last;
  const BRows wrows = last.rows(wp, N, K, K8);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / (M * K * kWoCols));
  at::parallel_for(0, ceil_div(N, kWoCols), grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(M * kWoCols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kWoCols, n1 = std::min(N, n0 + kWoCols);
#if LOWBIT_HAVE_AVX2_KERNELS
      if (avx)
        wo_dot_block_avx2(xp, K8, M, wrows, n0, n1, acc.data(), kWoCols);
      else
#endif
        wo_dot_block_scalar(xp, K8, M, wp, K, n0, n1, acc.data(), kWoCols);
      apply_epilogue(epi, acc.data(), kWoCols, 0, M, n0, n1, avx);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_quantize_dynamic", &int8_quantize_dynamic_cpu);
  m.impl("int8_quantize_static", &int8_quantize_static_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("int8_scaled_mm", &int8_scaled_mm_cpu);
  m.impl("int8_weight_only_mm", &int8_weight_only_mm_cpu);
}

}  // namespace lowbit
