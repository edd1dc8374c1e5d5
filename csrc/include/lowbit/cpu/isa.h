// Which CPU kernels may run here, decided once at runtime, plus small portability helpers.
//
// The extension is compiled for the baseline x86-64 ISA (setup.py adds no -mavx2), so a wheel
// built here loads on any x86-64 CPU. The AVX2/FMA/F16C kernels carry a per-function target
// attribute (LOWBIT_AVX2) and are only called after has_avx2() said yes; everything else, the
// scalar fallbacks included, is plain baseline code.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define LOWBIT_HAVE_AVX2_KERNELS 1
// A function attribute rather than `#pragma GCC target`: clang accepts it too, and it keeps the
// AVX2 code confined to the functions that are dispatched to at runtime.
#define LOWBIT_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define LOWBIT_HAVE_AVX2_KERNELS 0
#endif

namespace lowbit::cpu {

// Small-M kernels stream each weight row from DRAM once, as several short row streams per tile,
// and the hardware prefetcher restarts late at every 4 KiB page or short row. So every family's
// small-M tile prefetches, once per cache line, the same positions of the rows this many tiles
// ahead: the rows the same thread reads next (a thread's rows are contiguous). Prefetches never
// fault, so reaching past the end of a weight is harmless. Two rather than one tile measured
// faster in every family at M = 1 with cold caches (numbers at each use); three or more, no better.
// Session 9 ran on an Intel Xeon VM (AVX-512, 2 vCPUs) instead of the Zen 3 one and measured
// the distance again (2 threads, M = 1, N = K = 4096, 1 GiB read before each call, median of 60,
// three interleaved runs, ms): 2 tiles (int4: 4 KiB) int4 0.60-0.70, W8A8 0.80-0.84, kmeans4
// 0.80-0.84, pq2 0.73-0.77; 4 tiles (16 KiB) 0.72-0.74, 0.83-0.86, 0.85-0.86, 0.74-0.79; 8 tiles
// (32 KiB) 0.78-0.81, 0.83-0.86, 0.83-0.88, 0.77-0.78. Two stays best on both machines.
constexpr int kPrefetchTilesAhead = 2;

// True when the CPU and the OS (saved ymm state) support AVX2, FMA and F16C.
// LOWBIT_CPU_ISA=scalar forces the portable kernels, so tests can cover them on an AVX2 machine.
inline bool has_avx2() {
  static const bool value = [] {
    const char* forced = std::getenv("LOWBIT_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "scalar") == 0) return false;
#if LOWBIT_HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return value;
}

// True when the CPU has AMX-INT8 and lowbit's fast path runs at all (LOWBIT_CPU_ISA=scalar keeps
// the portable kernels). lowbit has no AMX kernel of its own: W8A8 hands larger products to
// torch's at::_int_mm there (csrc/cpu/int8.cpp).
inline bool has_amx_int8() {
  static const bool value = [] {
#if LOWBIT_HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    return has_avx2() && __builtin_cpu_supports("amx-int8");
#else
    return false;
#endif
  }();
  return value;
}

// Whether an exact int8 product of M rows goes to torch's at::_int_mm (oneDNN's AMX tiles) rather
// than lowbit's AVX2 kernels: from min_m rows on CPUs with AMX-INT8 (W8A8 in csrc/cpu/int8.cpp, 2:4
// W8A8 in csrc/cpu/sparse24.cpp, each with its measured min_m). LOWBIT_INT8_ONEDNN=0 never hands
// over, =1 always does from min_m (so tests reach both paths anywhere); read per call.
inline bool use_onednn_int8(int64_t M, int64_t N, int64_t K, int64_t min_m) {
  if (M < min_m || N == 0 || K == 0 || !has_avx2()) return false;
  const char* env = std::getenv("LOWBIT_INT8_ONEDNN");
  if (env != nullptr && (env[0] == '0' || env[0] == '1')) return env[0] == '1';
  return has_amx_int8();
}

// True when the CPU has AMX-BF16 (and lowbit's fast path runs at all). torch's bf16 GEMM
// (oneDNN) runs on AMX tiles there, several times faster than any AVX2 FMA kernel at large M:
// the weight-only families hand it their decoded weights (lowbit/cpu/decoded_gemm.h).
inline bool has_amx_bf16() {
  static const bool value = [] {
#if LOWBIT_HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    return has_avx2() && __builtin_cpu_supports("amx-bf16");
#else
    return false;
#endif
  }();
  return value;
}

// True when the CPU has AVX-512F: torch's fp32 GEMM is then twice as wide as lowbit's AVX2
// kernels, and beats them at large M even counting the decode (lowbit/cpu/decoded_gemm.h).
// LOWBIT_CPU_ISA=avx2 hides it, so tests can reach the AVX2 decoders on an AVX-512 machine.
inline bool has_avx512f() {
  static const bool value = [] {
#if LOWBIT_HAVE_AVX2_KERNELS
    const char* forced = std::getenv("LOWBIT_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "avx2") == 0) return false;
    __builtin_cpu_init();
    return has_avx2() && __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
  }();
  return value;
}

// GCC contracts a*b+c into one FMA by default (-ffp-contract=fast, even in -std=c++20 mode and
// even through intrinsics). The reference rounds after every multiply and add, so epilogues that
// must match it bit for bit pass intermediate values through this empty asm, which the compiler
// cannot see through.
inline void fp_barrier(float& v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(v));
#else
  volatile float t = v;
  v = t;
#endif
}

}  // namespace lowbit::cpu
