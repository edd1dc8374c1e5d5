// AMX tiles for lowbit's own CPU kernels: the process-wide permission Linux asks for before any
// thread may touch the tile registers, and the tile configuration every kernel loads first.
// Kernels that use AMX compile their bodies with target("amx-tile,amx-bf16") and call
// amx_bf16_ready() on the dispatching thread; it is false on CPUs without AMX-BF16 (or without the
// AVX-512 BW and BF16 the decoders use), on kernels
// older than Linux 5.16 (no permission call), and under LOWBIT_CPU_ISA=avx2 (has_avx512f is false
// then, and every AMX CPU has AVX-512F), so the callers' other paths stay reachable in tests.
#pragma once

#include <cstdint>
#include <cstring>

#include <sys/syscall.h>
#include <unistd.h>

#include "lowbit/cpu/isa.h"

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
    // Every AMX CPU so far has AVX512-BW and -BF16 too; the kernels use them to decode.
    if (!has_amx_bf16() || !has_avx512f() || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512bf16"))
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

}  // namespace lowbit::cpu
