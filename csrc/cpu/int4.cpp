// INT4 family, CPU kernels: weight-only GEMM with group-wise int4 weights (format:
// lowbit/formats/int4.py, spec: lowbit/backends/reference/int4.py).
//
// Numerics: no activation quantization; everything accumulates in fp32. Large M dequantizes as
// the reference does (float(u) - zero rounded once, times the scale). Small M sums x * u per group
// and subtracts zero * sum(x) once per group before scaling (see small_m_tile). Results agree
// with the reference within fp32 accumulation error, except on the bf16 decoded-GEMM route below.
// The float weight is never materialized whole: small M decodes nibbles in registers, once for
// all rows of x; large M dequantizes one L2-sized tile at a time (each weight once) and runs an
// FMA microkernel over it. Each call opens exactly one at::parallel_for (over output channels;
// x and the output are converted inside or serially): handing the tiles to MKL sgemm instead,
// from inside the parallel region or between parallel dequantizations, ran 3-9x slower than
// F.linear at M = 256 on the 2-core Zen 3 machine, every extra thread team costing milliseconds.
// On CPUs wider than AVX2 (AMX-BF16, AVX-512F) torch's GEMM wins at large M even so: there the
// weight is dequantized in 8 MiB panels and handed to at::mm (lowbit/cpu/decoded_gemm.h; bf16 x
// then gets weights rounded to bf16, as on the Triton path).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "lowbit/checks.h"
#include "lowbit/cpu/decoded_gemm.h"
#include "lowbit/cpu/vec_avx2.h"

namespace lowbit {
namespace {

constexpr int64_t kBlock = 32;       // columns per packed block (16 bytes)
constexpr int64_t kBlockBytes = 16;
// Up to this many rows of x, decoding the nibbles in registers (all rows in one pass) beats
// dequantizing into a tile first. Measured on 4096 x 4096, one thread: M = 5 small 3.9 ms vs
// tile 4.4 ms; M = 6 4.8 vs 4.6; M = 8 6.9 vs 5.2.
constexpr int64_t kSmallM = 5;
// The same with the AVX-512 kernel (small_m_tile_avx512), on CPUs with AVX-512F. Measured on the
// AMX Xeon VM (bf16 x, g128, N = K = 4096, 2 threads, 1 GiB read before each call, median of 15,
// two runs, ms), AVX-512 vs AVX2 (AVX2: the small-M kernel up to 5, then the tiles): M = 1
// 0.62-0.66 / 0.66-0.69, 2 0.74-0.85 / 0.82-0.87, 4 1.17-1.25 / 1.46-1.48, 5 1.37-1.52 /
// 2.10-2.12, 6 1.60-1.76 / 2.29-2.31, 8 2.09-2.19 / 2.45-2.46; the tiles at 9: 2.8-2.9.
// (Two weight rows per pass for every M, sharing each x load, measured 5-17% faster than one
// row per pass with two accumulators per (row, x row) from M = 5.) Tried and not kept: for bf16 x,
// the same kernel with vdpbf16ps (AVX512-BF16; codes and pre-scaled x converted to bf16, both
// exact, one instruction per block and row of x instead of two FMAs) ran slower at every M on
// this VM: M = 1 0.82 ms, 4 1.43, 8 2.39, 16 4.4 (converting the codes costs a vcvtne2ps2bf16 per
// block and weight row, and the dot products did not issue faster than the FMAs).
constexpr int64_t kSmallMAvx512 = 8;
// Large-M tiles: kTileN x kTileK fp32 = 192 KiB per thread, resident in L2 while every row of x
// streams over it; kTileN is a multiple of the microkernel's 3 weight rows.
constexpr int64_t kTileN = 48;
constexpr int64_t kTileK = 1024;
// From these M, on CPUs with AMX-BF16 (bf16 x) or AVX-512F (fp32/fp16 x), the dequantized weight
// goes to torch's GEMM (lowbit/cpu/decoded_gemm.h). Measured on the 2-vCPU AMX Xeon VM (g128
// asymmetric, N = K = 4096, 2 threads, 1 GiB read before each call, median of 9, two runs, ms),
// own kernel vs decoded GEMM: bf16 M = 9 2.8-3.0 / 2.8-2.9, 12 3.1-3.3 / 3.5-3.8, 16 3.8-3.9 /
// 3.7-3.8, 20 4.5-4.6 / 3.7-3.9, 32 6.5-6.6 / 3.8-4.0 (AVX-512 panel decode; with the AVX2 one,
// M = 16 3.5 / 3.7, 32 6.1 / 4.6, 256 47 / 8.9, 64 MiB read before each call). fp32 M = 64 11.4
// / 12.3, 128 22.7 / 18.4, 256 46 / 31 (fp32 F.linear: 8.9, 14.6, 25.4).
constexpr int64_t kDecodedGemmMinMBf16 = 16;
constexpr int64_t kDecodedGemmMinMFp32 = 96;
// Software prefetch distance of the small-M kernel (4-16 KiB measured equally good).
constexpr int64_t kPrefetchBytes = 4096;

enum class ScaleKind { kFloat, kHalf, kBFloat16 };

ScaleKind scale_kind(c10::ScalarType t) {
  return t == c10::ScalarType::Half ? ScaleKind::kHalf
         : t == c10::ScalarType::BFloat16 ? ScaleKind::kBFloat16 : ScaleKind::kFloat;
}

// Everything the kernels need, as raw pointers into contiguous tensors owned by the caller.
struct Problem {
  int64_t M, N, K, Kp, nblocks, groups, blocks_per_group;
  const uint8_t* w;       // [N, Kp / 2]
  const void* scale;      // [N, groups], ScaleKind
  const void* zero;       // [N, groups] or nullptr (symmetric: 8)
  ScaleKind kind;
  const float* bias;      // [N] fp32 or nullptr
  void* out;              // [M, N] in out_type (x's dtype)
  c10::ScalarType out_type;
  float* partial;         // [M, N] fp32 sums over earlier K-tiles (large M); aliases out for fp32
};

// The final rounding to x's dtype happens here, inside the one parallel region: a separate
// conversion op would open a second region, and on a loaded machine each costs milliseconds.
// Defined before the AVX2 pragma, so any out-of-line copy of c10's conversions stays portable.
inline void store_out(const Problem& p, int64_t i, float v) {
  switch (p.out_type) {
    case c10::ScalarType::Half: static_cast<c10::Half*>(p.out)[i] = c10::Half(v); break;
    case c10::ScalarType::BFloat16: static_cast<c10::BFloat16*>(p.out)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(p.out)[i] = v; break;
  }
}

// A group's first block and one past its last. group_size is a multiple of 32 except when it is
// K itself, and then there is a single group spanning every block (padding included).
inline int64_t group_end(const Problem& p, int64_t g) { return std::min(p.nblocks, (g + 1) * p.blocks_per_group); }

// ----------------------------------------------------------------------------- portable path
float load_scalar_generic(const void* ptr, ScaleKind kind, int64_t i) {
  switch (kind) {
    case ScaleKind::kHalf: return static_cast<float>(static_cast<const c10::Half*>(ptr)[i]);
    case ScaleKind::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[i]);
    default: return static_cast<const float*>(ptr)[i];
  }
}

inline uint8_t code_at(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[k / kBlock * kBlockBytes + k % kBlockBytes];
  return (k % kBlock) < kBlockBytes ? (byte & 0x0F) : (byte >> 4);
}

// Runs where AVX2/FMA are missing (and when LOWBIT_CPU_ISA=scalar, so tests can reach it).
void mm_scalar(const Problem& p, const float* x) {
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> wrow(p.K);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = p.w + n * (p.Kp / 2);
      for (int64_t k = 0; k < p.K; ++k) {
        const int64_t g = k / (p.blocks_per_group * kBlock);
        const float s = load_scalar_generic(p.scale, p.kind, n * p.groups + g);
        const float z = p.zero ? load_scalar_generic(p.zero, p.kind, n * p.groups + g) : 8.0f;
        wrow[k] = (static_cast<float>(code_at(row, k)) - z) * s;
      }
      for (int64_t m = 0; m < p.M; ++m) {
        const float* xr = x + m * p.Kp;
        float acc = 0.0f;
        for (int64_t k = 0; k < p.K; ++k) acc += xr[k] * wrow[k];
        store_out(p, m * p.N + n, p.bias ? acc + p.bias[n] : acc);
      }
    }
  });
}

// Column (within a 32-block) that lane `lane` of decoded vector j holds; see small_m_tile.
inline int x_perm_column(int j, int lane) { return lane < 4 ? 4 * lane + j : 16 + 4 * (lane - 4) + j; }

// Bit offset a of the nibble that lane `lane` of decoded vector j isolates (vector 3 reads the
// dwords shifted right by one); see NibbleLanes.
inline int nibble_shift(int j, int lane) { return (j < 3 ? 8 * j : 23) + (lane < 4 ? 0 : 4); }

// ----------------------------------------------------------------------------- AVX2 path
// Only functions defined below are compiled for AVX2. No torch/c10 function is defined here:
// an out-of-line copy of one, compiled under this target, could be picked by the linker for the
// whole library and run on a machine without AVX2 (those defined above may still be inlined).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

__attribute__((always_inline)) inline float load_scalar_avx2(const void* ptr, ScaleKind kind, int64_t i) {
  if (kind == ScaleKind::kFloat) return static_cast<const float*>(ptr)[i];
  const uint16_t bits = static_cast<const uint16_t*>(ptr)[i];
  if (kind == ScaleKind::kHalf) return _cvtsh_ss(bits);
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// A block's 16 bytes are broadcast to both 128-bit lanes and read as dwords d0..d3, each holding
// 8 nibbles. Vector j takes byte j of d0..d3: its low nibble (columns 4l + j) in lanes 0-3 and its
// high nibble (columns 16 + 4l + j) in lanes 4-7. x is permuted once per call into that order
// (x_to_fp32), so the weights never are.
// Decoding leaves each nibble where it sits: one AND with a per-lane mask isolates q * 2^a (a =
// the nibble's bit offset, nibble_shift), and the int -> float conversion is exact. The large-M
// dequantizer multiplies by 2^-a and subtracts the zero in one FMSUB (float(q) - zero rounded once,
// as in the reference); the small-M kernel folds 2^-a into x instead (see small_m_tile). The top
// nibble (bits 28-31) would convert as a negative int32, so vector 3 reads the dwords shifted
// right by one (bits 23-26 and 27-30): one shift per 32 weights.
struct NibbleLanes {
  __m256i mask[4];
  __m256 inv_pow[4];  // 2^-a per lane
};

inline NibbleLanes nibble_lanes() {
  NibbleLanes t;
  for (int j = 0; j < 4; ++j) {
    const int lo = nibble_shift(j, 0), hi = nibble_shift(j, 4);
    t.mask[j] = _mm256_setr_epi32(0xF << lo, 0xF << lo, 0xF << lo, 0xF << lo, 0xF << hi, 0xF << hi, 0xF << hi,
                                  0xF << hi);
    // 2^-a as float bits: biased exponent 127 - a, zero mantissa.
    const int flo = (127 - lo) << 23, fhi = (127 - hi) << 23;
    t.inv_pow[j] = _mm256_castsi256_ps(_mm256_setr_epi32(flo, flo, flo, flo, fhi, fhi, fhi, fhi));
  }
  return t;
}

// q * 2^a, exactly, for the 8 weights of vector j of a block whose dwords are v.
template <int J>
__attribute__((always_inline)) inline __m256 shifted_codes(const NibbleLanes& t, __m256i v) {
  const __m256i src = J == 3 ? _mm256_srli_epi32(v, 1) : v;
  return _mm256_cvtepi32_ps(_mm256_and_si256(src, t.mask[J]));
}

// float(q) - zero, rounded once, for the 8 weights of vector j.
template <int J>
__attribute__((always_inline)) inline __m256 decode(const NibbleLanes& t, __m256i v, __m256 zero) {
  return _mm256_fmsub_ps(shifted_codes<J>(t, v), t.inv_pow[J], zero);
}

// Small M. Per group and lane, sum(x * (q - z)) = sum(x * q) - z * sum(x), and x * q =
// (x * 2^-a) * (q * 2^a): with x pre-scaled by 2^-a (exact, a power of two) and the lane sums of
// x precomputed (prepare_small_m_x), a weight costs an AND, a conversion and one FMA, against
// a further FMSUB when decoding float(q) - zero per weight (measured 1.3-1.4x faster in one
// thread, L2- or L3-resident). The zero is subtracted once per group and lane, then the scale
// multiplies that sum. Exact for one-hot x, like the reference; otherwise the accumulation error
// is bounded by (K + 4) eps sum(|x| (|q| + |z|) |s|) instead of (K + 4) eps sum(|x| |q - z| |s|).
template <int MR, int NR>
void small_m_tile(const Problem& p, const NibbleLanes& t, const float* xp, const float* lane_sums, int64_t m0,
                  int64_t n0) {
  // One row of x keeps two partial sums per weight row (even and odd vectors) so that the FMA
  // latency never stalls the loop; with several rows of x their chains are independent already.
  constexpr int kParts = MR == 1 ? 2 : 1;
  const int64_t row_bytes = p.Kp / 2;
  __m256 acc[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
  const uint8_t* w = p.w + n0 * row_bytes;
  const float* x = xp + m0 * p.Kp;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 part[NR][MR][kParts];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m)
        for (int h = 0; h < kParts; ++h) part[r][m][h] = _mm256_setzero_ps();
    const int64_t b1 = group_end(p, g);
    for (int64_t b = g * p.blocks_per_group; b < b1; ++b) {
      __m256i v[NR];
      // The rows of a tile are contiguous, so kPrefetchBytes ahead of each row lies in the
      // rows that follow: the hardware prefetcher alone restarts on every 2 KiB row and left
      // this loop waiting on memory (measured: 30% faster at M = 1 with it). Once per 64-byte line.
      if (b % 4 == 0)
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + b * kBlockBytes + kPrefetchBytes), _MM_HINT_T0);
      for (int r = 0; r < NR; ++r)
        v[r] = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * row_bytes + b * kBlockBytes)));
      const float* xb = x + b * kBlock;
      auto step = [&](auto j_const) {
        constexpr int J = decltype(j_const)::value;
        __m256 xv[MR];
        for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(xb + m * p.Kp + 8 * J);
        for (int r = 0; r < NR; ++r) {
          const __m256 d = shifted_codes<J>(t, v[r]);
          for (int m = 0; m < MR; ++m) part[r][m][J % kParts] = _mm256_fmadd_ps(d, xv[m], part[r][m][J % kParts]);
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    }
    for (int r = 0; r < NR; ++r) {
      const int64_t i = (n0 + r) * p.groups + g;
      const __m256 sv = _mm256_set1_ps(load_scalar_avx2(p.scale, p.kind, i));
      const __m256 zv = _mm256_set1_ps(p.zero ? load_scalar_avx2(p.zero, p.kind, i) : 8.0f);
      for (int m = 0; m < MR; ++m) {
        const __m256 sum = kParts == 2 ? _mm256_add_ps(part[r][m][0], part[r][m][kParts - 1]) : part[r][m][0];
        const __m256 xs = _mm256_loadu_ps(lane_sums + ((m0 + m) * p.groups + g) * 8);
        acc[r][m] = _mm256_fmadd_ps(_mm256_fnmadd_ps(zv, xs, sum), sv, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const float bias = p.bias ? p.bias[n0 + r] : 0.0f;
    for (int m = 0; m < MR; ++m) store_out(p, (m0 + m) * p.N + n0 + r, hsum(acc[r][m]) + bias);
  }
}

template <int MR>
void small_m_rows(const Problem& p, const NibbleLanes& t, const float* xp, const float* lane_sums, int64_t m0,
                  int64_t n0, int64_t n1) {
  // Two weight rows per pass share each x load and give the FMAs independent chains; more
  // rows spill registers (measured: 3 or 4 rows at M = 1 run 2x slower than 2), and so would
  // two rows for 5 rows of x.
  constexpr int NR = MR <= 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) small_m_tile<MR, NR>(p, t, xp, lane_sums, m0, n);
  for (; n < n1; ++n) small_m_tile<MR, 1>(p, t, xp, lane_sums, m0, n);
}

void small_m_avx2(const Problem& p, const float* xp, const float* lane_sums) {
  // Work items of 4 output channels; every row of x in one pass, so each weight is decoded once.
  static_assert(kSmallM == 5, "the switch below instantiates one kernel per M up to kSmallM");
  const NibbleLanes t = nibble_lanes();
  at::parallel_for(0, (p.N + 3) / 4, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * 4, n1 = std::min(p.N, c1 * 4);
    switch (p.M) {
      case 1: small_m_rows<1>(p, t, xp, lane_sums, 0, n0, n1); break;
      case 2: small_m_rows<2>(p, t, xp, lane_sums, 0, n0, n1); break;
      case 3: small_m_rows<3>(p, t, xp, lane_sums, 0, n0, n1); break;
      case 4: small_m_rows<4>(p, t, xp, lane_sums, 0, n0, n1); break;
      default: small_m_rows<5>(p, t, xp, lane_sums, 0, n0, n1); break;
    }
  });
}


// Large M: dequantize rows [n0, n0 + rows) x blocks [b0, b1) into `tile` (row stride ld), in the
// same permuted column order as x (see small_m_tile), with the reference's roundings; D =
// c10::BFloat16 rounds each dequantized weight once more, to nearest even (the decoded-GEMM route).
template <typename D>
void dequant_tile_avx2(const Problem& p, const NibbleLanes& t, int64_t n0, int64_t rows, int64_t b0, int64_t b1,
                       D* tile, int64_t ld) {
  const int64_t row_bytes = p.Kp / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = p.w + n * row_bytes;
    // Group by group: the scale and zero are loaded once per group and no block index is
    // divided (a division per block cost more than the decode).
    for (int64_t g = b0 / p.blocks_per_group, b = b0; b < b1; ++g) {
      const int64_t i = n * p.groups + g;
      const __m256 sv = _mm256_set1_ps(load_scalar_avx2(p.scale, p.kind, i));
      const __m256 zv = _mm256_set1_ps(p.zero ? load_scalar_avx2(p.zero, p.kind, i) : 8.0f);
      for (const int64_t end = std::min(b1, group_end(p, g)); b < end; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlockBytes + kPrefetchBytes), _MM_HINT_T0);
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlockBytes)));
        D* dst = tile + r * ld + (b - b0) * kBlock;
        cpu::avx2::store8(dst, _mm256_mul_ps(decode<0>(t, v, zv), sv));
        cpu::avx2::store8(dst + 8, _mm256_mul_ps(decode<1>(t, v, zv), sv));
        cpu::avx2::store8(dst + 16, _mm256_mul_ps(decode<2>(t, v, zv), sv));
        cpu::avx2::store8(dst + 24, _mm256_mul_ps(decode<3>(t, v, zv), sv));
      }
    }
  }
}

// MR rows of x times NR dequantized weight rows over `len` columns (a multiple of 32), as dot
// products: 12 accumulators for 7 loads per 12 FMAs keep the FMA pipes, not the loads, busy.
// The partial sums are added to what earlier K-tiles left in out (first: store instead).
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

// scratch: one kTileN x kTileK tile per thread, allocated by the caller (outside this target).
void large_m_avx2(const Problem& p, const float* xp, float* scratch) {
  const int64_t ntiles = (p.N + kTileN - 1) / kTileN;
  const int64_t kblocks_per_tile = kTileK / kBlock;
  const NibbleLanes lanes = nibble_lanes();
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    float* const tile = scratch + at::get_thread_num() * kTileN * kTileK;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileN, rows = std::min(kTileN, p.N - n0);
      for (int64_t b0 = 0; b0 < p.nblocks; b0 += kblocks_per_tile) {
        const int64_t b1 = std::min(p.nblocks, b0 + kblocks_per_tile);
        dequant_tile_avx2(p, lanes, n0, rows, b0, b1, tile, kTileK);
        const int64_t len = (b1 - b0) * kBlock;
        const bool first = b0 == 0, last = b1 == p.nblocks;
        const float* x = xp + b0 * kBlock;
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

// Rows n0..n1 of the dequantized weight as [n1 - n0, Kp] rows of D (fp32 or bf16), in x's
// permuted column order (the decoded-GEMM route).
template <typename D>
void dequant_panel_avx2(const Problem& p, int64_t n0, int64_t n1, D* panel) {
  const NibbleLanes lanes = nibble_lanes();
  at::parallel_for(n0, n1, 8, [&](int64_t r0, int64_t r1) {
    dequant_tile_avx2(p, lanes, r0, r1 - r0, 0, p.nblocks, panel + (r0 - n0) * p.Kp, p.Kp);
  });
}

#pragma GCC pop_options

// ----------------------------------------------------------------------------- AVX-512 bf16 panels
// The bf16 decoded-GEMM route spends most of its time decoding at M = 16-32 (about 2 ms of 3.7
// for 4096 x 4096 with AVX2). Its CPUs (AMX-BF16) all have AVX-512F, where one 16-lane vector
// holds two of the AVX2 decode's vectors: [j = 0 | j = 1] and [j = 2 | j = 3], the latter from the
// dwords shifted right by one in its upper half only. Same operations per lane, so the same bits
// as dequant_tile_avx2<c10::BFloat16> (rounding to bf16 with integer ops, subnormals kept: the
// AVX512-BF16 conversion instruction would flush them).
// Nothing here may call out-of-line code compiled for the baseline ISA (SSE): with the upper
// halves of the zmm registers dirty, every such call paid a transition penalty. Calling
// load_scalar_generic once per group and weight row made the M = 5-8 kernels 10x slower (17.8
// ms instead of 1.65 at M = 5, N = K = 4096); the inlined AVX2 load_scalar_avx2 costs nothing.
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#pragma GCC diagnostic push
// GCC 12's own avx512fintrin.h trips this warning in _mm512_set1_* (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

struct NibbleLanes512 {
  __m512i mask[2];
  __m512 inv_pow[2];
};

inline NibbleLanes512 nibble_lanes512() {
  NibbleLanes512 t;
  alignas(64) int32_t m[2][16], f[2][16];
  for (int h = 0; h < 2; ++h)
    for (int lane = 0; lane < 16; ++lane) {
      const int a = nibble_shift(2 * h + lane / 8, lane % 8);
      m[h][lane] = 0xF << a;
      f[h][lane] = (127 - a) << 23;  // 2^-a
    }
  for (int h = 0; h < 2; ++h) {
    t.mask[h] = _mm512_load_si512(m[h]);
    t.inv_pow[h] = _mm512_castsi512_ps(_mm512_load_si512(f[h]));
  }
  return t;
}

inline void store16_bf16(uint16_t* dst, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}

void dequant_rows_bf16_avx512(const Problem& p, const NibbleLanes512& t, int64_t n0, int64_t rows, uint16_t* tile,
                              int64_t ld) {
  const int64_t row_bytes = p.Kp / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* row = p.w + n * row_bytes;
    for (int64_t g = 0, b = 0; b < p.nblocks; ++g) {
      const int64_t i = n * p.groups + g;
      const __m512 sv = _mm512_set1_ps(load_scalar_avx2(p.scale, p.kind, i));
      const __m512 zv = _mm512_set1_ps(p.zero ? load_scalar_avx2(p.zero, p.kind, i) : 8.0f);
      for (const int64_t end = group_end(p, g); b < end; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlockBytes + kPrefetchBytes), _MM_HINT_T0);
        const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlockBytes)));
        const __m512i v23 = _mm512_mask_srli_epi32(v, 0xFF00, v, 1);
        uint16_t* dst = tile + r * ld + b * kBlock;
        const __m512 q01 = _mm512_cvtepi32_ps(_mm512_and_si512(v, t.mask[0]));
        const __m512 q23 = _mm512_cvtepi32_ps(_mm512_and_si512(v23, t.mask[1]));
        store16_bf16(dst, _mm512_mul_ps(_mm512_fmsub_ps(q01, t.inv_pow[0], zv), sv));
        store16_bf16(dst + 16, _mm512_mul_ps(_mm512_fmsub_ps(q23, t.inv_pow[1], zv), sv));
      }
    }
  }
}

// Small M with AVX-512F: small_m_tile's arithmetic, 16 lanes at a time. Per 32-block and weight
// row, [j = 0 | j = 1] and [j = 2 | j = 3] each take one AND, one conversion and one FMA per row
// of x (AVX2: four of each). The per-lane sums of both halves are folded into small_m_tile's 8
// lanes at the end of each group, where the zero and the scale are applied exactly as there, so
// the bound of the folded kernel holds unchanged (the order of additions differs).
// noinline with every loop unrolled: inlined into its caller, or with loops left rolled, GCC
// kept the accumulators on the stack (measured 9.5 ms instead of 1.4 at M = 4, N = K = 4096).
// x is loaded at each use (L1-resident) and shared by the NR weight rows; with MR * NR >= 2
// independent chains, one accumulator per (row, x row) takes both halves of a block. The
// per-group totals live in memory: touched once per group, not per block.
template <int MR, int NR>
__attribute__((noinline)) void small_m_tile_avx512(const Problem& p, const NibbleLanes512& t, const float* xp,
                                                   const float* lane_sums, int64_t m0, int64_t n0) {
  constexpr int kParts = MR * NR == 1 ? 2 : 1;
  const int64_t row_bytes = p.Kp / 2;
  alignas(32) float total[NR][MR][8] = {};
  const uint8_t* w = p.w + n0 * row_bytes;
  const float* x = xp + m0 * p.Kp;
  const __m512i mask0 = t.mask[0], mask1 = t.mask[1];
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 part[NR][MR][kParts];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
        for (int h = 0; h < kParts; ++h) part[r][m][h] = _mm512_setzero_ps();
    const int64_t b1 = group_end(p, g);
    for (int64_t b = g * p.blocks_per_group; b < b1; ++b) {
      if (b % 4 == 0)
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + b * kBlockBytes + kPrefetchBytes), _MM_HINT_T0);
      const float* xb = x + b * kBlock;
      __m512 q01[NR], q23[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const __m512i v =
            _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * row_bytes + b * kBlockBytes)));
        q01[r] = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask0));
        q23[r] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_mask_srli_epi32(v, 0xFF00, v, 1), mask1));
      }
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512 x01 = _mm512_loadu_ps(xb + m * p.Kp), x23 = _mm512_loadu_ps(xb + m * p.Kp + 16);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          part[r][m][0] = _mm512_fmadd_ps(q01[r], x01, part[r][m][0]);
          part[r][m][kParts - 1] = _mm512_fmadd_ps(q23[r], x23, part[r][m][kParts - 1]);
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const int64_t i = (n0 + r) * p.groups + g;
      const __m256 sv = _mm256_set1_ps(load_scalar_avx2(p.scale, p.kind, i));
      const __m256 zv = _mm256_set1_ps(p.zero ? load_scalar_avx2(p.zero, p.kind, i) : 8.0f);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512 both = kParts == 2 ? _mm512_add_ps(part[r][m][0], part[r][m][kParts - 1]) : part[r][m][0];
        const __m256 sum = _mm256_add_ps(_mm512_castps512_ps256(both),
                                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(both), 1)));
        const __m256 xs = _mm256_loadu_ps(lane_sums + ((m0 + m) * p.groups + g) * 8);
        _mm256_store_ps(total[r][m], _mm256_fmadd_ps(_mm256_fnmadd_ps(zv, xs, sum), sv, _mm256_load_ps(total[r][m])));
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    const float bias = p.bias ? p.bias[n0 + r] : 0.0f;
    for (int m = 0; m < MR; ++m) store_out(p, (m0 + m) * p.N + n0 + r, hsum(_mm256_load_ps(total[r][m])) + bias);
  }
}

template <int MR>
void small_m_rows_avx512(const Problem& p, const NibbleLanes512& t, const float* xp, const float* lane_sums,
                         int64_t n0, int64_t n1) {
  // Accumulators: NR * MR zmm (2 for M = 1), within the 32 vector registers.
  constexpr int NR = 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) small_m_tile_avx512<MR, NR>(p, t, xp, lane_sums, 0, n);
  for (; n < n1; ++n) small_m_tile_avx512<MR, 1>(p, t, xp, lane_sums, 0, n);
}

void small_m_avx512(const Problem& p, const float* xp, const float* lane_sums) {
  static_assert(kSmallMAvx512 == 8, "the switch below instantiates one kernel per M up to kSmallMAvx512");
  const NibbleLanes512 t = nibble_lanes512();
  at::parallel_for(0, (p.N + 3) / 4, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * 4, n1 = std::min(p.N, c1 * 4);
    switch (p.M) {
      case 1: small_m_rows_avx512<1>(p, t, xp, lane_sums, n0, n1); break;
      case 2: small_m_rows_avx512<2>(p, t, xp, lane_sums, n0, n1); break;
      case 3: small_m_rows_avx512<3>(p, t, xp, lane_sums, n0, n1); break;
      case 4: small_m_rows_avx512<4>(p, t, xp, lane_sums, n0, n1); break;
      case 5: small_m_rows_avx512<5>(p, t, xp, lane_sums, n0, n1); break;
      case 6: small_m_rows_avx512<6>(p, t, xp, lane_sums, n0, n1); break;
      case 7: small_m_rows_avx512<7>(p, t, xp, lane_sums, n0, n1); break;
      default: small_m_rows_avx512<8>(p, t, xp, lane_sums, n0, n1); break;
    }
  });
}

void dequant_panel_bf16_avx512(const Problem& p, int64_t n0, int64_t n1, uint16_t* panel) {
  const NibbleLanes512 lanes = nibble_lanes512();
  at::parallel_for(n0, n1, 8, [&](int64_t r0, int64_t r1) {
    dequant_rows_bf16_avx512(p, lanes, r0, r1 - r0, panel + (r0 - n0) * p.Kp, p.Kp);
  });
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

bool use_avx2() {
  static const bool ok = [] {
    const char* isa = std::getenv("LOWBIT_CPU_ISA");
    if (isa && std::strcmp(isa, "scalar") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}

// x [M, K] (any float dtype and strides) -> fp32 [M, Kp], zero-padded past K so padding codes
// meet zeros; `permute` puts each 32-block in the lane order of small_m_tile. Serial on
// purpose: it is M*K cheap work and a parallel region costs more than that on a busy machine.
template <typename T, typename D = float>
void fill_x(const at::Tensor& x, int64_t Kp, bool permute, D* dst) {
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const T* src = x.const_data_ptr<T>();
  int64_t pos[kBlock];
  for (int j = 0; j < 4; ++j)
    for (int lane = 0; lane < 8; ++lane) pos[x_perm_column(j, lane)] = permute ? 8 * j + lane : x_perm_column(j, lane);
  for (int64_t m = 0; m < M; ++m) {
    D* row = dst + m * Kp;
    for (int64_t k = K; k < Kp; ++k) row[k / kBlock * kBlock + pos[k % kBlock]] = D(0.0f);
    for (int64_t k = 0; k < K; ++k)
      row[k / kBlock * kBlock + pos[k % kBlock]] = static_cast<D>(static_cast<float>(src[m * sm + k * sk]));
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

// bf16 x [M, K] -> bf16 [M, Kp] in the permuted column order, zero-padded (exact copies).
at::Tensor x_to_bf16_permuted(const at::Tensor& x, int64_t Kp) {
  at::Tensor out = at::empty({x.size(0), Kp}, x.options().dtype(at::kBFloat16));
  fill_x<c10::BFloat16>(x, Kp, true, out.mutable_data_ptr<c10::BFloat16>());
  return out;
}

// Large M on CPUs wider than lowbit's AVX2 kernels (lowbit/cpu/decoded_gemm.h): the weight is
// dequantized panel by panel, in x's permuted column order, and multiplied by at::mm. The
// panel's product y [M, n1 - n0] (bf16 or fp32) gets the bias in fp32 and x's dtype here.
void decoded_gemm(const Problem& p, const at::Tensor& x, cpu::DecodedGemm route, const at::Tensor& out) {
  const bool bf16 = route == cpu::DecodedGemm::kBFloat16;
  const at::Tensor xd = bf16 ? x_to_bf16_permuted(x, p.Kp) : x_to_fp32(x, p.Kp, true);
  auto decode = [&](int64_t n0, int64_t n1, void* panel) {
    if (bf16 && cpu::has_avx512f())
      dequant_panel_bf16_avx512(p, n0, n1, static_cast<uint16_t*>(panel));
    else if (bf16)
      dequant_panel_avx2(p, n0, n1, static_cast<c10::BFloat16*>(panel));
    else
      dequant_panel_avx2(p, n0, n1, static_cast<float*>(panel));
  };
  auto finish = [&](const at::Tensor& y, int64_t n0, int64_t /*n1*/) {
    cpu::for_each_panel_product(y, n0, [&](int64_t m, int64_t n, float v) {
      store_out(p, m * p.N + n, p.bias ? v + p.bias[n] : v);
    });
  };
  // Without a bias, a product already in x's dtype needs no epilogue.
  const bool direct = p.bias == nullptr && p.out_type == xd.scalar_type();
  cpu::gemm_over_decoded_panels(xd, p.N, decode, finish, direct ? out : at::Tensor());
}

// The small-M kernel's folding turns an infinite activation into inf - inf = NaN where the
// reference's (u - zero) * scale * x gives +-inf; such calls take the large-M path, which
// dequantizes each weight as the reference does.
bool all_finite(const float* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(x[i]);
  return ok;
}

// Small M (see small_m_tile): the lane sums of the permuted x per group, [M, groups, 8], then
// every column divided by 2^a of its lane's nibble, in place (exact unless |x| < 2^-99).
at::Tensor prepare_small_m_x(const Problem& p, float* xp) {
  at::Tensor sums = at::zeros({p.M, p.groups, 8}, at::kFloat);
  float* s = sums.mutable_data_ptr<float>();
  float inv_pow[kBlock];  // 2^-a per position in a block (a multiply, not an ldexp call, per column)
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 8; ++l) inv_pow[8 * j + l] = std::ldexp(1.0f, -nibble_shift(j, l));
  for (int64_t m = 0; m < p.M; ++m) {
    float* row = xp + m * p.Kp;
    for (int64_t g = 0; g < p.groups; ++g) {
      float* lane = s + (m * p.groups + g) * 8;
      for (int64_t b = g * p.blocks_per_group; b < group_end(p, g); ++b)
        for (int c = 0; c < kBlock; ++c) {
          float& v = row[b * kBlock + c];
          lane[c % 8] += v;
          v *= inv_pow[c];
        }
    }
  }
  return sums;
}

at::Tensor int4_weight_only_mm_cpu(const at::Tensor& x, const at::Tensor& packed_w, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& zero, int64_t group_size,
                                   const std::optional<at::Tensor>& bias) {
  check_int4_weight_only_mm("int4_weight_only_mm", x, packed_w, scale, zero, group_size, bias);
  const int64_t M = x.size(0), K = x.size(1), N = packed_w.size(0);
  const at::Tensor w = packed_w.contiguous();
  const at::Tensor s = scale.contiguous();
  const at::Tensor z = zero.has_value() ? zero->contiguous() : at::Tensor();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());

  Problem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.Kp = (K + kBlock - 1) / kBlock * kBlock;
  p.nblocks = p.Kp / kBlock;
  p.groups = (K + group_size - 1) / group_size;
  p.blocks_per_group = group_size % kBlock == 0 ? group_size / kBlock : p.nblocks;
  p.w = w.const_data_ptr<uint8_t>();
  p.scale = s.const_data_ptr();
  p.zero = z.defined() ? z.const_data_ptr() : nullptr;
  p.kind = scale_kind(s.scalar_type());
  p.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.out_type = out.scalar_type();
  p.partial = nullptr;

  const bool avx2 = use_avx2();
  const bool avx512 = avx2 && cpu::has_avx512f();
  const int64_t small_m = avx512 ? kSmallMAvx512 : kSmallM;
  const cpu::DecodedGemm route = avx2 && M > small_m ? cpu::decoded_gemm_route(x.scalar_type(), M, N, K,
                                                                              kDecodedGemmMinMBf16,
                                                                              kDecodedGemmMinMFp32)
                                                     : cpu::DecodedGemm::kNone;
  if (route != cpu::DecodedGemm::kNone) {
    decoded_gemm(p, x, route, out);
    return out;
  }
  const at::Tensor x32 = x_to_fp32(x, p.Kp, avx2);
  if (!avx2) {
    mm_scalar(p, x32.const_data_ptr<float>());
  } else if (M <= small_m && all_finite(x32.const_data_ptr<float>(), M * p.Kp)) {
    const at::Tensor lane_sums = prepare_small_m_x(p, x32.mutable_data_ptr<float>());
    if (avx512)
      small_m_avx512(p, x32.const_data_ptr<float>(), lane_sums.const_data_ptr<float>());
    else
      small_m_avx2(p, x32.const_data_ptr<float>(), lane_sums.const_data_ptr<float>());
  } else {
    at::Tensor partial;
    if (p.nblocks > kTileK / kBlock) {
      partial = out.scalar_type() == at::kFloat ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
      p.partial = partial.mutable_data_ptr<float>();
    }
    // Indexed by at::get_thread_num(): a call from inside a parallel region runs inline on a
    // thread whose number may exceed get_num_threads() there.
    const int64_t slots = std::max<int64_t>(at::get_num_threads(), at::get_thread_num() + 1);
    at::Tensor scratch = at::empty({slots, kTileN * kTileK}, x.options().dtype(at::kFloat));
    large_m_avx2(p, x32.const_data_ptr<float>(), scratch.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("int4_weight_only_mm", &int4_weight_only_mm_cpu); }

}  // namespace lowbit
