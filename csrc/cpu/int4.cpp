// INT4 family, CPU kernels: weight-only GEMM with group-wise int4 weights (format:
// lowbit/formats/int4.py, spec: lowbit/backends/reference/int4.py).
//
// Numerics: no activation quantization; everything accumulates in fp32. Large M dequantizes as
// the reference does (float(u) - zero rounded once, times the scale), and so does the AVX-512
// small-M kernel (a table of the group's 16 weights). The AVX2 small-M kernel sums x * u per
// group and subtracts zero * sum(x) once per group before scaling (see small_m_tile). Results
// agree with the reference within fp32 accumulation error, except where bf16 x meets AMX: the
// AMX kernel and the bf16 decoded-GEMM route round each weight once to bf16, as the Triton path
// does (error at most eps_bf16 * sum|x||w| more).
// The float weight is never materialized whole: small M decodes nibbles in registers, once for
// all rows of x; large M dequantizes one L2-sized tile at a time (each weight once) and runs an
// FMA microkernel over it. Each call opens exactly one at::parallel_for (over output channels;
// x and the output are converted inside or serially): handing the tiles to MKL sgemm instead,
// from inside the parallel region or between parallel dequantizations, ran 3-9x slower than
// F.linear at M = 256 on the 2-core Zen 3 machine, every extra thread team costing milliseconds.
// On CPUs wider than AVX2 (AMX-BF16, AVX-512F) torch's GEMM wins at large M even so: there the
// weight is dequantized in 8 MiB panels and handed to at::mm (lowbit/cpu/decoded_gemm.h). With
// AMX-BF16, bf16 x of 5-256 rows runs on lowbit's own AMX kernel (small_m_amx), which decodes
// 16 weight rows x 32 columns at a time into tiles and never leaves L1.
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
#include "lowbit/cpu/amx.h"
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
// Up to this many rows of x on CPUs with AVX-512F, the table-lookup kernel (lut_tile_avx512; up
// to 8 rows of x per pass over a chunk of weight rows) beats the large-M tiles. Measured on the
// AMX Xeon VM (fp32 x, g128, N = K = 4096, 2 threads, 1 GiB read before each call, median of 21,
// speed over fp32 F.linear), lookup vs tiles: M = 12 3.38x / 2.70x, 16 2.64 / 2.18, 24 1.90 /
// 1.61, 32 1.62 / 1.47, 48 1.21 / 1.25. The lookup kernel replaced an AVX-512 port of the AVX2
// small-M kernel (small_m_tile at 16 lanes, up to M = 8), which it beat at every M: bf16 x, same
// conditions, ratio to torch._weight_int4pack_mm_for_cpu in one run, old / new: M = 1 0.83 /
// 1.06, 4 0.68 / 0.84, 8 0.75 / 0.92.
constexpr int64_t kSmallMAvx512 = 32;
// bf16 x from kAmxMinM to kAmxMaxM rows, on CPUs with AMX-BF16: the AMX kernel (small_m_amx).
// Measured as above (bf16 x, ratio to torch._weight_int4pack_mm_for_cpu, two runs each), lookup
// vs AMX: M = 3 0.78-0.93 / 0.69-0.84, 4 0.76-0.85 / 0.79-0.85, 5 0.98-1.06 / 1.09-1.22, 6
// 1.00-1.05 / 1.23-1.28; AMX vs the decoded-GEMM route (ms): M = 128 5.2 / 9.3, 256 12.3 / 12.6,
// 512 32.4-32.8 / 19.0-21.0 (the AMX kernel decodes the weight again for every 64 rows of x).
constexpr int64_t kAmxMinM = 5;
constexpr int64_t kAmxMaxM = 256;
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
// Software prefetch distance of the AVX2 small-M kernel (4-16 KiB measured equally good).
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

// The AVX-512 lookup kernel's order (lut_tile_avx512): lane d of half h of a decoded block holds
// column 16h + 4(d % 4) + d / 4, the nibble at bit 8(d / 4) + 4h of dword d % 4 of a 128-bit lane.
inline int lut_column(int h, int d) { return 16 * h + 4 * (d % 4) + d / 4; }
inline int lut_nibble_shift(int h, int d) { return 8 * (d / 4) + 4 * h; }

// The AMX kernel's order (amx_tile): word j of 128-bit lane L of a decoded block holds column
// 16(L % 2) + 2j + L / 2, the nibble at bit 4L of word j.
inline int lut_bf16_column(int L, int j) { return 16 * (L % 2) + 2 * j + L / 2; }

// The column order x is copied into, within each 32-block: that of the weights as they decode.
enum class XOrder { kNatural, kNibbleLanes, kLut };

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
// GCC 12's own avx512fintrin.h trips these warnings in _mm512_set1_* and _mm512_reduce_add_ps
// (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

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

// Small M with AVX-512F: each weight is dequantized exactly as the reference does it, by table
// lookup. Per group and weight row, one vector holds the 16 possible weights (float(u) - zero)
// * scale for u = 0..15 (the reference's two fp32 roundings, so every decoded weight is bit-equal
// to the reference's). Per 32-block, the block's 16 bytes are broadcast to the four 128-bit lanes,
// one variable shift per half moves each lane's nibble to bits 0-3, and vpermps, which reads only
// those bits of each index, looks the weight up: 4 ALU operations for 32 dequantized weights. x is
// permuted once per call into the matching order (XOrder::kLut). Every row of x then takes one FMA
// per 16 weights into an accumulator that lives across the whole K; nothing is folded per group,
// so infinite activations give the reference's infinities. It replaced an AVX-512 port of the
// folded AVX2 kernel (2 ANDs, a shift and 2 conversions per block and weight row, then a per-group
// epilogue for every pair of weight row and x row); kSmallMAvx512 has the measurements. Weight
// rows of a pass prefetch the next pass's rows at the same block.
// noinline with every loop unrolled: inlined into its caller, or with loops left rolled, GCC
// kept the accumulators on the stack (measured 9.5 ms instead of 1.4 at M = 4, N = K = 4096).
struct LutLanes512 {
  __m512i shift[2];  // lane d of half h holds the nibble at bit 8 * (d / 4) + 4 * h of its dword
  __m512 iota;       // 0, 1, ..., 15
};

inline LutLanes512 lut_lanes512() {
  LutLanes512 t;
  alignas(64) int32_t s[2][16];
  alignas(64) float u[16];
  for (int d = 0; d < 16; ++d) {
    s[0][d] = lut_nibble_shift(0, d);
    s[1][d] = lut_nibble_shift(1, d);
    u[d] = static_cast<float>(d);
  }
  t.shift[0] = _mm512_load_si512(s[0]);
  t.shift[1] = _mm512_load_si512(s[1]);
  t.iota = _mm512_load_ps(u);
  return t;
}

// MR rows of x (from m0) times NR weight rows (from n0). Registers: MR * NR * kParts accumulators,
// 2 * NR decoded halves, NR tables, 2 x vectors and 2 shift vectors, within the 32 zmm.
template <int MR, int NR>
__attribute__((noinline)) void lut_tile_avx512(const Problem& p, const LutLanes512& t, const float* xp, int64_t m0,
                                               int64_t n0) {
  // Few (weight row, x row) pairs: two accumulators each, so enough FMA chains are in flight.
  constexpr int kParts = MR * NR <= 4 ? 2 : 1;
  const int64_t row_bytes = p.Kp / 2;
  const uint8_t* w = p.w + n0 * row_bytes;
  const float* x = xp + m0 * p.Kp;
  const __m512i sh0 = t.shift[0], sh1 = t.shift[1];
  __m512 acc[NR][MR][kParts];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int h = 0; h < kParts; ++h) acc[r][m][h] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 table[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const int64_t i = (n0 + r) * p.groups + g;
      const __m512 zv = _mm512_set1_ps(p.zero ? load_scalar_avx2(p.zero, p.kind, i) : 8.0f);
      table[r] = _mm512_mul_ps(_mm512_sub_ps(t.iota, zv), _mm512_set1_ps(load_scalar_avx2(p.scale, p.kind, i)));
    }
    const int64_t b1 = group_end(p, g);
    for (int64_t b = g * p.blocks_per_group; b < b1; ++b) {
      if (b % 4 == 0)
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(w + (NR + r) * row_bytes + b * kBlockBytes), _MM_HINT_T0);
      const float* xb = x + b * kBlock;
      __m512 w0[NR], w1[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const __m512i v =
            _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * row_bytes + b * kBlockBytes)));
        w0[r] = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, sh0), table[r]);
        w1[r] = _mm512_permutexvar_ps(_mm512_srlv_epi32(v, sh1), table[r]);
      }
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const __m512 x0 = _mm512_loadu_ps(xb + m * p.Kp), x1 = _mm512_loadu_ps(xb + m * p.Kp + 16);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          acc[r][m][0] = _mm512_fmadd_ps(w0[r], x0, acc[r][m][0]);
          acc[r][m][kParts - 1] = _mm512_fmadd_ps(w1[r], x1, acc[r][m][kParts - 1]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    const float bias = p.bias ? p.bias[n0 + r] : 0.0f;
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const __m512 both = kParts == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][kParts - 1]) : acc[r][m][0];
      store_out(p, (m0 + m) * p.N + n0 + r, _mm512_reduce_add_ps(both) + bias);
    }
  }
}

// Weight rows per pass for MR rows of x: as many as the registers hold (see lut_tile_avx512; 4
// rows at MR = 4 fill all 32). Measured on the AMX Xeon VM (bf16 x, g128, N = K = 4096, 2 threads,
// cold, two runs, ratio to torch._weight_int4pack_mm_for_cpu), 3 rows per pass vs 4: M = 3
// 0.86-0.88 / 0.97-1.04, M = 4 0.85-0.86 / 0.93-0.99.
constexpr int lut_rows_per_pass(int mr) { return mr <= 4 ? 4 : mr <= 5 ? 3 : 2; }

template <int MR>
void lut_rows_avx512(const Problem& p, const LutLanes512& t, const float* xp, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int NR = lut_rows_per_pass(MR);
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) lut_tile_avx512<MR, NR>(p, t, xp, m0, n);
  for (; n < n1; ++n) lut_tile_avx512<MR, 1>(p, t, xp, m0, n);
}

// Weight rows per parallel chunk: a multiple of every lut_rows_per_pass. All row blocks of x
// (kLutMaxMR at a time) pass over a chunk before the next, which is then still in L1/L2.
constexpr int64_t kLutChunkRows = 12;
constexpr int64_t kLutMaxMR = 8;

void small_m_lut_avx512(const Problem& p, const float* xp) {
  const LutLanes512 t = lut_lanes512();
  at::parallel_for(0, (p.N + kLutChunkRows - 1) / kLutChunkRows, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * kLutChunkRows, n1 = std::min(p.N, n0 + kLutChunkRows);
      for (int64_t m0 = 0; m0 < p.M; m0 += kLutMaxMR) {
        switch (std::min(kLutMaxMR, p.M - m0)) {
          case 1: lut_rows_avx512<1>(p, t, xp, m0, n0, n1); break;
          case 2: lut_rows_avx512<2>(p, t, xp, m0, n0, n1); break;
          case 3: lut_rows_avx512<3>(p, t, xp, m0, n0, n1); break;
          case 4: lut_rows_avx512<4>(p, t, xp, m0, n0, n1); break;
          case 5: lut_rows_avx512<5>(p, t, xp, m0, n0, n1); break;
          case 6: lut_rows_avx512<6>(p, t, xp, m0, n0, n1); break;
          case 7: lut_rows_avx512<7>(p, t, xp, m0, n0, n1); break;
          default: lut_rows_avx512<8>(p, t, xp, m0, n0, n1); break;
        }
      }
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

// ----------------------------------------------------------------------------- AMX-BF16 small M
// bf16 x on CPUs with AMX-BF16, kAmxMinM to kAmxMaxM rows: lowbit/cpu/amx.h's tile loop, fed by a
// table-lookup decoder. Per group and weight row, the 16 dequantized weights (float(u) - zero) *
// scale are rounded once to bf16 (as the Triton kernel and the decoded-GEMM route round them for
// bf16 x) and stored twice over in one 32-word table. Per 32-block and row: the block's 16 bytes
// broadcast to the four 128-bit lanes, one variable word shift (lane L: 4L bits) and one vpermw
// (which reads bits 0-4 of each index: bit 4 is another nibble's, hence the doubled table) give
// the row's 32 weights, one 64-byte tile row. Decode steps end at group boundaries (one table per
// row and step).
// Tried and not kept: the same table lookup feeding vdpbf16ps (AVX512-BF16; one instruction per
// 32 weights and row of x instead of two FMAs) ran no faster than lut_tile_avx512's FMAs on the
// AMX Xeon VM: one vdpbf16ps issues at half the FMA rate there (warm, 1 thread, N = 1024, K =
// 4096, ms, vdpbf16ps / FMA: M = 8 0.95 / 0.95, M = 16 1.89 / 1.79).
LOWBIT_AMX_CODE_BEGIN

// t (16 fp32) -> 32 words: t rounded to bf16 (to nearest even), twice. The conversion treats
// subnormal inputs as zero, which AMX would do with their bf16 roundings anyway.
inline __m512i bf16_table_twice(__m512 t) { return (__m512i)_mm512_cvtne2ps_pbh(t, t); }

// bf16 x of M rows through cpu::amx_weight_gemm, decoding 16 weight rows per tile by table lookup.
void small_m_amx(const Problem& p, const at::Tensor& xb) {
  const int64_t row_bytes = p.Kp / 2;
  auto step_end = [&](int64_t b0) {
    const int64_t g1 = group_end(p, b0 / p.blocks_per_group);
    return std::min(g1, b0 + cpu::kAmxStep);
  };
  auto decode = [&](int64_t n0, int rows, int64_t b0, int64_t b1, cpu::AmxStepBuffer& a) {
    const __m512i shift = _mm512_set_epi64(0x000c000c000c000cLL, 0x000c000c000c000cLL, 0x0008000800080008LL,
                                           0x0008000800080008LL, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const int64_t g = b0 / p.blocks_per_group;
    for (int r = 0; r < rows; ++r) {
      const int64_t i = (n0 + r) * p.groups + g;
      const __m512 zv = _mm512_set1_ps(p.zero ? load_scalar_avx2(p.zero, p.kind, i) : 8.0f);
      const __m512i table =
          bf16_table_twice(_mm512_mul_ps(_mm512_sub_ps(iota, zv), _mm512_set1_ps(load_scalar_avx2(p.scale, p.kind, i))));
      const uint8_t* w = p.w + (n0 + r) * row_bytes;
      for (int64_t b = b0; b < b1; ++b) {
        if (b % 4 == 0)  // the next tile's row, one 64-byte line ahead
          _mm_prefetch(reinterpret_cast<const char*>(w + cpu::kAmxRows * row_bytes + b * kBlockBytes), _MM_HINT_T0);
        const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * kBlockBytes)));
        _mm512_store_si512(a[b - b0][r], _mm512_permutexvar_epi16(_mm512_srlv_epi16(v, shift), table));
      }
    }
  };
  // out[m, n] = C[n - n0, m - m0] + bias[n], rounded once to x's dtype.
  auto finish = [&](int64_t m0, int64_t n0, int rows, int64_t mrows, const float* c) {
    for (int r = 0; r < rows; ++r) {
      const float bias = p.bias ? p.bias[n0 + r] : 0.0f;
      for (int64_t m = 0; m < mrows; ++m) store_out(p, (m0 + m) * p.N + n0 + r, c[r * cpu::kAmxCols + m] + bias);
    }
  };
  cpu::amx_weight_gemm(p.M, p.N, p.nblocks, xb, decode, step_end, finish);
}

LOWBIT_AMX_CODE_END

// bf16 x [M, K] -> AMX B tiles in the order the weights decode (lut_bf16_column).
at::Tensor x_to_amx_b(const at::Tensor& x, int64_t nblocks) {
  int column_of_word[cpu::kAmxK];
  for (int L = 0; L < 4; ++L)
    for (int j = 0; j < 8; ++j) column_of_word[8 * L + j] = lut_bf16_column(L, j);
  return cpu::x_to_amx_b(x, nblocks, column_of_word);
}

bool use_avx2() {
  static const bool ok = [] {
    const char* isa = std::getenv("LOWBIT_CPU_ISA");
    if (isa && std::strcmp(isa, "scalar") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}


// x [M, K] (any float dtype and strides) -> fp32 [M, Kp], zero-padded past K so padding codes
// meet zeros, each 32-block in `order`. Serial on purpose: it is M*K cheap work and a parallel
// region costs more than that on a busy machine.
template <typename T, typename D = float>
void fill_x(const at::Tensor& x, int64_t Kp, XOrder order, D* dst) {
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const T* src = x.const_data_ptr<T>();
  int64_t pos[kBlock];  // where column c of a block goes
  for (int c = 0; c < kBlock; ++c) pos[c] = c;
  if (order == XOrder::kNibbleLanes)
    for (int j = 0; j < 4; ++j)
      for (int lane = 0; lane < 8; ++lane) pos[x_perm_column(j, lane)] = 8 * j + lane;
  if (order == XOrder::kLut)
    for (int h = 0; h < 2; ++h)
      for (int d = 0; d < 16; ++d) pos[lut_column(h, d)] = 16 * h + d;
  for (int64_t m = 0; m < M; ++m) {
    D* row = dst + m * Kp;
    for (int64_t k = K; k < Kp; ++k) row[k / kBlock * kBlock + pos[k % kBlock]] = D(0.0f);
    for (int64_t k = 0; k < K; ++k)
      row[k / kBlock * kBlock + pos[k % kBlock]] = static_cast<D>(static_cast<float>(src[m * sm + k * sk]));
  }
}

at::Tensor x_to_fp32(const at::Tensor& x, int64_t Kp, XOrder order) {
  at::Tensor out = at::empty({x.size(0), Kp}, x.options().dtype(at::kFloat));
  float* dst = out.mutable_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kHalf: fill_x<c10::Half>(x, Kp, order, dst); break;
    case at::kBFloat16: fill_x<c10::BFloat16>(x, Kp, order, dst); break;
    default: fill_x<float>(x, Kp, order, dst); break;
  }
  return out;
}

// bf16 x [M, K] -> bf16 [M, Kp] in the permuted column order, zero-padded (exact copies).
at::Tensor x_to_bf16_permuted(const at::Tensor& x, int64_t Kp) {
  at::Tensor out = at::empty({x.size(0), Kp}, x.options().dtype(at::kBFloat16));
  fill_x<c10::BFloat16>(x, Kp, XOrder::kNibbleLanes, out.mutable_data_ptr<c10::BFloat16>());
  return out;
}

// Large M on CPUs wider than lowbit's AVX2 kernels (lowbit/cpu/decoded_gemm.h): the weight is
// dequantized panel by panel, in x's permuted column order, and multiplied by at::mm. The
// panel's product y [M, n1 - n0] (bf16 or fp32) gets the bias in fp32 and x's dtype here.
void decoded_gemm(const Problem& p, const at::Tensor& x, cpu::DecodedGemm route, const at::Tensor& out) {
  const bool bf16 = route == cpu::DecodedGemm::kBFloat16;
  const at::Tensor xd = bf16 ? x_to_bf16_permuted(x, p.Kp) : x_to_fp32(x, p.Kp, XOrder::kNibbleLanes);
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
  if (x.scalar_type() == at::kBFloat16 && cpu::use_amx_bf16(M, kAmxMinM, kAmxMaxM, "LOWBIT_INT4_AMX")) {
    small_m_amx(p, x_to_amx_b(x, p.nblocks));
    return out;
  }
  const cpu::DecodedGemm route = avx2 && M > small_m ? cpu::decoded_gemm_route(x.scalar_type(), M, N, K,
                                                                              kDecodedGemmMinMBf16,
                                                                              kDecodedGemmMinMFp32)
                                                     : cpu::DecodedGemm::kNone;
  if (route != cpu::DecodedGemm::kNone) {
    decoded_gemm(p, x, route, out);
    return out;
  }
  if (avx512 && M <= small_m) {
    const at::Tensor x32 = x_to_fp32(x, p.Kp, XOrder::kLut);
    small_m_lut_avx512(p, x32.const_data_ptr<float>());
    return out;
  }
  const at::Tensor x32 = x_to_fp32(x, p.Kp, avx2 ? XOrder::kNibbleLanes : XOrder::kNatural);
  if (!avx2) {
    mm_scalar(p, x32.const_data_ptr<float>());
  } else if (M <= small_m && all_finite(x32.const_data_ptr<float>(), M * p.Kp)) {
    const at::Tensor lane_sums = prepare_small_m_x(p, x32.mutable_data_ptr<float>());
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
