// AMX tiles for lowbit's own CPU kernels: the process-wide permission Linux asks for before any
// thread may touch the tile registers, and the tile configuration every kernel loads first.
// Kernels that use AMX compile their bodies between LOWBIT_AMX_CODE_BEGIN and _END and dispatch
// through use_amx_bf16(); amx_bf16_ready() is false on CPUs without AMX-BF16 (or without the
// AVX-512 BW, BF16 and VBMI2 the decoders use), on Linux kernels older than 5.16 (no permission
// call), and under LOWBIT_CPU_ISA=avx2 (has_avx512f is false then, and every AMX CPU has
// AVX-512F), so the callers' other paths stay reachable in tests. Also here: the tile loop the families share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include <sys/syscall.h>
#include <unistd.h>

#include "lowbit/cpu/isa.h"

// Code that runs on AMX tiles is compiled between these two: the ISA lowbit's AMX kernels need
// (AMX, and AVX-512 F/BW/VL/BF16/VBMI2 for their decoders), and GCC 12's own avx512fintrin.h
// warnings (_mm512_undefined_* in its conversions and reductions) silenced there.
#define LOWBIT_AMX_CODE_BEGIN                                                                 \
  _Pragma("GCC push_options")                                                                 \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,amx-tile,amx-bf16,avx2,fma,f16c,bmi,bmi2\")") \
  _Pragma("GCC diagnostic push")                                                              \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                               \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define LOWBIT_AMX_CODE_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")

namespace lowbit::cpu {

// One tile configuration (palette 1): per tile register, its rows and bytes per row. Loaded by
// each thread before its first tile instruction (the configuration is per thread, and code in
// between, oneDNN's included, may load its own).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int nrows, int row_bytes) {
    rows[tile] = static_cast<uint8_t>(nrows);
    bytes_per_row[tile] = static_cast<uint16_t>(row_bytes);
  }
};
static_assert(sizeof(TileConfig) == 64, "the AMX tile configuration is 64 bytes");

// Linux grants the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM); torch's
// oneDNN asks too when it first runs on AMX, and asking twice is harmless.
inline bool amx_bf16_ready() {
  static const bool value = [] {
#if LOWBIT_HAVE_AVX2_KERNELS && defined(SYS_arch_prctl)
    // Every AMX CPU so far has AVX512-BW, -BF16 and -VBMI2 too; the kernels use them to decode.
    if (!has_amx_bf16() || !has_avx512f() || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512vbmi2"))
      return false;
    constexpr int kArchReqXcompPerm = 0x1023;
    constexpr int kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return value;
}

// Whether M rows of bf16 x take a family's AMX kernel: min_m..max_m rows where AMX-BF16 is ready.
// The family's switch env_name =0 never, =1 for every M; LOWBIT_DECODED_GEMM=1 (the decoded-GEMM
// route forced) also turns it off. Read per call, so tests reach every path on an AMX machine.
inline bool use_amx_bf16(int64_t M, int64_t min_m, int64_t max_m, const char* env_name) {
  if (!amx_bf16_ready()) return false;
  const char* env = std::getenv(env_name);
  if (env != nullptr && (env[0] == '0' || env[0] == '1')) return env[0] == '1';
  const char* decoded = std::getenv("LOWBIT_DECODED_GEMM");
  if (decoded != nullptr && decoded[0] == '1') return false;
  return M >= min_m && M <= max_m;
}

// Whether amx_weight_gemm decodes a weight tile once for all passes over x (more than 64 rows of
// x): LOWBIT_AMX_STRIP=0 turns it off (to measure it, and so tests reach both loops).
inline bool amx_strip_enabled() {
  const char* env = std::getenv("LOWBIT_AMX_STRIP");
  return env == nullptr || env[0] != '0';
}

// ----------------------------------------------------------------------------- weight-only GEMM
// out^T [N, M] = W [N, K] x^T [K, M] on AMX-BF16 tiles, for weights that a family decodes to bf16
// itself: the full weight is never materialized, only 16 rows x 32 columns per tile. W is the A
// operand (16 weight rows per tile, row for row as they decode), x^T the B operand (16 rows of x
// per tile, pair-interleaved once per call by x_to_amx_b), and the product accumulates in fp32
// tiles: 4 of them, so up to 64 rows of x share each decoded weight tile; more rows take further
// passes over it (then in L1/L2). AMX treats subnormal bf16 inputs and fp32 results as zero
// (magnitudes below 1.2e-38).
constexpr int kAmxRows = 16;                            // weight rows per tile (A and C rows)
constexpr int kAmxCols = 16;                            // rows of x per tile (B and C columns)
constexpr int kAmxK = 32;                               // columns of K per tile (bf16)
constexpr int64_t kAmxBTileWords = kAmxK * kAmxCols;    // one B tile: 16 pair rows x 16 x 2
constexpr int kAmxMaxMT = 4;                            // accumulator tiles (of 8 tile registers)
// 32-column blocks decoded per step. A tile load must wait until the stores of its rows have left
// the store buffer, so the tiles multiply step s - 1 while step s decodes (two buffers):
// decoding one block and multiplying it at once ran at about a third of the speed (int4).
constexpr int64_t kAmxStep = 8;

using AmxStepBuffer = uint16_t[kAmxStep][kAmxRows][kAmxK];

// bf16 x [M, K] (any strides) -> B tiles: per 16 rows of x and 32-column block, [16 pair rows][16
// rows of x][2] bf16, where word w (of 32) of a decoded weight row meets column column_of_word[w]
// of the block; zeros past M and K.
inline at::Tensor x_to_amx_b(const at::Tensor& x, int64_t nblocks, const int (&column_of_word)[kAmxK]) {
  const int64_t M = x.size(0), K = x.size(1), sm = x.stride(0), sk = x.stride(1);
  const int64_t mtiles = (M + kAmxCols - 1) / kAmxCols;
  at::Tensor out = at::zeros({mtiles, nblocks, kAmxK / 2, kAmxCols, 2}, x.options().dtype(at::kBFloat16));
  c10::BFloat16* dst = out.mutable_data_ptr<c10::BFloat16>();
  const c10::BFloat16* src = x.const_data_ptr<c10::BFloat16>();
  int64_t offset[kAmxK];  // where column c of a block goes, within the block's tile
  for (int w = 0; w < kAmxK; ++w) offset[column_of_word[w]] = (w / 2) * kAmxCols * 2 + w % 2;
  for (int64_t m = 0; m < M; ++m) {
    c10::BFloat16* tiles = dst + (m / kAmxCols) * nblocks * kAmxBTileWords + (m % kAmxCols) * 2;
    const c10::BFloat16* row = src + m * sm;
    for (int64_t b = 0; b < nblocks; ++b) {
      c10::BFloat16* tile = tiles + b * kAmxBTileWords;
      const int64_t width = std::min<int64_t>(kAmxK, K - b * kAmxK);
      for (int64_t c = 0; c < width; ++c) tile[offset[c]] = row[(b * kAmxK + c) * sk];
    }
  }
  return out;
}

#if LOWBIT_HAVE_AVX2_KERNELS
LOWBIT_AMX_CODE_BEGIN

// Blocks b0..b1 of a decoded weight tile (block b0 at a0, blocks [16 rows][32] words apart)
// times MT tiles of x^T from x0 (16-row tiles bstride words apart), into tiles 0..MT-1.
template <int MT>
inline void amx_multiply_blocks(const uint16_t* x0, int64_t bstride, int64_t b0, int64_t b1, const uint16_t* a0) {
  for (int64_t b = b0; b < b1; ++b) {
    _tile_loadd(4, a0 + (b - b0) * kAmxRows * kAmxK, kAmxK * 2);
    const uint16_t* xj = x0 + b * kAmxBTileWords;
    _tile_loadd(5, xj, kAmxCols * 4);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (MT > 1) {
      _tile_loadd(6, xj + bstride, kAmxCols * 4);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (MT > 2) {
      _tile_loadd(7, xj + 2 * bstride, kAmxCols * 4);
      _tile_dpbf16ps(2, 4, 7);
    }
    if constexpr (MT > 3) {
      _tile_loadd(5, xj + 3 * bstride, kAmxCols * 4);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
}

template <int MT>
inline void amx_zero_accumulators() {
  _tile_zero(0);
  if constexpr (MT > 1) _tile_zero(1);
  if constexpr (MT > 2) _tile_zero(2);
  if constexpr (MT > 3) _tile_zero(3);
}

// Stores accumulator tiles 0..MT-1 to c one by one, each handed to finish(t, c).
template <int MT, typename Finish>
inline void amx_finish_accumulators(float* c, Finish& finish) {
  for (int t = 0; t < MT; ++t) {
    switch (t) {
      case 0: _tile_stored(0, c, kAmxCols * 4); break;
      case 1: _tile_stored(1, c, kAmxCols * 4); break;
      case 2: _tile_stored(2, c, kAmxCols * 4); break;
      default: _tile_stored(3, c, kAmxCols * 4); break;
    }
    finish(t, static_cast<const float*>(c));
  }
}

// Weight rows n0 .. n0 + rows (rows <= 16; the rest of the tile stays zero) against MT tiles of 16
// rows of x from m0. decode(n0, rows, b0, b1, AmxStepBuffer&) writes blocks b0..b1 of those rows,
// block b0 + j at [j][row]; step_end(b0) is where a step from block b0 must end (at most kAmxStep
// blocks on, and at a boundary the family needs, as int4's groups). finish(t, c) takes the fp32
// product of the rows with x tile t, c[r * 16 + m] for weight row n0 + r and row of x m0 + 16 t + m.
// Tiles: 0..MT-1 accumulate, 4 holds W, 5-7 hold x^T.
template <int MT, typename Decode, typename StepEnd, typename Finish>
void amx_weight_tile(int64_t nblocks, const uint16_t* xb, int64_t m0, int64_t n0, int rows, AmxStepBuffer (&a)[2],
                     float* c, Decode& decode, StepEnd& step_end, Finish& finish) {
  if (rows < kAmxRows) std::memset(a, 0, sizeof(a));
  amx_zero_accumulators<MT>();
  const int64_t bstride = nblocks * kAmxBTileWords;  // words between x's 16-row tiles
  const uint16_t* x0 = xb + (m0 / kAmxCols) * bstride;
  int64_t pending_b0 = 0, pending_b1 = 0;
  int buf = 0;
  for (int64_t b0 = 0; b0 < nblocks;) {
    const int64_t b1 = step_end(b0);
    decode(n0, rows, b0, b1, a[buf]);
    amx_multiply_blocks<MT>(x0, bstride, pending_b0, pending_b1, &a[buf ^ 1][0][0][0]);
    pending_b0 = b0;
    pending_b1 = b1;
    buf ^= 1;
    b0 = b1;
  }
  amx_multiply_blocks<MT>(x0, bstride, pending_b0, pending_b1, &a[buf ^ 1][0][0][0]);
  amx_finish_accumulators<MT>(c, finish);
}

// More than kAmxMaxMT tiles of x: the tile's 16 weight rows are decoded once, whole, into strip
// ([blocks][16 rows][32] words, L2-resident: 128 KiB at K = 4096) and every pass of up to 64 rows
// of x multiplies from there, instead of each pass decoding them again (the same steps in the
// same order, so the same bits). Measured on the 2-vCPU AMX Xeon VM (N = K = 4096, bf16 x, 2
// threads, 1 GiB read before each call, median of 7, ms), decoding per pass vs once: sparse24
// M = 128 4.90 / 4.36, 256 11.3 / 10.2, 512 26.3 / 21.9, 1024 54.8 / 43.0; int4 (forced) 256 9.85
// / 9.34, 512 24.1 / 21.5, 1024 49.2 / 42.7. Even so, at large M the loop moves 5 tiles from L2
// (1 weight, 4 x) per 4 multiplies, and oneDNN's bf16 GEMM does about twice the FLOP/s (bf16
// F.linear: 5.9, 10.4, 17.7 ms), which is why int4 hands M > 256 to decoded panels.
template <typename Decode, typename StepEnd, typename Finish>
void amx_weight_strip(int64_t M, int64_t nblocks, const uint16_t* xb, int64_t n0, int rows, uint16_t* strip,
                      float* c, Decode& decode, StepEnd& step_end, Finish& finish) {
  constexpr int64_t kBlockWords = kAmxRows * kAmxK;
  if (rows < kAmxRows) std::memset(strip, 0, sizeof(uint16_t) * (nblocks + kAmxStep) * kBlockWords);
  for (int64_t b0 = 0; b0 < nblocks;) {
    const int64_t b1 = step_end(b0);
    // Block b0 + j at [j]: the strip holds kAmxStep blocks of slack past its end for this view.
    decode(n0, rows, b0, b1, *reinterpret_cast<AmxStepBuffer*>(strip + b0 * kBlockWords));
    b0 = b1;
  }
  const int64_t bstride = nblocks * kAmxBTileWords;
  for (int64_t m0 = 0; m0 < M; m0 += kAmxMaxMT * kAmxCols) {
    const uint16_t* x0 = xb + (m0 / kAmxCols) * bstride;
    auto tile_done = [&](int mt, const float* cc) {
      const int64_t mt0 = m0 + mt * kAmxCols;
      finish(mt0, n0, rows, std::min<int64_t>(kAmxCols, M - mt0), cc);
    };
    switch (std::min<int64_t>(kAmxMaxMT, (M - m0 + kAmxCols - 1) / kAmxCols)) {
      case 1:
        amx_zero_accumulators<1>();
        amx_multiply_blocks<1>(x0, bstride, 0, nblocks, strip);
        amx_finish_accumulators<1>(c, tile_done);
        break;
      case 2:
        amx_zero_accumulators<2>();
        amx_multiply_blocks<2>(x0, bstride, 0, nblocks, strip);
        amx_finish_accumulators<2>(c, tile_done);
        break;
      case 3:
        amx_zero_accumulators<3>();
        amx_multiply_blocks<3>(x0, bstride, 0, nblocks, strip);
        amx_finish_accumulators<3>(c, tile_done);
        break;
      default:
        amx_zero_accumulators<4>();
        amx_multiply_blocks<4>(x0, bstride, 0, nblocks, strip);
        amx_finish_accumulators<4>(c, tile_done);
        break;
    }
  }
}

// The whole product, one at::parallel_for over tiles of 16 weight rows. finish(m0, n0, rows,
// mrows, c): c[r * 16 + m] = sum_k x[m0 + m, k] * W[n0 + r, k] for r < rows, m < mrows.
template <typename Decode, typename StepEnd, typename Finish>
void amx_weight_gemm(int64_t M, int64_t N, int64_t nblocks, const at::Tensor& xb, Decode&& decode, StepEnd&& step_end,
                     Finish&& finish) {
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<c10::BFloat16>());
  const bool strip = M > kAmxMaxMT * kAmxCols && amx_strip_enabled();
  at::parallel_for(0, (N + kAmxRows - 1) / kAmxRows, 1, [&](int64_t t0, int64_t t1) {
    TileConfig cfg;
    for (int t = 0; t < 4; ++t) cfg.set(t, kAmxRows, kAmxCols * 4);   // C: fp32 [16 weight rows, 16 rows of x]
    cfg.set(4, kAmxRows, kAmxK * 2);                                    // A: bf16 [16 weight rows, 32]
    for (int t = 5; t < 8; ++t) cfg.set(t, kAmxK / 2, kAmxCols * 4);   // B: bf16 pairs [16, 16 rows of x, 2]
    _tile_loadconfig(&cfg);
    alignas(64) AmxStepBuffer a[2];
    alignas(64) float c[kAmxRows * kAmxCols];
    std::unique_ptr<uint16_t[], decltype(&std::free)> strip_words(nullptr, &std::free);
    if (strip) {
      const size_t bytes = sizeof(uint16_t) * (nblocks + kAmxStep) * kAmxRows * kAmxK;
      strip_words.reset(static_cast<uint16_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      TORCH_CHECK(strip_words, "lowbit: out of memory for an AMX weight strip");
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kAmxRows;
      const int rows = static_cast<int>(std::min<int64_t>(kAmxRows, N - n0));
      if (strip) {
        amx_weight_strip(M, nblocks, x, n0, rows, strip_words.get(), c, decode, step_end, finish);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kAmxMaxMT * kAmxCols) {
        auto tile_done = [&](int mt, const float* cc) {
          const int64_t mt0 = m0 + mt * kAmxCols;
          finish(mt0, n0, rows, std::min<int64_t>(kAmxCols, M - mt0), cc);
        };
        switch (std::min<int64_t>(kAmxMaxMT, (M - m0 + kAmxCols - 1) / kAmxCols)) {
          case 1: amx_weight_tile<1>(nblocks, x, m0, n0, rows, a, c, decode, step_end, tile_done); break;
          case 2: amx_weight_tile<2>(nblocks, x, m0, n0, rows, a, c, decode, step_end, tile_done); break;
          case 3: amx_weight_tile<3>(nblocks, x, m0, n0, rows, a, c, decode, step_end, tile_done); break;
          default: amx_weight_tile<4>(nblocks, x, m0, n0, rows, a, c, decode, step_end, tile_done); break;
        }
      }
    }
    _tile_release();
  });
}

// out = epilogue(x @ decode(W).T) for weights of one byte each, W [N, K] row-major (int8, fp8):
// decode32(__m256i) turns 32 weight bytes into 32 bf16 words in the same column order (x stays in
// its own). epilogue(acc, m0, m1, n0, n1) takes the fp32 product as acc[(m - m0) * 16 + (n - n0)].
template <typename Decode32, typename Epilogue>
void amx_byte_weight_gemm(const at::Tensor& x, const uint8_t* w, int64_t N, int64_t K, Decode32&& decode32,
                          Epilogue&& epilogue) {
  const int64_t M = x.size(0), nblocks = (K + kAmxK - 1) / kAmxK;
  int column_of_word[kAmxK];
  for (int i = 0; i < kAmxK; ++i) column_of_word[i] = i;
  const at::Tensor xb = x_to_amx_b(x, nblocks, column_of_word);
  auto step_end = [&](int64_t b0) { return std::min(nblocks, b0 + kAmxStep); };
  auto decode = [&](int64_t n0, int rows, int64_t b0, int64_t b1, AmxStepBuffer& a) {
    for (int r = 0; r < rows; ++r) {
      const uint8_t* row = w + (n0 + r) * K;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t k0 = b * kAmxK, width = std::min<int64_t>(kAmxK, K - k0);
        if (b % 2 == 0)  // the next tile's row, one 64-byte line ahead
          _mm_prefetch(reinterpret_cast<const char*>(row + kAmxRows * K + k0), _MM_HINT_T0);
        // A partial last block reads only its own bytes (masked: no read past the weight).
        const __m256i v = width == kAmxK
                              ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0))
                              : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t(1) << width) - 1), row + k0);
        _mm512_store_si512(a[b - b0][r], decode32(v));
      }
    }
  };
  auto finish = [&](int64_t m0, int64_t n0, int rows, int64_t mrows, const float* c) {
    alignas(64) float acc[kAmxCols * kAmxRows];  // [m][n]
    for (int64_t m = 0; m < mrows; ++m)
      for (int r = 0; r < rows; ++r) acc[m * kAmxRows + r] = c[r * kAmxCols + m];
    epilogue(static_cast<const float*>(acc), m0, m0 + mrows, n0, n0 + rows);
  };
  amx_weight_gemm(M, N, nblocks, xb, decode, step_end, finish);
}

LOWBIT_AMX_CODE_END
#endif  // LOWBIT_HAVE_AVX2_KERNELS

}  // namespace lowbit::cpu
