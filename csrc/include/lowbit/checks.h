// Argument checks at the op boundary for the C++ kernels. They mirror lowbit/_checks.py
// word for word, so every backend rejects a bad call with the same ValueError naming the op,
// the argument and the constraint. Kernels trust their inputs after these.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <sstream>
#include <string>

namespace lowbit {

inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::Half: return "float16";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Char: return "int8";
    case c10::ScalarType::Byte: return "uint8";
    case c10::ScalarType::Int: return "int32";
    case c10::ScalarType::Long: return "int64";
    default: return std::string(c10::toString(t));
  }
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

#define LOWBIT_FAIL(op, ...) TORCH_CHECK_VALUE(false, "lowbit.", op, ": ", __VA_ARGS__)

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, c10::ScalarType want) {
  if (t.scalar_type() != want)
    LOWBIT_FAIL(op, name, " must have dtype ", dtype_name(want), ", got ", dtype_name(t.scalar_type()));
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  if (!is_float_dtype(t.scalar_type()))
    LOWBIT_FAIL(op, name, " must have dtype float32, float16, bfloat16, got ", dtype_name(t.scalar_type()));
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  if (t.dim() != dim) LOWBIT_FAIL(op, name, " must be ", dim, "-D, got shape ", shape_str(t));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  if (t.device() != ref.device())
    LOWBIT_FAIL(op, name, " is on ", t.device().str(), " but ", ref_name, " is on ", ref.device().str(),
                "; all tensors must be on one device");
}

inline void check_nonempty(const char* op, const char* name, const at::Tensor& t) {
  if (t.numel() == 0) LOWBIT_FAIL(op, name, " must not have a zero-sized dimension, got shape ", shape_str(t));
}

// A scale is a scalar ([] or [1]) or one value per row/column ([length]).
inline void check_scale_vector(const char* op, const char* name, const at::Tensor& s, int64_t length,
                               const char* length_name) {
  check_dtype(op, name, s, c10::ScalarType::Float);
  if (s.dim() == 0 || (s.dim() == 1 && (s.size(0) == 1 || s.size(0) == length))) return;
  LOWBIT_FAIL(op, name, " must have shape [", length_name, "]=[", length, "] or be a scalar ([] or [1]), got ",
              shape_str(s));
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N, const char* ref_name,
                       const at::Tensor& ref) {
  if (!bias.has_value()) return;
  check_float_dtype(op, "bias", *bias);
  check_dim(op, "bias", *bias, 1);
  if (bias->size(0) != N) LOWBIT_FAIL(op, "bias must have shape [N]=[", N, "], got ", shape_str(*bias));
  check_same_device(op, "bias", *bias, ref_name, ref);
}

inline c10::ScalarType check_out_dtype(const char* op, std::optional<c10::ScalarType> out_dtype) {
  if (!out_dtype.has_value()) return c10::ScalarType::Float;
  if (!is_float_dtype(*out_dtype))
    LOWBIT_FAIL(op, "out_dtype must be float32, float16 or bfloat16, got ", c10::toString(*out_dtype));
  return *out_dtype;
}

// K * 128 * 128 < 2^31: int32 accumulation of int8 products can never overflow.
constexpr int64_t kInt8MaxK = (int64_t(1) << 31) / (128 * 128) - 1;

// ---------------------------------------------------------------------------- INT8
inline void check_int8_mm(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_dtype(op, "a", a, c10::ScalarType::Char);
  check_dim(op, "a", a, 2);
  check_dtype(op, "b", b, c10::ScalarType::Char);
  check_dim(op, "b", b, 2);
  check_same_device(op, "b", b, "a", a);
  if (a.size(1) != b.size(1))
    LOWBIT_FAIL(op, "a is [M, K]=", shape_str(a), " and b is [N, K]=", shape_str(b), ": their K must match");
  check_nonempty(op, "a", a);
  check_nonempty(op, "b", b);
  if (a.size(1) > kInt8MaxK)
    LOWBIT_FAIL(op, "K=", a.size(1), " exceeds ", kInt8MaxK, ", beyond which int32 accumulation could overflow");
}

inline c10::ScalarType check_int8_scaled_mm(const char* op, const at::Tensor& a, const at::Tensor& b,
                                            const at::Tensor& scale_a, const at::Tensor& scale_b,
                                            const std::optional<at::Tensor>& bias,
                                            std::optional<c10::ScalarType> out_dtype) {
  check_int8_mm(op, a, b);
  check_scale_vector(op, "scale_a", scale_a, a.size(0), "M");
  check_scale_vector(op, "scale_b", scale_b, b.size(0), "N");
  check_same_device(op, "scale_a", scale_a, "a", a);
  check_same_device(op, "scale_b", scale_b, "a", a);
  check_bias(op, bias, b.size(0), "a", a);
  return check_out_dtype(op, out_dtype);
}

inline void check_int8_weight_only_mm(const char* op, const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  check_float_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_dtype(op, "w", w, c10::ScalarType::Char);
  check_dim(op, "w", w, 2);
  check_same_device(op, "w", w, "x", x);
  if (x.size(1) != w.size(1))
    LOWBIT_FAIL(op, "x is [M, K]=", shape_str(x), " and w is [N, K]=", shape_str(w), ": their K must match");
  check_nonempty(op, "x", x);
  check_nonempty(op, "w", w);
  check_float_dtype(op, "scale", scale);
  check_dim(op, "scale", scale, 1);
  if (scale.size(0) != w.size(0))
    LOWBIT_FAIL(op, "scale must have shape [N]=[", w.size(0), "], got ", shape_str(scale));
  check_same_device(op, "scale", scale, "x", x);
  check_bias(op, bias, w.size(0), "x", x);
}

inline void check_int8_quantize_dynamic(const char* op, const at::Tensor& x) {
  check_float_dtype(op, "x", x);
  if (x.dim() < 1) LOWBIT_FAIL(op, "x must have at least 1 dimension(s), got shape ", shape_str(x));
  check_nonempty(op, "x", x);
}

inline void check_int8_quantize_static(const char* op, const at::Tensor& x, const at::Tensor& scale) {
  check_int8_quantize_dynamic(op, x);
  check_dtype(op, "scale", scale, c10::ScalarType::Float);
  check_same_device(op, "scale", scale, "x", x);
  bool ok = scale.numel() == 1 && scale.dim() <= 1;
  if (!ok && scale.dim() == x.dim() - 1) {
    ok = true;
    for (int64_t i = 0; i < scale.dim(); ++i) ok = ok && scale.size(i) == x.size(i);
  }
  if (!ok) {
    std::ostringstream rows;
    rows << "[";
    for (int64_t i = 0; i + 1 < x.dim(); ++i) rows << (i ? ", " : "") << x.size(i);
    rows << "]";
    LOWBIT_FAIL(op, "scale must be a scalar ([] or [1]) or have shape x.shape[:-1]=", rows.str(),
                " (one scale per row of ", x.numel() / x.size(-1), "), got ", shape_str(scale));
  }
}

// ---------------------------------------------------------------------------- INT4
// Format: lowbit/formats/int4.py (nibbles in blocks of 32 along K; scale/zero [N, groups]).
inline void check_int4_weight_only_mm(const char* op, const at::Tensor& x, const at::Tensor& packed_w,
                                      const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                                      int64_t group_size, const std::optional<at::Tensor>& bias) {
  check_float_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_dtype(op, "packed_w", packed_w, c10::ScalarType::Byte);
  check_dim(op, "packed_w", packed_w, 2);
  check_same_device(op, "packed_w", packed_w, "x", x);
  check_nonempty(op, "x", x);
  check_nonempty(op, "packed_w", packed_w);
  const int64_t K = x.size(1), N = packed_w.size(0);
  if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != K)
    LOWBIT_FAIL(op, "group_size must be 32, 64, 128 or K=", K, " (per channel), got ", group_size);
  const int64_t row_bytes = (K + 31) / 32 * 16;
  if (packed_w.size(1) != row_bytes)
    LOWBIT_FAIL(op, "packed_w must have shape [N, ceil(K/32)*16]=[", N, ", ", row_bytes, "] for K=", K, ", got ",
                shape_str(packed_w));
  const int64_t groups = (K + group_size - 1) / group_size;
  check_float_dtype(op, "scale", scale);
  check_dim(op, "scale", scale, 2);
  if (scale.size(0) != N || scale.size(1) != groups)
    LOWBIT_FAIL(op, "scale must have shape [N, ceil(K/group_size)]=[", N, ", ", groups, "], got ", shape_str(scale));
  check_same_device(op, "scale", scale, "x", x);
  if (zero.has_value()) {
    check_dtype(op, "zero", *zero, scale.scalar_type());
    check_dim(op, "zero", *zero, 2);
    if (zero->size(0) != N || zero->size(1) != groups)
      LOWBIT_FAIL(op, "zero must have shape [N, ceil(K/group_size)]=[", N, ", ", groups, "], got ", shape_str(*zero));
    check_same_device(op, "zero", *zero, "x", x);
  }
  check_bias(op, bias, N, "x", x);
}

// ---------------------------------------------------------------------------- FP8
// Messages mirror lowbit/_checks.py (fp8_*); dtype names as Python prints them.
inline std::string fp8_dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case c10::ScalarType::Float8_e5m2: return "float8_e5m2";
    case c10::ScalarType::Double: return "float64";
    case c10::ScalarType::Short: return "int16";
    case c10::ScalarType::Bool: return "bool";
    default: return dtype_name(t);
  }
}

// Python prints a dtype argument as torch.<name>.
inline c10::ScalarType check_fp8_out_dtype(const char* op, std::optional<c10::ScalarType> out_dtype) {
  if (!out_dtype.has_value()) return c10::ScalarType::Float;
  if (!is_float_dtype(*out_dtype))
    LOWBIT_FAIL(op, "out_dtype must be float32, float16 or bfloat16, got torch.", fp8_dtype_name(*out_dtype));
  return *out_dtype;
}

inline bool is_fp8_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float8_e4m3fn || t == c10::ScalarType::Float8_e5m2;
}

constexpr int64_t kFp8Block = 128;

inline int64_t fp8_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_fp8_float_input(const char* op, const char* name, const at::Tensor& t) {
  if (!is_float_dtype(t.scalar_type()))
    LOWBIT_FAIL(op, name, " must have dtype float32, float16, bfloat16, got ", fp8_dtype_name(t.scalar_type()));
}

inline void check_fp8_scale_dtype(const char* op, const char* name, const at::Tensor& t) {
  if (t.scalar_type() != c10::ScalarType::Float)
    LOWBIT_FAIL(op, name, " must have dtype float32, got ", fp8_dtype_name(t.scalar_type()));
}

inline void check_fp8_operand(const char* op, const char* name, const at::Tensor& t) {
  if (!is_fp8_dtype(t.scalar_type()))
    LOWBIT_FAIL(op, name, " must have dtype float8_e4m3fn, float8_e5m2, got ", fp8_dtype_name(t.scalar_type()));
  check_dim(op, name, t, 2);
}

// Returns true for e4m3, false for e5m2.
inline bool check_fp8_format(const char* op, const std::string& format) {
  if (format == "e4m3") return true;
  if (format == "e5m2") return false;
  LOWBIT_FAIL(op, "format must be 'e4m3' or 'e5m2', got '", format, "'");
  return false;  // unreachable
}

inline std::string fp8_shape_list(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

inline bool fp8_shape_is(const at::Tensor& t, const std::vector<int64_t>& v) {
  if (t.dim() != static_cast<int64_t>(v.size())) return false;
  for (size_t i = 0; i < v.size(); ++i)
    if (t.size(static_cast<int64_t>(i)) != v[i]) return false;
  return true;
}

inline bool fp8_is_scalar(const at::Tensor& s) { return s.numel() == 1 && s.dim() <= 1; }

inline void check_fp8_x(const char* op, const at::Tensor& x) {
  check_fp8_float_input(op, "x", x);
  if (x.dim() < 1) LOWBIT_FAIL(op, "x must have at least 1 dimension(s), got shape ", shape_str(x));
  check_nonempty(op, "x", x);
}

inline void check_fp8_quantize_dynamic(const char* op, const at::Tensor& x, const std::string& format,
                                       const std::string& granularity) {
  check_fp8_x(op, x);
  check_fp8_format(op, format);
  if (granularity != "tensor" && granularity != "row" && granularity != "block1x128" &&
      granularity != "block128x128")
    LOWBIT_FAIL(op, "granularity must be 'tensor', 'row', 'block1x128' or 'block128x128', got '", granularity, "'");
  if (granularity == "block128x128" && x.dim() != 2)
    LOWBIT_FAIL(op, "x must be 2-D for granularity 'block128x128', got shape ", shape_str(x));
}

inline void check_fp8_quantize_static(const char* op, const at::Tensor& x, const at::Tensor& scale,
                                      const std::string& format) {
  check_fp8_x(op, x);
  check_fp8_format(op, format);
  check_fp8_scale_dtype(op, "scale", scale);
  check_same_device(op, "scale", scale, "x", x);
  std::vector<int64_t> rows(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> blocks = rows;
  blocks.push_back(fp8_cdiv(x.size(-1), kFp8Block));
  if (fp8_is_scalar(scale) || fp8_shape_is(scale, rows) || fp8_shape_is(scale, blocks)) return;
  LOWBIT_FAIL(op, "scale must be a scalar ([] or [1]), have shape x.shape[:-1]=", fp8_shape_list(rows),
              " (per row) or x.shape[:-1]+[ceil(K/128)]=", fp8_shape_list(blocks), " (per 1x128 block), got ",
              shape_str(scale));
}

inline void check_fp8_mm_shapes(const char* op, const at::Tensor& a, const at::Tensor& b, const char* a_name,
                                const char* b_name) {
  check_same_device(op, b_name, b, a_name, a);
  if (a.size(1) != b.size(1))
    LOWBIT_FAIL(op, a_name, " is [M, K]=", shape_str(a), " and ", b_name, " is [N, K]=", shape_str(b),
                ": their K must match");
  check_nonempty(op, a_name, a);
  check_nonempty(op, b_name, b);
}

// Returns the output dtype; `block` tells whether the scales are per 1x128 / 128x128 block.
inline c10::ScalarType check_fp8_scaled_mm(const char* op, const at::Tensor& a, const at::Tensor& b,
                                           const at::Tensor& scale_a, const at::Tensor& scale_b,
                                           const std::optional<at::Tensor>& bias,
                                           std::optional<c10::ScalarType> out_dtype, bool* block) {
  check_fp8_operand(op, "a", a);
  check_fp8_operand(op, "b", b);
  check_fp8_mm_shapes(op, a, b, "a", "b");
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1), kb = fp8_cdiv(K, kFp8Block);
  check_fp8_scale_dtype(op, "scale_a", scale_a);
  check_fp8_scale_dtype(op, "scale_b", scale_b);
  check_same_device(op, "scale_a", scale_a, "a", a);
  check_same_device(op, "scale_b", scale_b, "a", a);
  *block = scale_a.dim() == 2 || scale_b.dim() == 2;
  if (*block) {
    if (!fp8_shape_is(scale_a, {M, kb}))
      LOWBIT_FAIL(op, "scale_a must have shape [M, ceil(K/128)]=[", M, ", ", kb, "] for block scaling, got ",
                  shape_str(scale_a));
    if (!fp8_shape_is(scale_b, {fp8_cdiv(N, kFp8Block), kb}))
      LOWBIT_FAIL(op, "scale_b must have shape [ceil(N/128), ceil(K/128)]=[", fp8_cdiv(N, kFp8Block), ", ", kb,
                  "] for block scaling, got ", shape_str(scale_b));
  } else {
    check_scale_vector(op, "scale_a", scale_a, M, "M");
    check_scale_vector(op, "scale_b", scale_b, N, "N");
  }
  check_bias(op, bias, N, "a", a);
  return check_fp8_out_dtype(op, out_dtype);
}

inline void check_fp8_weight_only_mm(const char* op, const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  check_fp8_float_input(op, "x", x);
  check_dim(op, "x", x, 2);
  check_fp8_operand(op, "w", w);
  check_fp8_mm_shapes(op, x, w, "x", "w");
  const int64_t N = w.size(0), K = w.size(1);
  check_fp8_scale_dtype(op, "scale", scale);
  check_same_device(op, "scale", scale, "x", x);
  const std::vector<int64_t> blocks{fp8_cdiv(N, kFp8Block), fp8_cdiv(K, kFp8Block)};
  if (!(fp8_is_scalar(scale) || fp8_shape_is(scale, {N}) || fp8_shape_is(scale, blocks)))
    LOWBIT_FAIL(op, "scale must be a scalar ([] or [1]), have shape [N]=[", N,
                "] (per channel) or [ceil(N/128), ceil(K/128)]=", fp8_shape_list(blocks),
                " (per 128x128 block), got ", shape_str(scale));
  check_bias(op, bias, N, "x", x);
}

// ---------------------------------------------------------------------------- binary
// Format: lowbit/formats/binary.py (sign bits, 1 = +1, LSB-first in int32 words along K).
constexpr int64_t kBinaryWordBits = 32;
constexpr int64_t kBinaryMaxK = (int64_t(1) << 31) - 1;

// Returns the number of words per row, ceil(K / 32).
inline int64_t check_binary_k(const char* op, int64_t K) {
  if (K < 1 || K > kBinaryMaxK) LOWBIT_FAIL(op, "K must be an int in [1, ", kBinaryMaxK, "], got ", K);
  return (K + kBinaryWordBits - 1) / kBinaryWordBits;
}

inline void check_binary_packed(const char* op, const char* name, const at::Tensor& t, const char* rows_name,
                                int64_t K, int64_t words) {
  // fp8_dtype_name: Python's spelling for every dtype (float64, int16, bool, ...).
  if (t.scalar_type() != c10::ScalarType::Int)
    LOWBIT_FAIL(op, name, " must have dtype int32, got ", fp8_dtype_name(t.scalar_type()));
  check_dim(op, name, t, 2);
  if (t.size(1) != words)
    LOWBIT_FAIL(op, name, " must have shape [", rows_name, ", ceil(K/32)]=[", t.size(0), ", ", words, "] for K=", K,
                ", got ", shape_str(t));
  check_nonempty(op, name, t);
}

inline void check_binary_mm(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t K) {
  const int64_t words = check_binary_k(op, K);
  check_binary_packed(op, "a", a, "M", K, words);
  check_binary_packed(op, "b", b, "N", K, words);
  check_same_device(op, "b", b, "a", a);
}

inline c10::ScalarType check_binary_scaled_mm(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t K,
                                              const at::Tensor& scale_a, const at::Tensor& scale_b,
                                              const std::optional<at::Tensor>& bias,
                                              std::optional<c10::ScalarType> out_dtype) {
  check_binary_mm(op, a, b, K);
  check_scale_vector(op, "scale_a", scale_a, a.size(0), "M");
  check_scale_vector(op, "scale_b", scale_b, b.size(0), "N");
  check_same_device(op, "scale_a", scale_a, "a", a);
  check_same_device(op, "scale_b", scale_b, "a", a);
  check_bias(op, bias, b.size(0), "a", a);
  return check_fp8_out_dtype(op, out_dtype);
}

inline void check_binary_quantize(const char* op, const at::Tensor& x) {
  check_fp8_float_input(op, "x", x);
  check_dim(op, "x", x, 2);
  check_nonempty(op, "x", x);
}

}  // namespace lowbit

// ---------------------------------------------------------------------------- SPARSE24
// Format: lowbit/formats/sparse24.py (values [N, Kp/2], meta uint8 [N, Kp/8], Kp = ceil(K/16)*16).
// Messages mirror lowbit/_checks.py (sparse24_*).
#include <cstdio>

namespace lowbit {

inline int64_t sparse24_padded_k(int64_t K) { return (K + 15) / 16 * 16; }

inline bool sparse24_nibble_ok(uint32_t v) { return (v & 3u) < ((v >> 2) & 3u); }

// Data check: every nibble names two distinct columns in increasing order. The first bad byte
// in row-major order is reported, as in Python. meta must be contiguous.
inline void check_sparse24_meta_data(const char* op, const at::Tensor& meta) {
  if (meta.device().is_meta()) return;
  const uint8_t* p = meta.const_data_ptr<uint8_t>();
  const int64_t n = meta.numel(), cols = meta.size(1);
  bool table[256];
  for (int v = 0; v < 256; ++v) table[v] = sparse24_nibble_ok(v & 0xF) && sparse24_nibble_ok(v >> 4);
  bool all_ok = true;
  for (int64_t i = 0; i < n; ++i) all_ok &= table[p[i]];
  if (all_ok) return;
  for (int64_t i = 0; i < n; ++i) {
    if (table[p[i]]) continue;
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02x", p[i]);
    LOWBIT_FAIL(op, "meta[", i / cols, ", ", i % cols, "]=", hex, " holds a group whose two 2-bit column indices "
                "are not strictly increasing (valid nibbles: 0x4, 0x8, 0x9, 0xc, 0xd, 0xe)");
  }
}

inline int64_t check_sparse24_weight(const char* op, int64_t K, const at::Tensor& values, const at::Tensor& meta,
                                     const at::Tensor& ref, const char* ref_name) {
  const auto vt = values.scalar_type();
  if (!is_float_dtype(vt) && vt != c10::ScalarType::Char)
    LOWBIT_FAIL(op, "values must have dtype float32, float16, bfloat16, int8, got ", dtype_name(vt));
  check_dim(op, "values", values, 2);
  check_dtype(op, "meta", meta, c10::ScalarType::Byte);
  check_dim(op, "meta", meta, 2);
  check_same_device(op, "values", values, ref_name, ref);
  check_same_device(op, "meta", meta, ref_name, ref);
  check_nonempty(op, "values", values);
  const int64_t N = values.size(0), Kp = sparse24_padded_k(K);
  if (values.size(1) != Kp / 2)
    LOWBIT_FAIL(op, "values must have shape [N, ceil(K/16)*8]=[", N, ", ", Kp / 2, "] for K=", K, ", got ",
                shape_str(values));
  if (meta.size(0) != N || meta.size(1) != Kp / 8)
    LOWBIT_FAIL(op, "meta must have shape [N, ceil(K/16)*2]=[", N, ", ", Kp / 8, "] for K=", K, ", got ",
                shape_str(meta));
  return N;
}

// meta_c: the contiguous meta the kernel will read, checked for data here unless it is nullptr
// (a caller with a faster scan runs check_sparse24_meta_data itself when that scan fails).
inline void check_sparse24_mm(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                              const at::Tensor* meta_c) {
  check_float_dtype(op, "x", x);
  check_dim(op, "x", x, 2);
  check_nonempty(op, "x", x);
  const int64_t N = check_sparse24_weight(op, x.size(1), values, meta, x, "x");
  if (!scale.has_value()) {
    if (values.scalar_type() == c10::ScalarType::Char)
      LOWBIT_FAIL(op, "scale (float32 [N]) is required when values are int8");
  } else {
    check_dtype(op, "scale", *scale, c10::ScalarType::Float);
    check_dim(op, "scale", *scale, 1);
    if (scale->size(0) != N) LOWBIT_FAIL(op, "scale must have shape [N]=[", N, "], got ", shape_str(*scale));
    check_same_device(op, "scale", *scale, "x", x);
  }
  check_bias(op, bias, N, "x", x);
  if (meta_c) check_sparse24_meta_data(op, *meta_c);
}

inline c10::ScalarType check_sparse24_int8_scaled_mm(const char* op, const at::Tensor& a, const at::Tensor& values,
                                                     const at::Tensor& meta, const at::Tensor& scale_a,
                                                     const at::Tensor& scale_b, const std::optional<at::Tensor>& bias,
                                                     std::optional<c10::ScalarType> out_dtype,
                                                     const at::Tensor* meta_c) {
  check_dtype(op, "a", a, c10::ScalarType::Char);
  check_dim(op, "a", a, 2);
  check_nonempty(op, "a", a);
  const int64_t N = check_sparse24_weight(op, a.size(1), values, meta, a, "a");
  check_dtype(op, "values", values, c10::ScalarType::Char);
  if (a.size(1) > kInt8MaxK)
    LOWBIT_FAIL(op, "K=", a.size(1), " exceeds ", kInt8MaxK, ", beyond which int32 accumulation could overflow");
  check_scale_vector(op, "scale_a", scale_a, a.size(0), "M");
  check_scale_vector(op, "scale_b", scale_b, N, "N");
  check_same_device(op, "scale_a", scale_a, "a", a);
  check_same_device(op, "scale_b", scale_b, "a", a);
  check_bias(op, bias, N, "a", a);
  const c10::ScalarType out = check_out_dtype(op, out_dtype);
  if (meta_c) check_sparse24_meta_data(op, *meta_c);
  return out;
}


// ---------------------------------------------------------------------------- codebook
// Format: lowbit/formats/codebook.py. codebooks [R, G, C, 2**bits, d]; packed codes uint8
// [N, ceil(J*C*bits/8)], J = K/d. E == 2**bits makes every packed code in range, so these O(1)
// shape checks are all a kernel needs. Messages mirror lowbit/_checks.py (codebook_*).
constexpr int64_t kCodebookMaxBits = 16;

struct CodebookShape {
  int64_t N, R, G, C, E, bits, d, J;
};

inline CodebookShape check_codebook_args(const char* op, const at::Tensor& codes, const at::Tensor& codebooks,
                                         const std::optional<at::Tensor>& scale, int64_t K, const at::Tensor& ref,
                                         const char* ref_name) {
  // fp8_dtype_name: it also names int16/float64/bool as Python prints them.
  if (codes.scalar_type() != c10::ScalarType::Byte)
    LOWBIT_FAIL(op, "codes must have dtype uint8, got ", fp8_dtype_name(codes.scalar_type()));
  check_dim(op, "codes", codes, 2);
  if (!is_float_dtype(codebooks.scalar_type()))
    LOWBIT_FAIL(op, "codebooks must have dtype float32, float16, bfloat16, got ", fp8_dtype_name(codebooks.scalar_type()));
  check_dim(op, "codebooks", codebooks, 5);
  check_same_device(op, "codes", codes, ref_name, ref);
  check_same_device(op, "codebooks", codebooks, ref_name, ref);
  check_nonempty(op, "codes", codes);
  check_nonempty(op, "codebooks", codebooks);
  CodebookShape s;
  s.R = codebooks.size(0);
  s.G = codebooks.size(1);
  s.C = codebooks.size(2);
  s.E = codebooks.size(3);
  s.d = codebooks.size(4);
  if (s.E < 2 || s.E > (int64_t(1) << kCodebookMaxBits) || (s.E & (s.E - 1)))
    LOWBIT_FAIL(op, "codebooks must have 2**bits entries (bits 1..", kCodebookMaxBits, ") in dim 3, got shape ",
                shape_str(codebooks));
  s.bits = 0;
  while ((int64_t(1) << s.bits) < s.E) ++s.bits;
  if (s.d != 1 && s.d != 2 && s.d != 4 && s.d != 8)
    LOWBIT_FAIL(op, "codebooks must have a sub-vector dimension (dim 4) of 1, 2, 4 or 8, got shape ",
                shape_str(codebooks));
  if (K % s.d)
    LOWBIT_FAIL(op, std::string(ref_name) == "x" ? "x" : "in_features",
                " must have K a multiple of the sub-vector dimension d=", s.d, ", got K=", K);
  s.J = K / s.d;
  if (s.J % s.G)
    LOWBIT_FAIL(op, "codebooks has G=", s.G, " column groups, which must divide the J=K/d=", s.J,
                " sub-vectors per row");
  s.N = codes.size(0);
  if (s.N % s.R) LOWBIT_FAIL(op, "codebooks has R=", s.R, " row groups, which must divide N=", s.N);
  const int64_t nbytes = (s.J * s.C * s.bits + 7) / 8;
  if (codes.size(1) != nbytes)
    LOWBIT_FAIL(op, "codes must have shape [N, ceil(J*C*bits/8)]=[", s.N, ", ", nbytes, "] for J=", s.J, ", C=", s.C,
                ", bits=", s.bits, ", got ", shape_str(codes));
  if (scale.has_value()) {
    if (!is_float_dtype(scale->scalar_type()))
      LOWBIT_FAIL(op, "scale must have dtype float32, float16, bfloat16, got ", fp8_dtype_name(scale->scalar_type()));
    check_dim(op, "scale", *scale, 1);
    if (scale->size(0) != s.N) LOWBIT_FAIL(op, "scale must have shape [N]=[", s.N, "], got ", shape_str(*scale));
    check_same_device(op, "scale", *scale, ref_name, ref);
  }
  return s;
}

inline CodebookShape check_codebook_mm(const char* op, const at::Tensor& x, const at::Tensor& codes,
                                       const at::Tensor& codebooks, const std::optional<at::Tensor>& scale,
                                       const std::optional<at::Tensor>& bias) {
  check_fp8_float_input(op, "x", x);
  check_dim(op, "x", x, 2);
  check_nonempty(op, "x", x);
  const CodebookShape s = check_codebook_args(op, codes, codebooks, scale, x.size(1), x, "x");
  check_bias(op, bias, s.N, "x", x);
  return s;
}

inline CodebookShape check_codebook_dequant(const char* op, const at::Tensor& codes, const at::Tensor& codebooks,
                                            const std::optional<at::Tensor>& scale, int64_t in_features) {
  if (in_features < 1) LOWBIT_FAIL(op, "in_features must be positive, got ", in_features);
  return check_codebook_args(op, codes, codebooks, scale, in_features, codes, "codes");
}

// ---- int4 cutlass_sm90 (mirrors lowbit/_checks.py: int4_sm90_shape, int4_repack_cutlass_sm90,
// int4_cutlass_sm90_mm; layout in lowbit/formats/int4.py)
inline int64_t check_int4_sm90_shape(const char* op, int64_t N, int64_t K, int64_t group_size) {
  if (K < 1 || K % 32 != 0)
    LOWBIT_FAIL(op, "K must be a positive multiple of 32 (16-byte rows of int4 for TMA), got K=", K);
  if (N % 8 != 0) LOWBIT_FAIL(op, "N must be a multiple of 8 (16-byte rows of scale, zero and output), got N=", N);
  if (group_size != 64 && group_size != 128 && group_size != K)
    LOWBIT_FAIL(op, "group_size must be 64, 128 or K=", K,
                " (a multiple of the kernel's K tile of 64, or one group per row), got ", group_size);
  return (K + group_size - 1) / group_size;
}

inline bool is_int4_sm90_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16;
}

inline int64_t check_int4_repack_cutlass_sm90(const char* op, const at::Tensor& packed_w, const at::Tensor& scale,
                                              const std::optional<at::Tensor>& zero, int64_t group_size, int64_t K,
                                              c10::ScalarType dtype) {
  check_dtype(op, "packed_w", packed_w, c10::ScalarType::Byte);
  check_dim(op, "packed_w", packed_w, 2);
  check_nonempty(op, "packed_w", packed_w);
  if (!is_int4_sm90_dtype(dtype)) LOWBIT_FAIL(op, "dtype must be float16 or bfloat16, got ", dtype_name(dtype));
  const int64_t N = packed_w.size(0);
  const int64_t groups = check_int4_sm90_shape(op, N, K, group_size);
  if (packed_w.size(1) != K / 2)
    LOWBIT_FAIL(op, "packed_w must have shape [N, K/2]=[", N, ", ", K / 2, "] for K=", K, ", got ",
                shape_str(packed_w));
  check_float_dtype(op, "scale", scale);
  check_dim(op, "scale", scale, 2);
  if (scale.size(0) != N || scale.size(1) != groups)
    LOWBIT_FAIL(op, "scale must have shape [N, ceil(K/group_size)]=[", N, ", ", groups, "], got ", shape_str(scale));
  check_same_device(op, "scale", scale, "packed_w", packed_w);
  if (zero.has_value()) {
    check_dtype(op, "zero", *zero, scale.scalar_type());
    check_dim(op, "zero", *zero, 2);
    if (zero->size(0) != N || zero->size(1) != groups)
      LOWBIT_FAIL(op, "zero must have shape [N, ceil(K/group_size)]=[", N, ", ", groups, "], got ", shape_str(*zero));
    check_same_device(op, "zero", *zero, "packed_w", packed_w);
  }
  return groups;
}

inline void check_int4_cutlass_sm90_mm(const char* op, const at::Tensor& x, const at::Tensor& packed,
                                       const at::Tensor& scale, const at::Tensor& zero, int64_t group_size,
                                       const std::optional<at::Tensor>& bias) {
  if (!is_int4_sm90_dtype(x.scalar_type()))
    LOWBIT_FAIL(op, "x must have dtype float16, bfloat16, got ", dtype_name(x.scalar_type()));
  check_dim(op, "x", x, 2);
  check_dtype(op, "packed", packed, c10::ScalarType::Byte);
  check_dim(op, "packed", packed, 2);
  check_same_device(op, "packed", packed, "x", x);
  check_nonempty(op, "x", x);
  check_nonempty(op, "packed", packed);
  const int64_t K = x.size(1), N = packed.size(0);
  const int64_t groups = check_int4_sm90_shape(op, N, K, group_size);
  if (packed.size(1) != K / 2)
    LOWBIT_FAIL(op, "packed must have shape [N, K/2]=[", N, ", ", K / 2, "] for K=", K, ", got ", shape_str(packed));
  auto check_group_vector = [&](const char* name, const at::Tensor& t) {
    check_dtype(op, name, t, x.scalar_type());
    check_dim(op, name, t, 2);
    if (t.size(0) != groups || t.size(1) != N)
      LOWBIT_FAIL(op, name, " must have shape [ceil(K/group_size), N]=[", groups, ", ", N, "], got ", shape_str(t));
    check_same_device(op, name, t, "x", x);
  };
  check_group_vector("scale", scale);
  check_group_vector("zero", zero);
  check_bias(op, bias, N, "x", x);
}

}  // namespace lowbit
