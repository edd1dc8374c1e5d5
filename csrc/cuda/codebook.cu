// Codebook family, CUDA kernels (sm_80+): codebook_mm and codebook_dequant, registered for the
// `_cuda_` twins (format: lowbit/formats/codebook.py, spec: lowbit/backends/reference/codebook.py).
// UNVERIFIED: compiled (0 spills, scripts/check_cu.sh) but never run on a GPU.
//
// Codebooks are converted to fp32 once per call and staged in shared memory when the whole
// [R, G, C, E, d] tensor fits kSmemCodebookFloats (32 KiB: every 2-4 bit scalar codebook, PQ with
// 256 entries of 4 up to 8 groups, AQ 2x256x8); larger ones (16-bit codes) are read through the
// read-only cache. The C entries are summed in fp32 in order c = 0, 1, ..., as the reference
// does; the row scale multiplies the finished dot product.
//  * M <= 8: warp-per-output-row GEMV. The common formats (codebook_word_gemv_kernel: 2/4/8-bit
//    scalar, 8-bit codes of d = 2/4/8, two 8-bit codebooks of d = 8) load one 32-bit code word per
//    lane and step and decode each sub-vector once from shared memory; the rest (3/5/6/7/16-bit
//    codes, unaligned rows, codebooks beyond 32 KiB) take the generic kernel, whose lanes stride
//    over sub-vectors and decode their codes from the bit stream (codebook_layout.h) per dimension.
//  * larger M, fp16/bf16 x with one codebook (C = 1) of x's own dtype (kmeans, PQ, lattice as
//    CodebookLinear's default float16 codebooks with fp16 x): codebook_wmma_kernel, weights decoded
//    into shared memory as exact 16-bit values and multiplied on the tensor cores (WMMA). (nvcc
//    emits the bf16 WMMA fragment loads as generic LD.E from the shared tiles, fp16 as LDS.)
//  * other larger M: 64x64 output tiles, 256 threads; each K step decodes a [64 x 16] weight tile
//    and stages a [64 x 16] x tile in shared memory, then 4x4 fp32 FMA micro-tiles per thread.
//    (f32 x stays on fp32 FMA: TF32 would round x; summed codebooks are not exact in 16 bits.)
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lowbit/checks.h"
#include "lowbit/codebook_layout.h"
#include "lowbit/cuda/common.cuh"
#include "lowbit/cuda/host.cuh"
#include "lowbit/cuda/wmma_2x2.cuh"

namespace lowbit {
namespace cuda {
namespace {

using namespace host;
namespace cl = codebook_layout;

constexpr int kSmemCodebookFloats = 8192;
constexpr int kGemvWarps = 4;
constexpr int kGemvMaxRows = 8;
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kTileThreads = 256;

struct Layout {
  int64_t N, K, row_bytes, rows_per_r, vecs_per_g, G, C, E;
  int bits, d;
  int64_t cb_floats;
};

// Codebook values for this block: shared memory when staged, else global (read-only cache).
__device__ __forceinline__ const float* stage_codebooks(const float* __restrict__ cb, const Layout& L,
                                                        float* smem) {
  if (L.cb_floats > kSmemCodebookFloats) return cb;
  for (int64_t i = threadIdx.x; i < L.cb_floats; i += blockDim.x) smem[i] = __ldg(cb + i);
  __syncthreads();
  return smem;
}

// Sum over c of the entries of sub-vector j of row n, dimension t.
__device__ __forceinline__ float decode_weight(const uint8_t* __restrict__ row, const float* cb, const Layout& L,
                                               int64_t n, int64_t j, int t) {
  float v = 0.0f;
  for (int64_t c = 0; c < L.C; ++c) {
    const uint32_t code = cl::code_at(row, j * L.C + c, L.bits, L.row_bytes);
    v += cb[cl::entry_index(n, j, c, code, L.rows_per_r, L.vecs_per_g, L.G, L.C, L.E) * L.d + t];
  }
  return v;
}

// ---------------------------------------------------------------------------- GEMV, M <= 8
template <typename T, int kRows>
__global__ void __launch_bounds__(kGemvWarps * 32)
    codebook_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ cb_g,
                         const float* __restrict__ scale, const float* __restrict__ bias, T* __restrict__ out,
                         int64_t M, Layout L) {
  __shared__ float cb_s[kSmemCodebookFloats];
  const float* cb = stage_codebooks(cb_g, L, cb_s);
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= L.N) return;
  const uint8_t* row = codes + n * L.row_bytes;
  const int64_t J = L.K / L.d;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  for (int64_t j = lane; j < J; j += 32) {
    for (int t = 0; t < L.d; ++t) {
      const float w = decode_weight(row, cb, L, n, j, t);
      const int64_t k = j * L.d + t;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (m0 + r < M) acc[r] = fmaf(Num<T>::to_f32(x[(m0 + r) * L.K + k]), w, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float v = warp_sum(acc[r]);
    if (lane == 0 && m0 + r < M) {
      if (scale) v *= scale[n];
      if (bias) v += bias[n];
      out[(m0 + r) * L.N + n] = Num<T>::from_f32(v);
    }
  }
}

// ---------------------------------------------------------------------------- GEMV, whole code words
// The common formats (scalar k-means with 2/4/8-bit codes; PQ and lattice with 8-bit codes of
// d = 2, 4, 8; AQ with two 8-bit codebooks of d = 8) when their codebooks fit in shared memory
// and codebook_layout::word_decode_applies: each lane loads one aligned 32-bit word of codes per
// step, decodes each sub-vector's codes once (not once per dimension, as the generic kernel does),
// and reads the entries from a __shared__ array the compiler can see (LDS, not generic loads).
template <typename T, int kRows, int kBits, int kDim, int kC>
__global__ void __launch_bounds__(kGemvWarps * 32)
    codebook_word_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ codes,
                              const float* __restrict__ cb_g, const float* __restrict__ scale,
                              const float* __restrict__ bias, T* __restrict__ out, int64_t M, Layout L) {
  constexpr int kPerWord = 32 / (kBits * kC);
  constexpr int kE = 1 << kBits;
  __shared__ float cb_s[kSmemCodebookFloats];
  for (int i = threadIdx.x; i < static_cast<int>(L.cb_floats); i += blockDim.x) cb_s[i] = __ldg(cb_g + i);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= L.N) return;
  const uint32_t* row = reinterpret_cast<const uint32_t*>(codes + n * L.row_bytes);
  const int64_t J = L.K / kDim;
  const int64_t words = (J + kPerWord - 1) / kPerWord;
  // Codebook groups of this row start here; column group g adds g * (C * E * d) floats.
  const int row_group = static_cast<int>(n / L.rows_per_r) * static_cast<int>(L.G);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  for (int64_t w = lane; w < words; w += 32) {
    const uint32_t word = __ldg(row + w);
    const int group = row_group + static_cast<int>((w * kPerWord) / L.vecs_per_g);
    const float* book = cb_s + group * (kC * kE * kDim);
#pragma unroll
    for (int s = 0; s < kPerWord; ++s) {
      const int64_t j = w * kPerWord + s;
      if (j >= J) break;
      float v[kDim];
#pragma unroll
      for (int t = 0; t < kDim; ++t) v[t] = 0.0f;
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const float* entry = book + (c * kE + static_cast<int>(cl::code_in_word(word, s, c, kBits, kC))) * kDim;
#pragma unroll
        for (int t = 0; t < kDim; ++t) v[t] += entry[t];
      }
#pragma unroll
      for (int t = 0; t < kDim; ++t) {
        const int64_t k = j * kDim + t;
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          if (m0 + r < M) acc[r] = fmaf(Num<T>::to_f32(x[(m0 + r) * L.K + k]), v[t], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float v = warp_sum(acc[r]);
    if (lane == 0 && m0 + r < M) {
      if (scale) v *= scale[n];
      if (bias) v += bias[n];
      out[(m0 + r) * L.N + n] = Num<T>::from_f32(v);
    }
  }
}

// ---------------------------------------------------------------------------- tiled, larger M
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    codebook_tile_kernel(const T* __restrict__ x, const uint8_t* __restrict__ codes, const float* __restrict__ cb_g,
                         const float* __restrict__ scale, const float* __restrict__ bias, T* __restrict__ out,
                         int64_t M, Layout L) {
  __shared__ float cb_s[kSmemCodebookFloats];
  // +4 padding: the FMA loop reads 4 consecutive floats per thread without bank conflicts.
  __shared__ float xs[kTileK][kTileM + 4];
  __shared__ float ws[kTileK][kTileN + 4];
  const float* cb = stage_codebooks(cb_g, L, cb_s);
  const int64_t m_base = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int tid = threadIdx.x;
  const int tm = (tid / 16) * 4, tn = (tid % 16) * 4;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < L.K; k0 += kTileK) {
    // 64 x 16 = 1024 values each, 4 per thread; consecutive threads take consecutive k.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = tid + i * kTileThreads;
      const int kk = e % kTileK, rr = e / kTileK;
      const int64_t k = k0 + kk;
      const int64_t m = m_base + rr, n = n_base + rr;
      xs[kk][rr] = (m < M && k < L.K) ? Num<T>::to_f32(x[m * L.K + k]) : 0.0f;
      ws[kk][rr] = (n < L.N && k < L.K) ? decode_weight(codes + n * L.row_bytes, cb, L, n, k / L.d,
                                                        static_cast<int>(k % L.d))
                                        : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      fma_4x4(xs, ws, kk, [&](int i) { return tm + i; }, [&](int j) { return tn + j; }, acc);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t m = m_base + tm + i, n = n_base + tn + q;
      if (m < M && n < L.N) {
        float v = acc[i][q];
        if (scale) v *= scale[n];
        if (bias) v += bias[n];
        out[m * L.N + n] = Num<T>::from_f32(v);
      }
    }
}

// ---------------------------------------------------------------------------- tensor cores, larger M
// One codebook per sub-vector (C = 1) stored in x's own 16-bit type: every decoded weight is a
// codebook entry, exact in that type, so the tensor cores see exactly the reference's operands,
// the x*w products are exact in fp32 and only the accumulation order differs (as in the SIMT
// kernels). The row scale and bias are applied to the finished sum, as everywhere in this file.
// 64x64 outputs, 4 warps of 32x32 (WMMA 16x16x16, fp32 accumulate), K steps of 32; a thread
// stages a run of 16 consecutive k of one row of x and decodes the same run of one row of W.
namespace wmma_tile {
constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128, kRun = 16;
constexpr int kLd = kBK + 8;   // 80-byte rows: WMMA's 32-byte alignment, and rows start in different banks
constexpr int kLdC = kBN + 4;
constexpr int kSmemEntries = 8192;  // codebook values staged as T: 16 KiB
static_assert(kBM * kBK == kThreads * kRun && kBN * kBK == kThreads * kRun, "one run per thread and operand");
}  // namespace wmma_tile

template <typename T>
__global__ void __launch_bounds__(wmma_tile::kThreads)
    codebook_wmma_kernel(const T* __restrict__ x, const uint8_t* __restrict__ codes, const T* __restrict__ cb_g,
                         const float* __restrict__ scale, const float* __restrict__ bias, T* __restrict__ out,
                         int64_t M, Layout L) {
  using namespace wmma_tile;
  namespace wmma = nvcuda::wmma;
  struct Tiles {
    T a[kBM][kLd];
    T b[kBN][kLd];
  };
  union Smem {
    Tiles tiles;
    float c[kBM][kLdC];  // the final sums reuse the operand tiles' space
  };
  __shared__ __align__(128) Smem smem;
  __shared__ T cb_s[kSmemEntries];
  const int t = threadIdx.x, warp = t / 32;
  const int wm = warp / 2, wn = warp % 2;
  for (int i = t; i < static_cast<int>(L.cb_floats); i += kThreads) cb_s[i] = cb_g[i];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int rr = t / 2, rc = (t % 2) * kRun;
  const int64_t m = m0 + rr, n = n0 + rr;
  const bool a_ok = m < M, b_ok = n < L.N;
  const T* xrow = x + (a_ok ? m * L.K : 0);
  const uint8_t* crow = codes + (b_ok ? n * L.row_bytes : 0);
  const int64_t row_group = b_ok ? (n / L.rows_per_r) * L.G : 0;
  const T zero = Num<T>::from_f32(0.0f);

  wmma_2x2::Acc acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < L.K; k0 += kBK) {
    const int64_t kr = k0 + rc;  // first k of this thread's run; d divides 16, so runs hold whole sub-vectors
#pragma unroll
    for (int i = 0; i < kRun; ++i) smem.tiles.a[rr][rc + i] = (a_ok && kr + i < L.K) ? xrow[kr + i] : zero;
    for (int i = 0; i < kRun; i += L.d) {
      const int64_t j = (kr + i) / L.d;
      const bool ok = b_ok && kr + i < L.K;
      const uint32_t code = ok ? cl::code_at(crow, j, L.bits, L.row_bytes) : 0u;
      const int64_t first = ((row_group + j / L.vecs_per_g) * L.E + code) * L.d;
      for (int e = 0; e < L.d; ++e) smem.tiles.b[rr][rc + i + e] = ok ? cb_s[first + e] : zero;
    }
    __syncthreads();  // (the first pass also publishes the staged codebook)
    wmma_2x2::mma_tile<kBK>(acc, smem.tiles.a, smem.tiles.b, wm, wn);  // W tile is [n][k]: B^T
    __syncthreads();
  }
  wmma_2x2::store_tile(smem.c, acc, wm, wn);
  __syncthreads();
  for (int idx = t; idx < kBM * kBN; idx += kThreads) {
    const int r = idx / kBN, c = idx % kBN;
    const int64_t mo = m0 + r, no = n0 + c;
    if (mo < M && no < L.N) {
      float v = smem.c[r][c];
      if (scale) v = __fmul_rn(v, scale[no]);
      if (bias) v = __fadd_rn(v, bias[no]);
      out[mo * L.N + no] = Num<T>::from_f32(v);
    }
  }
}

// ---------------------------------------------------------------------------- dequant
template <typename T>
__global__ void __launch_bounds__(256)
    codebook_dequant_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ cb_g,
                            const float* __restrict__ scale, T* __restrict__ out, Layout L) {
  __shared__ float cb_s[kSmemCodebookFloats];
  const float* cb = stage_codebooks(cb_g, L, cb_s);
  // Rows on x (up to 2^31 - 1 blocks; y is limited to 65535), K strided over y.
  const int64_t n = blockIdx.x;
  const uint8_t* row = codes + n * L.row_bytes;
  const float s = scale ? scale[n] : 1.0f;
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; k < L.K;
       k += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    float v = decode_weight(row, cb, L, n, k / L.d, static_cast<int>(k % L.d));
    if (scale) v *= s;
    out[n * L.K + k] = Num<T>::from_f32(v);
  }
}

// ---------------------------------------------------------------------------- host
Layout make_layout(const CodebookShape& s, int64_t K, const at::Tensor& codes) {
  Layout L;
  L.N = s.N;
  L.K = K;
  L.row_bytes = codes.size(1);
  L.rows_per_r = s.N / s.R;
  L.vecs_per_g = s.J / s.G;
  L.G = s.G;
  L.C = s.C;
  L.E = s.E;
  L.bits = static_cast<int>(s.bits);
  L.d = static_cast<int>(s.d);
  L.cb_floats = s.R * s.G * s.C * s.E * s.d;
  return L;
}

template <typename T, int kRows>
void launch_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& cb, const float* scale,
                 const float* bias, at::Tensor& out, const Layout& L, cudaStream_t stream) {
  const int64_t M = x.size(0);
  const dim3 grid(static_cast<unsigned>((L.N + kGemvWarps - 1) / kGemvWarps),
                  static_cast<unsigned>((M + kRows - 1) / kRows));
  codebook_gemv_kernel<T, kRows><<<grid, kGemvWarps * 32, 0, stream>>>(
      ptr<const T>(x), ptr<const uint8_t>(codes), ptr<const float>(cb), scale, bias, ptr<T>(out), M, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kRows, int kBits, int kDim, int kC>
void launch_word_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& cb, const float* scale,
                      const float* bias, at::Tensor& out, const Layout& L, cudaStream_t stream) {
  const int64_t M = x.size(0);
  const dim3 grid(static_cast<unsigned>((L.N + kGemvWarps - 1) / kGemvWarps),
                  static_cast<unsigned>((M + kRows - 1) / kRows));
  codebook_word_gemv_kernel<T, kRows, kBits, kDim, kC><<<grid, kGemvWarps * 32, 0, stream>>>(
      ptr<const T>(x), ptr<const uint8_t>(codes), ptr<const float>(cb), scale, bias, ptr<T>(out), M, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The whole-word GEMV for the formats it is instantiated for; false (nothing launched) otherwise.
template <typename T>
bool try_word_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& cb, const float* scale,
                   const float* bias, at::Tensor& out, const Layout& L, cudaStream_t stream) {
  if (L.cb_floats > kSmemCodebookFloats || reinterpret_cast<uintptr_t>(codes.data_ptr()) % 4 != 0 ||
      !cl::word_decode_applies(L.bits, static_cast<int>(L.C), L.row_bytes, L.vecs_per_g))
    return false;
  const bool one_row = x.size(0) == 1;
  auto run = [&](auto bits, auto dim, auto books) {
    constexpr int kB = decltype(bits)::value, kD = decltype(dim)::value, kC = decltype(books)::value;
    if (one_row) launch_word_gemv<T, 1, kB, kD, kC>(x, codes, cb, scale, bias, out, L, stream);
    else launch_word_gemv<T, kGemvMaxRows, kB, kD, kC>(x, codes, cb, scale, bias, out, L, stream);
    return true;
  };
  using std::integral_constant;
  using I = int;
  const int b = L.bits, d = L.d, c = static_cast<int>(L.C);
  if (c == 1 && d == 1 && b == 2) return run(integral_constant<I, 2>{}, integral_constant<I, 1>{}, integral_constant<I, 1>{});
  if (c == 1 && d == 1 && b == 4) return run(integral_constant<I, 4>{}, integral_constant<I, 1>{}, integral_constant<I, 1>{});
  if (c == 1 && d == 1 && b == 8) return run(integral_constant<I, 8>{}, integral_constant<I, 1>{}, integral_constant<I, 1>{});
  if (c == 1 && d == 2 && b == 8) return run(integral_constant<I, 8>{}, integral_constant<I, 2>{}, integral_constant<I, 1>{});
  if (c == 1 && d == 4 && b == 8) return run(integral_constant<I, 8>{}, integral_constant<I, 4>{}, integral_constant<I, 1>{});
  if (c == 1 && d == 8 && b == 8) return run(integral_constant<I, 8>{}, integral_constant<I, 8>{}, integral_constant<I, 1>{});
  if (c == 2 && d == 8 && b == 8) return run(integral_constant<I, 8>{}, integral_constant<I, 8>{}, integral_constant<I, 2>{});
  return false;
}

at::Tensor codebook_mm_cuda(const at::Tensor& x_in, const at::Tensor& codes_in, const at::Tensor& codebooks,
                            const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& bias_in) {
  constexpr const char* op = "codebook_mm";
  const CodebookShape s = check_codebook_mm(op, x_in, codes_in, codebooks, scale_in, bias_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  require_sm80(op);
  const at::Tensor x = x_in.contiguous(), codes = codes_in.contiguous();
  const at::Tensor cb = codebooks.to(at::kFloat).contiguous();
  at::Tensor scale, bias;
  if (scale_in.has_value()) scale = scale_in->to(at::kFloat).contiguous();
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* scale_ptr = scale.defined() ? ptr<const float>(scale) : nullptr;
  const float* bias_ptr = bias.defined() ? ptr<const float>(bias) : nullptr;
  const int64_t M = x.size(0);
  const Layout L = make_layout(s, x.size(1), codes);
  at::Tensor out = at::empty({M, s.N}, x.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (M <= kGemvMaxRows) {
      if (try_word_gemv<T>(x, codes, cb, scale_ptr, bias_ptr, out, L, stream)) return;
      dispatch_gemv_rows(M, [&](auto rows) {
        launch_gemv<T, decltype(rows)::value>(x, codes, cb, scale_ptr, bias_ptr, out, L, stream);
      });
      return;
    }
    if constexpr (!std::is_same_v<T, float>) {
      if (codebooks.scalar_type() == x.scalar_type() && s.C == 1 && L.cb_floats <= wmma_tile::kSmemEntries) {
        const at::Tensor cb_t = codebooks.contiguous();
        const dim3 grid(static_cast<unsigned>((L.N + wmma_tile::kBN - 1) / wmma_tile::kBN),
                        static_cast<unsigned>((M + wmma_tile::kBM - 1) / wmma_tile::kBM));
        codebook_wmma_kernel<T><<<grid, wmma_tile::kThreads, 0, stream>>>(
            ptr<const T>(x), ptr<const uint8_t>(codes), ptr<const T>(cb_t), scale_ptr, bias_ptr, ptr<T>(out), M, L);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
    }
    const dim3 grid(static_cast<unsigned>((L.N + kTileN - 1) / kTileN), static_cast<unsigned>((M + kTileM - 1) / kTileM));
    codebook_tile_kernel<T><<<grid, kTileThreads, 0, stream>>>(ptr<const T>(x), ptr<const uint8_t>(codes),
                                                               ptr<const float>(cb), scale_ptr, bias_ptr, ptr<T>(out),
                                                               M, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor codebook_dequant_cuda(const at::Tensor& codes_in, const at::Tensor& codebooks,
                                 const std::optional<at::Tensor>& scale_in, int64_t in_features,
                                 std::optional<c10::ScalarType> out_dtype) {
  constexpr const char* op = "codebook_dequant";
  const CodebookShape s = check_codebook_dequant(op, codes_in, codebooks, scale_in, in_features);
  const c10::ScalarType out_type = check_fp8_out_dtype(op, out_dtype);
  c10::cuda::CUDAGuard guard(codes_in.device());
  require_sm80(op);
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor cb = codebooks.to(at::kFloat).contiguous();
  at::Tensor scale;
  if (scale_in.has_value()) scale = scale_in->to(at::kFloat).contiguous();
  const Layout L = make_layout(s, in_features, codes);
  at::Tensor out = at::empty({s.N, in_features}, codes.options().dtype(out_type));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks_k = static_cast<unsigned>(std::min<int64_t>((in_features + 255) / 256, 64));
  dispatch_float(out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    codebook_dequant_kernel<T><<<dim3(static_cast<unsigned>(s.N), blocks_k), 256, 0, stream>>>(
        ptr<const uint8_t>(codes), ptr<const float>(cb), scale.defined() ? ptr<const float>(scale) : nullptr,
        ptr<T>(out), L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("_cuda_codebook_mm", &cuda::codebook_mm_cuda);
  m.impl("_cuda_codebook_dequant", &cuda::codebook_dequant_cuda);
}

}  // namespace lowbit
