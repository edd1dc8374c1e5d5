// INT4 family, cutlass_sm90 layout, CPU kernels (layout: lowbit/formats/int4.py; spec:
// lowbit/backends/reference/int4.py, int4_repack_cutlass_sm90 and int4_cutlass_sm90_mm).
//
// The layout exists for CUTLASS's sm_90 mixed-input GEMM (csrc/cuda/int4_sm90.cu). These CPU
// kernels make the repack and the op usable and testable on any machine: the repack builds
// every byte with the same __host__ __device__ function as the CUDA repack kernel
// (lowbit/int4_layout.h, sm90::repack_byte), and the GEMM reads the bytes back with
// sm90::signed_code_at, so the nibble order the GPU kernel depends on is checked here.
//
// The GEMM dequantizes the weight to float32 holding exactly the T-rounded values the CUTLASS
// kernel computes (round_T(round_T(q * scale) + zero')), 8 columns at a time with AVX2 (F16C
// rounds to fp16; bf16 rounds by the integer trick of vec_avx2.h), scalar without AVX2, then
// hands the product to at::mm in float32. It is a fallback (the fast CPU path for int4 is
// int4_weight_only_mm on the lowbit layout): it materializes the [N, K] float32 weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "lowbit/checks.h"
#include "lowbit/cpu/isa.h"
#include "lowbit/cpu/vec_avx2.h"
#include "lowbit/int4_layout.h"

namespace lowbit {
namespace {

namespace sm90 = int4_layout::sm90;

// Rounds a float to T (round to nearest even) and back.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(T(v));
}

template <typename T>
void repack_scales(const float* scale, const float* zero, int64_t N, int64_t groups, T* scale_t, T* zero_t) {
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t n = 0; n < N; ++n) {
        const T s = T(scale[n * groups + g]);
        scale_t[sm90::scale_index(g, n, N)] = s;
        zero_t[sm90::scale_index(g, n, N)] =
            zero == nullptr ? T(0.f) : T(sm90::offset_zero(static_cast<float>(s), zero[n * groups + g]));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_repack_cutlass_sm90_cpu(
    const at::Tensor& packed_w, const at::Tensor& scale, const std::optional<at::Tensor>& zero, int64_t group_size,
    int64_t K, c10::ScalarType dtype) {
  const char* op = "int4_repack_cutlass_sm90";
  const int64_t groups = check_int4_repack_cutlass_sm90(op, packed_w, scale, zero, group_size, K, dtype);
  const int64_t N = packed_w.size(0);
  const at::Tensor src = packed_w.contiguous();
  const int64_t src_row = int4_layout::row_bytes(K);
  at::Tensor packed = at::empty({N, sm90::row_bytes(K)}, packed_w.options());
  const uint8_t* in = src.const_data_ptr<uint8_t>();
  uint8_t* out = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t j = 0; j < sm90::row_bytes(K); ++j)
        out[n * sm90::row_bytes(K) + j] = sm90::repack_byte(in + n * src_row, j);
  });

  const at::Tensor s32 = scale.to(at::kFloat).contiguous();
  const at::Tensor z32 = zero.has_value() ? zero->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor scale_t = at::empty({groups, N}, scale.options().dtype(dtype));
  at::Tensor zero_t = at::empty({groups, N}, scale.options().dtype(dtype));
  const float* zp = z32.defined() ? z32.const_data_ptr<float>() : nullptr;
  if (dtype == at::kHalf)
    repack_scales<c10::Half>(s32.const_data_ptr<float>(), zp, N, groups, scale_t.mutable_data_ptr<c10::Half>(),
                             zero_t.mutable_data_ptr<c10::Half>());
  else
    repack_scales<c10::BFloat16>(s32.const_data_ptr<float>(), zp, N, groups,
                                 scale_t.mutable_data_ptr<c10::BFloat16>(), zero_t.mutable_data_ptr<c10::BFloat16>());
  return {packed, scale_t, zero_t};
}

// w[n, k] = round_T(round_T(q * scale) + zero') as float32 [N, K].
template <typename T>
void dequantize(const uint8_t* packed, const T* scale_t, const T* zero_t, int64_t N, int64_t K, int64_t group_size,
                float* w) {
  at::parallel_for(0, N, 4, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = packed + n * sm90::row_bytes(K);
      float* wrow = w + n * K;
      for (int64_t k0 = 0, g = 0; k0 < K; k0 += group_size, ++g) {
        const float s = static_cast<float>(scale_t[sm90::scale_index(g, n, N)]);
        const float z = static_cast<float>(zero_t[sm90::scale_index(g, n, N)]);
        const int64_t k1 = std::min(K, k0 + group_size);
        for (int64_t k = k0; k < k1; ++k)
          wrow[k] = round_to<T>(round_to<T>(static_cast<float>(sm90::signed_code_at(row, k)) * s) + z);
      }
    }
  });
}

#if LOWBIT_HAVE_AVX2_KERNELS
// One T rounding of 8 floats, kept in fp32 lanes.
LOWBIT_AVX2 inline __attribute__((always_inline)) __m256 round8(__m256 v, c10::Half*) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// As c10::BFloat16(float): add 0x7fff plus the lsb of the kept half, keep the top 16 bits (NaN
// to the quiet NaN 0x7fc0).
LOWBIT_AVX2 inline __attribute__((always_inline)) __m256 round8(__m256 v, c10::BFloat16*) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_castsi256_ps(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), nan));
}

// Columns k .. k+7 come from the 4 bytes at sm90::byte_of(k) (k even): column k + l is nibble l
// of that little-endian word (byte l/2, shift sm90::shift_of(l)), a signed q = (nib ^ 8) - 8.
// Rows n0 .. n1-1 (called from inside the parallel region, which is compiled without AVX2: a
// lambda does not inherit the target attribute).
template <typename T>
LOWBIT_AVX2 void dequantize_rows_avx2(const uint8_t* packed, const T* scale_t, const T* zero_t, int64_t N, int64_t K,
                                      int64_t group_size, float* w, int64_t n0, int64_t n1) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i low4 = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = packed + n * sm90::row_bytes(K);
    float* wrow = w + n * K;
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += group_size, ++g) {
      const __m256 s = _mm256_set1_ps(static_cast<float>(scale_t[sm90::scale_index(g, n, N)]));
      const __m256 z = _mm256_set1_ps(static_cast<float>(zero_t[sm90::scale_index(g, n, N)]));
      const int64_t k1 = std::min(K, k0 + group_size);  // K % 32 == 0, groups of 64, 128 or K
      for (int64_t k = k0; k < k1; k += 8) {
        uint32_t word;
        std::memcpy(&word, row + sm90::byte_of(k), sizeof word);
        const __m256i nib = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(word)), shifts), low4);
        const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_xor_si256(nib, eight), eight));
        const __m256 qs = round8(_mm256_mul_ps(q, s), static_cast<T*>(nullptr));
        _mm256_storeu_ps(wrow + k, round8(_mm256_add_ps(qs, z), static_cast<T*>(nullptr)));
      }
    }
  }
}
#endif

template <typename T>
void dequantize_dispatch(const uint8_t* packed, const T* scale_t, const T* zero_t, int64_t N, int64_t K,
                         int64_t group_size, float* w) {
#if LOWBIT_HAVE_AVX2_KERNELS
  if (cpu::has_avx2()) {
    at::parallel_for(0, N, 4, [&](int64_t n0, int64_t n1) {
      dequantize_rows_avx2<T>(packed, scale_t, zero_t, N, K, group_size, w, n0, n1);
    });
    return;
  }
#endif
  dequantize<T>(packed, scale_t, zero_t, N, K, group_size, w);
}

at::Tensor int4_cutlass_sm90_mm_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                    const at::Tensor& zero, int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_int4_cutlass_sm90_mm("int4_cutlass_sm90_mm", x, packed, scale, zero, group_size, bias);
  const int64_t K = x.size(1), N = packed.size(0);
  const at::Tensor p = packed.contiguous(), s = scale.contiguous(), z = zero.contiguous();
  at::Tensor w = at::empty({N, K}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kHalf)
    dequantize_dispatch<c10::Half>(p.const_data_ptr<uint8_t>(), s.const_data_ptr<c10::Half>(), z.const_data_ptr<c10::Half>(),
                          N, K, group_size, w.mutable_data_ptr<float>());
  else
    dequantize_dispatch<c10::BFloat16>(p.const_data_ptr<uint8_t>(), s.const_data_ptr<c10::BFloat16>(),
                              z.const_data_ptr<c10::BFloat16>(), N, K, group_size, w.mutable_data_ptr<float>());
  at::Tensor y = at::mm(x.to(at::kFloat), w.t());
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int4_repack_cutlass_sm90", &int4_repack_cutlass_sm90_cpu);
  m.impl("int4_cutlass_sm90_mm", &int4_cutlass_sm90_mm_cpu);
}

}  // namespace lowbit
