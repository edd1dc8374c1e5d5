// Binary (XNOR-popcount) family, CPU kernels (format: lowbit/formats/binary.py, spec:
// lowbit/backends/reference/binary.py).
//
// binary_mm / binary_scaled_mm: dot = K - 2 * popcount(a XOR b). Three inner loops:
//   * AVX-512 VPOPCNTDQ, where the CPU has it (avx512_block): 512 bits per xor + vpopcntq + add.
//   * AVX2 (Mula's vpshufb nibble-table popcount): 256 bits of a XOR b per step; each nibble's
//     count is looked up with vpshufb and summed in byte lanes, which are widened with vpsadbw
//     only every 31 steps (a byte holds at most 8 per step, 31 * 8 < 256).
//   * 64-bit popcnt (the fallback; hardware popcnt where the CPU has it).
// Both are register-blocked over kMR rows of a x kNR rows of b, so every loaded vector serves
// several pairs. Measured on Zen 3 (one thread, process CPU time, M = 256, N = K = 4096): the
// vpshufb loop on nibble planes 11.6-12.2 ms (~1.9 cycles per 256-bit pair), the 64-bit popcnt
// loop 25-27 ms: popcnt is cheap, but xor + popcnt + add per 64 bits on the scalar ALUs is twice
// the work per bit of xor + vpshufb + add per 128 bits. fp32 torch.mm: 105-117 ms.
// The last, partial word of a row is masked, so padding bits never count. Each call opens one
// at::parallel_for, over tiles of (rows of a) x (rows of b).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "lowbit/binary_layout.h"
#include "lowbit/checks.h"
#include "lowbit/cpu/isa.h"
#if LOWBIT_HAVE_AVX2_KERNELS
#include <immintrin.h>
#endif

namespace lowbit {
namespace {

namespace bl = binary_layout;

// Output tiles: kTileM rows of a x kTileN rows of b per task. With K = 4096 a tile's b rows are
// 32 KiB (L1/L2) and its a rows 32 KiB: both stay cached while the register blocks sweep them.
constexpr int64_t kTileM = 64;
constexpr int64_t kTileN = 64;

// What the epilogue does with a dot product, shared by both inner loops.
struct Epilogue {
  int64_t K, N;
  int32_t* dot_out;                // binary_mm: int32 [M, N]; nullptr for the scaled op
  void* out;                       // binary_scaled_mm: [M, N] in out_type
  c10::ScalarType out_type;
  const float* scale_a;            // [M] or [1]
  const float* scale_b;            // [N] or [1]
  bool scale_a_per_row, scale_b_per_col;
  const float* bias;               // [N] fp32 or nullptr
};

// Same operations, in the same order, as the reference: float(dot) * sa * sb + bias, each rounded
// to fp32 (fp_barrier keeps GCC from contracting the multiply and add into an FMA).
inline void store(const Epilogue& e, int64_t m, int64_t n, int64_t xor_count) {
  const int32_t dot = bl::dot_from_xor_count(e.K, xor_count);
  const int64_t i = m * e.N + n;
  if (e.dot_out != nullptr) {
    e.dot_out[i] = dot;
    return;
  }
  float v = static_cast<float>(dot) * e.scale_a[e.scale_a_per_row ? m : 0];
  cpu::fp_barrier(v);
  v = v * e.scale_b[e.scale_b_per_col ? n : 0];
  cpu::fp_barrier(v);
  if (e.bias != nullptr) v = v + e.bias[n];
  switch (e.out_type) {
    case c10::ScalarType::Half: static_cast<c10::Half*>(e.out)[i] = c10::Half(v); break;
    case c10::ScalarType::BFloat16: static_cast<c10::BFloat16*>(e.out)[i] = c10::BFloat16(v); break;
    default: static_cast<float*>(e.out)[i] = v; break;
  }
}

constexpr int64_t kMaxCols = 64;  // == kTileN

// Adds the bias to products already rounded to fp32 and converts to the output dtype.
void store_row(const Epilogue& e, int64_t m, int64_t n0, int64_t cols, float* row) {
  if (e.bias != nullptr) {
    asm volatile("" ::: "memory");  // the products are in memory: no FMA across this point
    for (int64_t j = 0; j < cols; ++j) row[j] = row[j] + e.bias[n0 + j];
  }
  const int64_t i = m * e.N + n0;
  switch (e.out_type) {
    case c10::ScalarType::Half:
      for (int64_t j = 0; j < cols; ++j) static_cast<c10::Half*>(e.out)[i + j] = c10::Half(row[j]);
      break;
    case c10::ScalarType::BFloat16:
      for (int64_t j = 0; j < cols; ++j) static_cast<c10::BFloat16*>(e.out)[i + j] = c10::BFloat16(row[j]);
      break;
    default: std::memcpy(static_cast<float*>(e.out) + i, row, sizeof(float) * cols); break;
  }
}

struct Operands {
  const uint32_t* a;  // [M, W]
  const uint32_t* b;  // [N, W]
  int64_t M, N, K, W;
  int64_t full_words;  // words entirely inside K
};

// Popcount of (a XOR b) over words [w0, W) of one pair, the last one masked. Portable.
inline int64_t tail_count(const Operands& p, const uint32_t* ar, const uint32_t* br, int64_t w0) {
  int64_t c = 0;
  for (int64_t w = w0; w < p.W; ++w) c += __builtin_popcount((ar[w] ^ br[w]) & bl::word_mask(p.K, w));
  return c;
}

// Writes a block of results from its popcounts over the full 256-bit steps (`counts`, row stride
// ld), adding the words past them. Row-wise simple loops the compiler vectorizes: at K = 256 the
// per-element epilogue was most of the run time.
void finish_rows(const Operands& p, const Epilogue& e, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
                 uint32_t* counts, int64_t ld, int64_t counted_words) {
  if (counted_words < p.W)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        counts[i * ld + j] += static_cast<uint32_t>(
            tail_count(p, p.a + (m0 + i) * p.W, p.b + (n0 + j) * p.W, counted_words));
  const int32_t K = static_cast<int32_t>(p.K);
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t* c = counts + i * ld;
    const int64_t m = m0 + i;
    if (e.dot_out != nullptr) {
      int32_t* out = e.dot_out + m * e.N + n0;
      for (int64_t j = 0; j < cols; ++j) out[j] = K - 2 * static_cast<int32_t>(c[j]);
      continue;
    }
    // float(dot) * sa * sb, then + bias, rounded per operation like the reference: the products
    // go through memory before the bias is added, so GCC cannot contract them into an FMA.
    float row[kMaxCols];
    const float sa = e.scale_a[e.scale_a_per_row ? m : 0];
    const float* sb = e.scale_b + (e.scale_b_per_col ? n0 : 0);
    if (e.scale_b_per_col)
      for (int64_t j = 0; j < cols; ++j) row[j] = static_cast<float>(K - 2 * static_cast<int32_t>(c[j])) * sa * sb[j];
    else
      for (int64_t j = 0; j < cols; ++j) row[j] = static_cast<float>(K - 2 * static_cast<int32_t>(c[j])) * sa * sb[0];
    store_row(e, m, n0, cols, row);
  }
}

// ----------------------------------------------------------------------------- 64-bit popcount
// One body, compiled twice: with hardware popcnt (and only that) and for the baseline ISA.
#define LOWBIT_BINARY_POPCNT64_BLOCK(NAME, ATTR)                                                                 \
  template <int MR, int NR>                                                                                      \
  ATTR void NAME(const Operands& p, const Epilogue& e, int64_t m0, int64_t n0) {                                 \
    const int64_t chunks = p.full_words / 2;                                                                     \
    uint64_t acc[MR][NR] = {};                                                                                   \
    for (int64_t c = 0; c < chunks; ++c) {                                                                       \
      uint64_t av[MR], bv[NR];                                                                                   \
      for (int i = 0; i < MR; ++i) std::memcpy(&av[i], p.a + (m0 + i) * p.W + 2 * c, 8);                         \
      for (int j = 0; j < NR; ++j) std::memcpy(&bv[j], p.b + (n0 + j) * p.W + 2 * c, 8);                         \
      for (int i = 0; i < MR; ++i)                                                                               \
        for (int j = 0; j < NR; ++j) acc[i][j] += __builtin_popcountll(av[i] ^ bv[j]);                           \
    }                                                                                                            \
    for (int i = 0; i < MR; ++i)                                                                                 \
      for (int j = 0; j < NR; ++j)                                                                               \
        store(e, m0 + i, n0 + j,                                                                                 \
              int64_t(acc[i][j]) + tail_count(p, p.a + (m0 + i) * p.W, p.b + (n0 + j) * p.W, 2 * chunks));      \
  }

#if LOWBIT_HAVE_AVX2_KERNELS
LOWBIT_BINARY_POPCNT64_BLOCK(popcnt64_block_hw, __attribute__((target("popcnt"))))
#endif
LOWBIT_BINARY_POPCNT64_BLOCK(popcnt64_block_generic, )

template <bool kHardware>
void popcnt64_tile(const Operands& p, const Epilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = 2, NR = 4;  // 8 accumulators + 6 words in the 16 general registers
  for (int64_t m = m0; m < m1; m += MR) {
    for (int64_t n = n0; n < n1; n += NR) {
      if (m + MR <= m1 && n + NR <= n1) {
#if LOWBIT_HAVE_AVX2_KERNELS
        if constexpr (kHardware) {
          popcnt64_block_hw<MR, NR>(p, e, m, n);
          continue;
        }
#endif
        popcnt64_block_generic<MR, NR>(p, e, m, n);
      } else {
        for (int64_t i = m; i < std::min(m1, m + MR); ++i)
          for (int64_t j = n; j < std::min(n1, n + NR); ++j) {
#if LOWBIT_HAVE_AVX2_KERNELS
            if constexpr (kHardware) {
              popcnt64_block_hw<1, 1>(p, e, i, j);
              continue;
            }
#endif
            popcnt64_block_generic<1, 1>(p, e, i, j);
          }
      }
    }
  }
}

// ----------------------------------------------------------------------------- AVX2 (vpshufb)
#if LOWBIT_HAVE_AVX2_KERNELS
#define LOWBIT_AVX2_INLINE_B LOWBIT_AVX2 inline __attribute__((always_inline))

// Byte-lane popcounts of v, via two 16-entry table lookups (low and high nibble).
LOWBIT_AVX2_INLINE_B __m256i popcount_bytes(__m256i v, __m256i table, __m256i low4) {
  const __m256i lo = _mm256_and_si256(v, low4);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

// At small M each block prefetches the rows of b cpu::kPrefetchTilesAhead blocks ahead. Against
// none (2 threads, N = K = 4096, 64 MiB read before each call, min / median of 150, three
// interleaved runs): M = 1 0.19-0.25 / 0.26-0.31 -> 0.14-0.17 / 0.20-0.23 ms (one block ahead:
// about the same; four and eight: no better); M = 4 0.34-0.49 / 0.44-0.62 -> 0.27-0.29 / 0.39-0.40.
template <int MR, int NR>
LOWBIT_AVX2 void avx2_block(const Operands& p, const Epilogue& e, int64_t m0, int64_t n0) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const int64_t steps = p.full_words / 8;  // 256-bit steps inside K
  constexpr int64_t kFlush = 31;           // byte lanes gain <= 8 per step: 31 * 8 = 248 < 256
  __m256i wide[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) wide[i][j] = _mm256_setzero_si256();
  for (int64_t s0 = 0; s0 < steps; s0 += kFlush) {
    const int64_t s1 = std::min(steps, s0 + kFlush);
    __m256i bytes[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) bytes[i][j] = _mm256_setzero_si256();
    for (int64_t s = s0; s < s1; ++s) {
      __m256i av[MR];
      for (int i = 0; i < MR; ++i)
        av[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a + (m0 + i) * p.W + 8 * s));
      if ((s & 1) == 0)  // once per 64-byte line of each row
        for (int j = 0; j < NR; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(p.b + (n0 + j + cpu::kPrefetchTilesAhead * NR) * p.W + 8 * s), _MM_HINT_T0);
      for (int j = 0; j < NR; ++j) {
        const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.b + (n0 + j) * p.W + 8 * s));
        for (int i = 0; i < MR; ++i)
          bytes[i][j] = _mm256_add_epi8(bytes[i][j], popcount_bytes(_mm256_xor_si256(av[i], bv), table, low4));
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j)
        wide[i][j] = _mm256_add_epi64(wide[i][j], _mm256_sad_epu8(bytes[i][j], _mm256_setzero_si256()));
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      alignas(32) uint64_t lanes[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), wide[i][j]);
      const int64_t c = int64_t(lanes[0] + lanes[1] + lanes[2] + lanes[3]);
      store(e, m0 + i, n0 + j, c + tail_count(p, p.a + (m0 + i) * p.W, p.b + (n0 + j) * p.W, 8 * steps));
    }
}

// 2 x 4 blocks: 8 byte accumulators + 2 rows of a + table, mask and temporaries fit the 16 ymm
// registers, and each b vector serves 2 rows while each a vector serves 4 columns. Used for small
// M, where the rows of b are read once and splitting them first (below) would double the traffic.
void avx2_tile(const Operands& p, const Epilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = 2, NR = 4;
  for (int64_t m = m0; m < m1; m += MR) {
    const int64_t mr = std::min<int64_t>(MR, m1 - m);
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) {
      if (mr == MR) avx2_block<MR, NR>(p, e, m, n);
      else avx2_block<1, NR>(p, e, m, n);
    }
    for (; n < n1; ++n) {
      if (mr == MR) avx2_block<MR, 1>(p, e, m, n);
      else avx2_block<1, 1>(p, e, m, n);
    }
  }
}

// Large M: every row is reused many times, so rows are first split into nibble planes (per
// 256-bit step: 32 bytes of low nibbles, then 32 of high nibbles; twice the packed size): all
// of a once per call, b one tile of kTileN rows at a time, per thread, reused by the tiles of a
// that follow (tiles run n-major). The pair loop is then xor, xor, vpshufb, vpshufb, add, add:
// 6 operations per 256 bits instead of 8, bound by Zen 3's vector pipes (two of them shuffle).
// K is walked in blocks of kSplitSteps steps so a tile's planes stay in L2 and the byte
// counters never overflow (31 * 8 < 256). The 3 x 2 block runs at ~1.37 TSC cycles per 256-bit
// pair with K = 4096 (16 steps, one reduction per pair), ~1.28 over 31 steps; a scalar popcnt
// stream interleaved with it (to use the integer pipes too) measured slower: the core's
// dispatch width, not the vector pipes, is then the limit.
constexpr int64_t kSplitSteps = 31;

// Rows [r0, r1) of src into planes: row r, step s at dst + (r * steps + s) * 64.
LOWBIT_AVX2 void split_rows(const uint32_t* src, int64_t W, int64_t r0, int64_t r1, int64_t steps, uint8_t* dst) {
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t s = 0; s < steps; ++s) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * W + 8 * s));
      uint8_t* out = dst + (r * steps + s) * 64;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_and_si256(v, low4));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
    }
}

// MR rows of a x NR rows of b over `steps` steps; ld_planes: bytes from one row's planes to the next.
template <int MR, int NR>
LOWBIT_AVX2 void split_block(const uint8_t* as, const uint8_t* bs, int64_t ld_planes, int64_t steps, uint32_t* counts,
                             int64_t ld) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                         2, 3, 2, 3, 3, 4);
  __m256i bytes[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) bytes[i][j] = _mm256_setzero_si256();
  for (int64_t s = 0; s < steps; ++s) {
    __m256i alo[MR], ahi[MR];
    for (int i = 0; i < MR; ++i) {
      alo[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(as + i * ld_planes + s * 64));
      ahi[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(as + i * ld_planes + s * 64 + 32));
    }
    for (int j = 0; j < NR; ++j) {
      const __m256i blo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bs + j * ld_planes + s * 64));
      const __m256i bhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bs + j * ld_planes + s * 64 + 32));
      for (int i = 0; i < MR; ++i) {
        bytes[i][j] = _mm256_add_epi8(bytes[i][j], _mm256_shuffle_epi8(table, _mm256_xor_si256(alo[i], blo)));
        bytes[i][j] = _mm256_add_epi8(bytes[i][j], _mm256_shuffle_epi8(table, _mm256_xor_si256(ahi[i], bhi)));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const __m256i w = _mm256_sad_epu8(bytes[i][j], _mm256_setzero_si256());
      __m128i s = _mm_add_epi64(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
      counts[i * ld + j] += static_cast<uint32_t>(_mm_cvtsi128_si64(s));
    }
}

// Edge blocks (fewer than MR rows of a or NR of b) with the largest register block that fits.
template <int MR, int NR>
LOWBIT_AVX2 void split_block_edge(int64_t mr, int64_t nr, const uint8_t* as, const uint8_t* bs, int64_t ld_planes,
                                  int64_t steps, uint32_t* counts, int64_t ld) {
  if (mr == MR && nr == NR) return split_block<MR, NR>(as, bs, ld_planes, steps, counts, ld);
  for (int64_t i = 0; i < mr; ++i) {
    if (nr == 2) split_block<1, 2>(as + i * ld_planes, bs, ld_planes, steps, counts + i * ld, ld);
    else split_block<1, 1>(as + i * ld_planes, bs, ld_planes, steps, counts + i * ld, ld);
  }
}

// One output tile from the planes of a (all rows) and b (rows n0..n1 of this tile at b_planes).
// counts: kTileM x kTileN per thread.
void avx2_split_tile(const Operands& p, const Epilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                     const uint8_t* a_planes, const uint8_t* b_planes, uint32_t* counts) {
  const int64_t rows_a = m1 - m0, rows_b = n1 - n0, steps = p.full_words / 8, ld_planes = steps * 64;
  std::memset(counts, 0, sizeof(uint32_t) * kTileM * kTileN);
  // MR = 3, NR = 2: 6 byte counters + 6 a planes + 2 b planes + table = 15 ymm registers.
  constexpr int MR = 3, NR = 2;
  for (int64_t s0 = 0; s0 < steps; s0 += kSplitSteps) {
    const int64_t ks = std::min(kSplitSteps, steps - s0);
    for (int64_t i = 0; i < rows_a; i += MR) {
      const int64_t mr = std::min<int64_t>(MR, rows_a - i);
      const uint8_t* ai = a_planes + (m0 + i) * ld_planes + s0 * 64;
      for (int64_t j = 0; j < rows_b; j += NR) {
        const int64_t nr = std::min<int64_t>(NR, rows_b - j);
        const uint8_t* bj = b_planes + j * ld_planes + s0 * 64;
        split_block_edge<MR, NR>(mr, nr, ai, bj, ld_planes, ks, counts + i * kTileN + j, kTileN);
      }
    }
  }
  finish_rows(p, e, m0, rows_a, n0, rows_b, counts, kTileN, 8 * steps);
}
#endif

// ----------------------------------------------------------------------------- AVX-512 VPOPCNTDQ
#if LOWBIT_HAVE_AVX2_KERNELS
// On CPUs with AVX512-VPOPCNTDQ a 512-bit step of one pair is xor, vpopcntq, add: three operations
// where the split-plane AVX2 loop needs about six per 256 bits. Register-blocked 4 x 4 (16 u64x8
// accumulators, 4 rows of a, one of b at a time, of 32 zmm), for every M: no planes to split.
// Measured on the 2-vCPU AMX Xeon VM (binary_mm, N = K = 4096, 2 threads, 1 GiB read before each
// call, median of 11, two runs, ms), this loop vs the AVX2 ones: M = 1 0.22 / 0.25, 16 0.40 /
// 0.73-0.75, 256 4.4-4.5 / 6.9-7.2; with the tile-wide epilogue below, binary_mm M = 256 3.4 ms
// (8.3x fp32 torch.mm). LOWBIT_BINARY_LOOP=avx2 keeps the AVX2 loops (read once).
#define LOWBIT_AVX512_POPCNT __attribute__((target("avx512f,avx512vpopcntdq,avx2,fma,f16c,popcnt")))
// GCC 12's own avx512fintrin.h trips these in _mm512_reduce_add_epi64 (_mm512_undefined_*).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Popcounts over the full 512-bit steps into counts[i * ld + j]; the tile's epilogue follows.
template <int MR, int NR>
LOWBIT_AVX512_POPCNT __attribute__((noinline)) void avx512_block(const Operands& p, int64_t m0, int64_t n0,
                                                                  uint32_t* counts, int64_t ld) {
  const int64_t steps = p.full_words / 16;  // 512-bit steps inside K
  __m512i acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t s = 0; s < steps; ++s) {
    __m512i av[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) av[i] = _mm512_loadu_si512(p.a + (m0 + i) * p.W + 16 * s);
    // The rows of b cpu::kPrefetchTilesAhead blocks ahead, as in avx2_block (one line per step).
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(p.b + (n0 + j + cpu::kPrefetchTilesAhead * NR) * p.W + 16 * s), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512i bv = _mm512_loadu_si512(p.b + (n0 + j) * p.W + 16 * s);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(av[i], bv)));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) counts[i * ld + j] = static_cast<uint32_t>(_mm512_reduce_add_epi64(acc[i][j]));
}
#pragma GCC diagnostic pop

template <int MR>
void avx512_rows(const Operands& p, int64_t m, int64_t n0, int64_t n1, uint32_t* counts, int64_t ld) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) avx512_block<MR, 4>(p, m, n, counts + (n - n0), ld);
  for (; n < n1; ++n) avx512_block<MR, 1>(p, m, n, counts + (n - n0), ld);
}

// One tile's counts, then one finish_rows over the whole tile: the per-element epilogue (the
// scaled op's float rounding) cost more than the popcounts at M = 256 (9.5 vs 4.3 ms).
void avx512_tile(const Operands& p, const Epilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  alignas(64) uint32_t counts[kTileM * kTileN];
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) avx512_rows<4>(p, m, n0, n1, counts + (m - m0) * kTileN, kTileN);
  switch (m1 - m) {
    case 3: avx512_rows<3>(p, m, n0, n1, counts + (m - m0) * kTileN, kTileN); break;
    case 2: avx512_rows<2>(p, m, n0, n1, counts + (m - m0) * kTileN, kTileN); break;
    case 1: avx512_rows<1>(p, m, n0, n1, counts + (m - m0) * kTileN, kTileN); break;
    default: break;
  }
  finish_rows(p, e, m0, m1 - m0, n0, n1 - n0, counts, kTileN, 16 * (p.full_words / 16));
}

#endif  // LOWBIT_HAVE_AVX2_KERNELS

enum class Loop { kAvx512Popcnt, kAvx2, kPopcnt64Hw, kPopcnt64Generic };

// LOWBIT_BINARY_LOOP=popcnt64 picks the 64-bit popcnt loop on an AVX2 machine (benchmarks compare
// the two); LOWBIT_CPU_ISA=scalar forces the non-AVX2 paths like every other family.
Loop pick_loop() {
  static const Loop loop = [] {
#if LOWBIT_HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    const bool popcnt = __builtin_cpu_supports("popcnt");
    const char* forced = std::getenv("LOWBIT_BINARY_LOOP");
    const bool force64 = forced != nullptr && std::strcmp(forced, "popcnt64") == 0;
    const bool force_avx2 = forced != nullptr && std::strcmp(forced, "avx2") == 0;
    if (cpu::has_avx512f() && __builtin_cpu_supports("avx512vpopcntdq") && !force64 && !force_avx2)
      return Loop::kAvx512Popcnt;
    if (cpu::has_avx2() && !force64) return Loop::kAvx2;
    return popcnt ? Loop::kPopcnt64Hw : Loop::kPopcnt64Generic;
#else
    return Loop::kPopcnt64Generic;
#endif
  }();
  return loop;
}

// Rows of a from which the split-plane loop pays for its extra pass over the rows.
constexpr int64_t kSplitMinM = 8;

// Per-thread scratch of the split loop: the planes of one tile of b, then its counts.
int64_t thread_scratch_bytes(int64_t steps) { return kTileN * steps * 64 + kTileM * kTileN * 4; }

// scratch (split loop only): the planes of a, then thread_scratch_bytes per thread.
void run_gemm(const Operands& p, const Epilogue& e, uint8_t* scratch) {
  const int64_t m_tiles = (p.M + kTileM - 1) / kTileM, n_tiles = (p.N + kTileN - 1) / kTileN;
  const Loop loop = pick_loop();
  const bool split = loop == Loop::kAvx2 && scratch != nullptr && p.full_words >= 8;
  // Tiles in n-major order: a thread's consecutive tiles share b rows. A second thread only
  // joins for at least 256K word pairs (1 MiB of b at M = 1): waking it costs microseconds on
  // an idle machine and milliseconds on a loaded one (binary_quantize of 256 x 4096 took 33 ms
  // on 2 threads, 0.14 ms on 1, under load), but from about 1 MiB the weight stream is worth two
  // cores. Measured quiet, N = K = 4096, caches evicted before each call, min/median of 41: one
  // thread (the old 16M-pair threshold) M = 1 0.29-0.31 / 0.33-0.35 ms, two 0.17-0.18 / 0.22;
  // M = 16 0.93 / 1.02-1.03 ms vs 0.60 / 0.67-0.73.
  const int64_t tile_words = std::min(p.M, kTileM) * std::min(p.N, kTileN) * p.W;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, tile_words));
  const int64_t steps = p.full_words / 8;
  uint8_t* a_planes = scratch;
#if LOWBIT_HAVE_AVX2_KERNELS
  // 64 bytes per 256 bits of a: 256 KiB for M = 256, K = 4096, one pass (~0.1 ms on one thread).
  if (split) split_rows(p.a, p.W, 0, p.M, steps, a_planes);
#endif
  at::parallel_for(0, m_tiles * n_tiles, grain, [&](int64_t t0, int64_t t1) {
    uint8_t* mine = split ? scratch + p.M * steps * 64 + at::get_thread_num() * thread_scratch_bytes(steps) : nullptr;
    int64_t split_nt = -1;  // the tile of b whose planes are in `mine`
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nt = t / m_tiles, mt = t % m_tiles;
      const int64_t m0 = mt * kTileM, m1 = std::min(p.M, m0 + kTileM);
      const int64_t n0 = nt * kTileN, n1 = std::min(p.N, n0 + kTileN);
      switch (loop) {
#if LOWBIT_HAVE_AVX2_KERNELS
        case Loop::kAvx512Popcnt: avx512_tile(p, e, m0, m1, n0, n1); break;
        case Loop::kAvx2:
          if (split) {
            if (nt != split_nt) {
              split_rows(p.b + n0 * p.W, p.W, 0, n1 - n0, steps, mine);
              split_nt = nt;
            }
            avx2_split_tile(p, e, m0, m1, n0, n1, a_planes, mine,
                            reinterpret_cast<uint32_t*>(mine + kTileN * steps * 64));
          } else {
            avx2_tile(p, e, m0, m1, n0, n1);
          }
          break;
        case Loop::kPopcnt64Hw: popcnt64_tile<true>(p, e, m0, m1, n0, n1); break;
#endif
        default: popcnt64_tile<false>(p, e, m0, m1, n0, n1); break;
      }
    }
  });
}

// Scratch of the split loop, allocated outside the parallel region. The per-thread parts are
// indexed by at::get_thread_num(): a call from inside a parallel region runs inline on a thread
// whose number may exceed get_num_threads() there.
at::Tensor gemm_scratch(const at::Tensor& a, int64_t K) {
  if (a.size(0) < kSplitMinM || pick_loop() != Loop::kAvx2) return at::Tensor();
  const int64_t slots = std::max<int64_t>(at::get_num_threads(), at::get_thread_num() + 1);
  const int64_t steps = K / bl::kWordBits / 8;
  return at::empty({a.size(0) * steps * 64 + slots * thread_scratch_bytes(steps) + 64}, a.options().dtype(at::kByte));
}

Operands operands(const at::Tensor& a, const at::Tensor& b, int64_t K) {
  Operands p;
  p.a = reinterpret_cast<const uint32_t*>(a.const_data_ptr<int32_t>());
  p.b = reinterpret_cast<const uint32_t*>(b.const_data_ptr<int32_t>());
  p.M = a.size(0);
  p.N = b.size(0);
  p.K = K;
  p.W = a.size(1);
  p.full_words = K / bl::kWordBits;
  return p;
}

at::Tensor binary_mm_cpu(const at::Tensor& a, const at::Tensor& b, int64_t K) {
  check_binary_mm("binary_mm", a, b, K);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  Epilogue e{};
  e.K = K;
  e.N = b.size(0);
  e.dot_out = out.mutable_data_ptr<int32_t>();
  at::Tensor scratch = gemm_scratch(a, K);
  run_gemm(operands(ac, bc, K), e, scratch.defined() ? scratch.mutable_data_ptr<uint8_t>() : nullptr);
  return out;
}

at::Tensor binary_scaled_mm_cpu(const at::Tensor& a, const at::Tensor& b, int64_t K, const at::Tensor& scale_a,
                                const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                                std::optional<c10::ScalarType> out_dtype) {
  const c10::ScalarType out_type =
      check_binary_scaled_mm("binary_scaled_mm", a, b, K, scale_a, scale_b, bias, out_dtype);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const at::Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(out_type));
  Epilogue e{};
  e.K = K;
  e.N = b.size(0);
  e.dot_out = nullptr;
  e.out = out.mutable_data_ptr();
  e.out_type = out_type;
  e.scale_a = sa.const_data_ptr<float>();
  e.scale_b = sb.const_data_ptr<float>();
  e.scale_a_per_row = sa.numel() > 1;
  e.scale_b_per_col = sb.numel() > 1;
  e.bias = b32.defined() ? b32.const_data_ptr<float>() : nullptr;
  at::Tensor scratch = gemm_scratch(a, K);
  run_gemm(operands(ac, bc, K), e, scratch.defined() ? scratch.mutable_data_ptr<uint8_t>() : nullptr);
  return out;
}

// ----------------------------------------------------------------------------- quantize
// Sign bits (1 = +1: !(x < 0), so 0, -0.0 and NaN give +1) and sum |x| per row; the scale is the
// sum over K in fp32 (the reference's summation order is not part of the spec).
template <typename T>
void quantize_row_scalar(const T* x, int64_t sk, int64_t K, uint32_t* words, float* scale) {
  const int64_t W = bl::num_words(K);
  float sum = 0.0f;
  for (int64_t w = 0; w < W; ++w) {
    uint32_t bits = 0;
    for (int64_t k = w * 32; k < std::min(K, (w + 1) * 32); ++k) {
      const float v = static_cast<float>(x[k * sk]);
      bits |= uint32_t(!(v < 0.0f)) << (k - w * 32);
      sum += std::fabs(v);
    }
    words[w] = bits;
  }
  *scale = sum / static_cast<float>(K);
}

#if LOWBIT_HAVE_AVX2_KERNELS
LOWBIT_AVX2_INLINE_B __m256 load8f(const float* p) { return _mm256_loadu_ps(p); }
LOWBIT_AVX2_INLINE_B __m256 load8f(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
LOWBIT_AVX2_INLINE_B __m256 load8f(const c10::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}

// Contiguous rows: 8 lanes per compare, movemask gives the lane bits LSB-first as packed.
template <typename T>
LOWBIT_AVX2 void quantize_row_avx2(const T* x, int64_t K, uint32_t* words, float* scale) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 sum = _mm256_setzero_ps();
  const int64_t full = K / 32;
  for (int64_t w = 0; w < full; ++w) {
    uint32_t neg = 0;
    for (int q = 0; q < 4; ++q) {
      const __m256 v = load8f(x + w * 32 + 8 * q);
      neg |= uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ))) << (8 * q);
      sum = _mm256_add_ps(sum, _mm256_and_ps(v, abs_mask));
    }
    words[w] = ~neg;
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  float total = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
  if (full * 32 < K) {
    uint32_t bits = 0;
    for (int64_t k = full * 32; k < K; ++k) {
      const float v = static_cast<float>(x[k]);
      bits |= uint32_t(!(v < 0.0f)) << (k - full * 32);
      total += std::fabs(v);
    }
    words[full] = bits;
  }
  *scale = total / static_cast<float>(K);
}
#endif

template <typename T>
void quantize_rows(const at::Tensor& x, uint32_t* words, float* scale) {
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1), W = bl::num_words(K);
  const T* src = x.const_data_ptr<T>();
  const bool avx2 = cpu::has_avx2() && sk == 1;
  // ~4M elements per thread at least (about 0.5 ms): below that a second thread costs more than
  // it saves (see run_gemm).
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 22) / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#if LOWBIT_HAVE_AVX2_KERNELS
      if (avx2) {
        quantize_row_avx2<T>(src + m * sm, K, words + m * W, scale + m);
        continue;
      }
#endif
      quantize_row_scalar<T>(src + m * sm, sk, K, words + m * W, scale + m);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> binary_quantize_cpu(const at::Tensor& x) {
  check_binary_quantize("binary_quantize", x);
  const int64_t M = x.size(0), W = bl::num_words(x.size(1));
  at::Tensor packed = at::empty({M, W}, x.options().dtype(at::kInt));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  uint32_t* words = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr<int32_t>());
  float* s = scale.mutable_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kHalf: quantize_rows<c10::Half>(x, words, s); break;
    case at::kBFloat16: quantize_rows<c10::BFloat16>(x, words, s); break;
    default: quantize_rows<float>(x, words, s); break;
  }
  return {packed, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("binary_quantize", &binary_quantize_cpu);
  m.impl("binary_mm", &binary_mm_cpu);
  m.impl("binary_scaled_mm", &binary_scaled_mm_cpu);
}

}  // namespace lowbit
