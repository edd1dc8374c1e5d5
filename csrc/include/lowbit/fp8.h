// FP8 (OCP E4M3FN and E5M2) <-> fp32 conversion, scalar, for host and device code.
//
// The same bit-level algorithm as torch's c10::Float8_e4m3fn / c10::Float8_e5m2 for every input
// that is in range (round to nearest, ties to even, subnormals exact), so kernels agree with
// torch's dtype conversion bit for bit. Out-of-range inputs follow lowbit's documented policy
// instead of whatever the installed torch does (torch changed e4m3fn overflow from NaN to
// saturation between releases):
//   saturate = true : |v| > max -> +-max (448 / 57344), +-inf included; NaN stays NaN.
//   saturate = false: e4m3fn: |v| > 464 (rounds past 448) -> NaN, +-inf -> NaN (no inf code);
//                     e5m2:   |v| >= 61440 (rounds past 57344) -> +-inf; NaN stays NaN.
// The sign of a NaN is kept (0x7f / 0xff), as torch does.
//
// Plain C++ unless compiled by nvcc/hipcc, where every function is __host__ __device__.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOWBIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOWBIT_HOST_DEVICE inline
#endif

namespace lowbit::fp8 {

enum class Format : int { E4M3 = 0, E5M2 = 1 };

constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;
// Scales come in blocks of 128 along K (and along N for 128x128 weight blocks), DeepSeek-style.
constexpr int64_t kBlock = 128;

LOWBIT_HOST_DEVICE float max_value(Format f) { return f == Format::E4M3 ? kE4M3Max : kE5M2Max; }

LOWBIT_HOST_DEVICE uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

LOWBIT_HOST_DEVICE float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ------------------------------------------------------------------ decode (exact)
// NaN codes give torch's bit patterns: e4m3fn 0x7f -> 0x7ff00000 (sign kept); e5m2 NaNs are
// quieted like an fp16 -> fp32 conversion quiets them.
LOWBIT_HOST_DEVICE float e4m3_to_float(uint8_t v) {
  const uint32_t sign = uint32_t(v & 0x80) << 24;
  const uint32_t em = v & 0x7f;
  if (em == 0x7f) return float_of(sign | 0x7ff00000u);
  const uint32_t exp = em >> 3, man = em & 7;
  if (exp == 0) {
    const float mag = float(man) * 0.001953125f;  // man * 2^-9, exact
    return float_of(sign | bits_of(mag));
  }
  return float_of(sign | ((exp + 120) << 23) | (man << 20));
}

LOWBIT_HOST_DEVICE float e5m2_to_float(uint8_t v) {
  const uint32_t sign = uint32_t(v & 0x80) << 24;
  const uint32_t exp = (v >> 2) & 0x1f, man = v & 3;
  if (exp == 0x1f) {
    if (man == 0) return float_of(sign | 0x7f800000u);
    return float_of(sign | 0x7fc00000u | (man << 21));
  }
  if (exp == 0) {
    const float mag = float(man) * 1.52587890625e-05f;  // man * 2^-16, exact
    return float_of(sign | bits_of(mag));
  }
  return float_of(sign | ((exp + 112) << 23) | (man << 21));
}

LOWBIT_HOST_DEVICE float to_float(uint8_t v, Format f) { return f == Format::E4M3 ? e4m3_to_float(v) : e5m2_to_float(v); }

// ------------------------------------------------------------------ encode (RNE)
LOWBIT_HOST_DEVICE uint8_t float_to_e4m3(float value, bool saturate) {
  uint32_t bits = bits_of(value);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t r;
  if (bits > 0x7f800000u) {
    r = 0x7f;  // NaN
  } else if (bits > 0x43e80000u) {  // |v| > 464 (inf included): rounds past 448
    r = saturate ? 0x7e : 0x7f;
  } else if (bits < (121u << 23)) {  // below 2^-6: subnormal (or zero)
    // Adding 2^14 leaves an ulp of 2^-9, the subnormal step: the fp32 add does the RNE.
    const float shifted = float_of(bits) + float_of(141u << 23);
    r = bits_of(shifted) - (141u << 23);
  } else {
    const uint32_t odd = (bits >> 20) & 1;
    r = (bits + (uint32_t(7 - 127) << 23) + 0x7ffffu + odd) >> 20;
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

LOWBIT_HOST_DEVICE uint8_t float_to_e5m2(float value, bool saturate) {
  uint32_t bits = bits_of(value);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  uint32_t r;
  if (bits > 0x7f800000u) {
    r = 0x7f;  // NaN
  } else if (bits >= 0x47700000u) {  // |v| >= 61440 (inf included): rounds past 57344
    r = saturate ? 0x7b : 0x7c;
  } else if (bits < (113u << 23)) {  // below 2^-14: subnormal (or zero)
    const float shifted = float_of(bits) + float_of(134u << 23);  // ulp of 2^7 is 2^-16
    r = bits_of(shifted) - (134u << 23);
  } else {
    const uint32_t odd = (bits >> 21) & 1;
    r = (bits + (uint32_t(15 - 127) << 23) + 0xfffffu + odd) >> 21;
  }
  return static_cast<uint8_t>(r | (sign >> 24));
}

LOWBIT_HOST_DEVICE uint8_t from_float(float v, Format f, bool saturate) {
  return f == Format::E4M3 ? float_to_e4m3(v, saturate) : float_to_e5m2(v, saturate);
}

}  // namespace lowbit::fp8
