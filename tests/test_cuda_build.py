"""What can be proven about the CUDA kernels on a machine without a GPU.

* The built lowbit._C carries SASS for every architecture it was built for, and every kernel
  in it is free of spills (STACK == LOCAL == 0) and fits the chip's shared memory, read back
  from the binary with cuobjdump (lowbit.cuda_resources).
* The kernels use the instruction they were written for (IMMA for the CUTLASS int8 GEMMs,
  HMMA for the WMMA weight-only kernel): a silent fallback to another path would show here.
* Each `_cuda_<op>` twin has a CUDA kernel registered with the dispatcher.
* The thread-to-tile maps of the hand-written kernels (csrc/include/lowbit/int8_layout.h)
  cover each tile exactly once: compiled with the host compiler and checked here.

The extension-dependent tests skip when lowbit was built without CUDA kernels; the layout
test and the parser test need only a C++ compiler.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

from lowbit import _extension, _ops, cuda_resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_cuda_build = pytest.mark.skipif(
    not _extension.built_with_cuda(),
    reason=f"lowbit._C has no CUDA kernels here ({_extension.build_description()}); "
           "build with nvcc to run these checks",
)

# Every kernel family each .cu must contain, by a substring of its mangled name.
INT8_KERNELS = [
    "int8_quantize_rows_kernel",
    "int8_quantize_flat_kernel",
    "int8_amax_kernel",
    "int8_gemm_simt_kernel",
    "int8_wo_gemv_kernel",
    "int8_wo_wmma_kernel",
    "int8_wo_simt_f32_kernel",
    "DefaultGemmWithVisitorIa",  # CUTLASS int8 GEMM with the scaled epilogue visitor tree (A = int8_t)
    "cutlass6KernelINS_4gemm6kernel4Gemm",  # CUTLASS int8 GEMM, int32 out
]
INT4_KERNELS = ["int4_wo_gemv_kernel", "int4_wo_mma_kernel", "int4_wo_simt_f32_kernel"]
FP8_KERNELS = ["fp8_quantize_groups_kernel", "fp8_quantize_flat_kernel", "fp8_amax_kernel", "fp8_gemv_kernel",
               "fp8_mm_wmma_kernel", "fp8_wo_simt_f32_kernel",
               # Native FP8 GEMMs (CUTLASS): the real kernel in one arch's object, a stub elsewhere.
               "fp8_sm908Sm90Only", "fp8_sm898Sm89Only"]
# ---- sparse24
SPARSE24_KERNELS = ["sparse24_reorder_meta_kernel", "sparse24_meta_valid_kernel", "sparse24_simt_float_kernel",
                    "sparse24_simt_int8_kernel", "sparse24_float_epilogue_kernel", "sparse24_int8_epilogue_kernel",
                    "10SparseGemm"]

# ---- codebook
CODEBOOK_KERNELS = ["codebook_gemv_kernel", "codebook_word_gemv_kernel", "codebook_tile_kernel",
                    "codebook_wmma_kernel", "codebook_dequant_kernel"]


def expected_archs() -> list[str]:
    return ["sm_" + a.replace(".", "") for a in _extension.BUILD_CONFIG.CUDA_ARCHS]


@pytest.fixture(scope="module")
def resources():
    so = cuda_resources.extension_path()
    assert so is not None, "lowbit._C is loaded but its shared object was not found"
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found (install triton or the CUDA toolkit)")
    rows = cuda_resources.kernel_resources(so)
    assert rows, f"cuobjdump found no kernels in {so}"
    return rows


# ----------------------------------------------------------------------------- resources
@needs_cuda_build
def test_every_built_arch_has_sass(resources):
    archs = set(r["arch"] for r in resources)
    wanted = expected_archs()
    assert any(a.startswith("sm_80") for a in wanted) and any(a.startswith("sm_90") for a in wanted), (
        f"the build must target at least sm_80 and sm_90, it targets {wanted}")
    missing = [a for a in wanted if a not in archs]
    assert not missing, f"no SASS for {missing} (found {sorted(archs)})"


@needs_cuda_build
@pytest.mark.parametrize("family", INT8_KERNELS + INT4_KERNELS + FP8_KERNELS + SPARSE24_KERNELS + CODEBOOK_KERNELS)
def test_every_kernel_present_for_every_arch(resources, family):
    for arch in expected_archs():
        names = [r["kernel"] for r in resources if r["arch"] == arch]
        assert any(family in n for n in names), f"{family} missing from the {arch} SASS"


@needs_cuda_build
def test_no_kernel_spills(resources):
    spills = [f"{r['arch']} {cuda_resources.demangle(r['kernel'])}: stack={r['stack']} local={r['local']} "
              f"regs={r['registers']}"
              for r in resources if r["stack"] or r["local"]]
    assert not spills, "kernels with a stack frame or local memory (register spills):\n" + "\n".join(spills)


@needs_cuda_build
def test_static_shared_memory_fits_the_chip(resources):
    too_big = []
    for r in resources:
        limit = cuda_resources.SHARED_LIMIT.get(r["arch"], 99 * 1024)
        if r["shared"] > limit:
            too_big.append(f"{r['arch']} {cuda_resources.demangle(r['kernel'])}: {r['shared']} > {limit} bytes")
    assert not too_big, "\n".join(too_big)


@needs_cuda_build
def test_registers_within_the_per_thread_limit(resources):
    over = [r for r in resources if r["registers"] > 255]
    assert not over, over


# ----------------------------------------------------------------------------- instructions
def _sass_by_function(so: str) -> dict[tuple[str, str], str]:
    """(arch, mangled kernel) -> its SASS text."""
    tool = cuda_resources.cuobjdump_path()
    out = subprocess.run([tool, "-sass", so], capture_output=True, text=True, check=True).stdout
    funcs, arch, name, body = {}, None, None, []
    for line in out.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif s.startswith("Function : "):
            if name is not None:
                funcs[(arch_of_name, name)] = "\n".join(body)
            name, arch_of_name, body = s[len("Function : "):], arch, []
        elif name is not None:
            body.append(s)
    if name is not None:
        funcs[(arch_of_name, name)] = "\n".join(body)
    return funcs


# kernel substring -> SASS opcodes it must contain: the tensor-core instruction meant (IMMA for
# the CUTLASS int8 GEMMs, HMMA.16816 for mma.sync m16n8k16, HMMA for WMMA), IDP.4A for the
# SIMT fallback, and for the streaming kernels the 128-bit / async loads they were written for.
SASS_EXPECTED = {
    "DefaultGemmWithVisitorIa": ["IMMA"],
    "cutlass6KernelINS_4gemm6kernel4Gemm": ["IMMA"],
    "int8_wo_wmma_kernel": ["HMMA"],
    "int8_gemm_simt_kernel": ["IDP.4A"],
    "int4_wo_mma_kernel": ["HMMA.16816", "LDGSTS", "LDSM"],
    "int4_wo_gemv_kernel": ["LDG.E.128"],
    "fp8_mm_wmma_kernel": ["HMMA"],
    "fp8_gemv_kernel": ["LDG.E"],
    # ---- sparse24: CUTLASS SparseGemm runs the sparse tensor-core MMA (mma.sp)
    "10SparseGemm": [".SP"],
    # ---- codebook: codebooks staged in shared memory (LDS), decoded weights by FFMA.
    "codebook_gemv_kernel": ["LDS", "FFMA"],
    "codebook_word_gemv_kernel": ["LDS", "FFMA"],
    "codebook_tile_kernel": ["LDS", "FFMA"],
    "codebook_wmma_kernel": ["LDS", "HMMA"],
}


@needs_cuda_build
def test_kernels_use_their_instructions():
    so = cuda_resources.extension_path()
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")
    funcs = _sass_by_function(so)
    for arch in expected_archs():
        for family, opcodes in SASS_EXPECTED.items():
            bodies = [body for (a, n), body in funcs.items() if a == arch and family in n]
            assert bodies, f"{family} not found in the {arch} SASS"
            for body in bodies:
                for opcode in opcodes:
                    if (family, opcode) in KNOWN_SASS_GAPS:
                        continue
                    assert opcode in body, f"{family} on {arch} has no {opcode} instruction"


# Instructions a kernel is meant to use but does not yet: known defects, each with its cause.
# test_known_sass_gaps_are_still_open fails once one is fixed, so this list cannot go stale.
KNOWN_SASS_GAPS = {
    ("codebook_gemv_kernel", "LDS"): "the generic GEMV (now only for 3/5/6/7/16-bit codes, rows not of "
    "whole words and codebooks beyond 32 KiB; the common formats take codebook_word_gemv_kernel) gets "
    "the shared array or the global pointer from stage_codebooks, chosen at run time, so its codebook "
    "lookups are generic LD.E loads; templating it on the staging choice spilled 20 bytes on sm_80 in "
    "the unstaged kRows=2 variant",
}


@needs_cuda_build
@pytest.mark.parametrize("gap", sorted(KNOWN_SASS_GAPS))
def test_known_sass_gaps_are_still_open(gap):
    family, opcode = gap
    so = cuda_resources.extension_path()
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")
    funcs = _sass_by_function(so)
    bodies = [body for (a, n), body in funcs.items() if family in n]
    assert bodies, f"{family} not found in the SASS"
    assert any(opcode not in body for body in bodies), (
        f"{family} now uses {opcode} everywhere: remove it from KNOWN_SASS_GAPS")


# ----------------------------------------------------------------------------- registration
@needs_cuda_build
@pytest.mark.parametrize("op", _ops.op_names())
def test_cuda_twin_has_a_cuda_kernel(op):
    qualified = f"lowbit::{_ops.CUDA_TWIN_PREFIX}{op}"
    assert _extension.has_kernel(qualified, "CUDA"), f"{qualified} has no CUDA kernel registered"


# ----------------------------------------------------------------------------- parser
CANNED = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0 CONSTANT[4]:240
 Function _Z3fooPi:
  REG:40 STACK:8 SHARED:4608 LOCAL:16 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90a
code version = [1,8]

Resource usage:
 Function _Z3fooPi:
  REG:38 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:416 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin ptx code:
================
arch = sm_90a
"""


def test_resource_parser_reads_every_field():
    rows = cuda_resources.parse_resource_usage(CANNED)
    assert rows == [
        {"kernel": "_Z3fooPi", "arch": "sm_80", "registers": 40, "stack": 8, "local": 16, "shared": 4608},
        {"kernel": "_Z3fooPi", "arch": "sm_90a", "registers": 38, "stack": 0, "local": 0, "shared": 0},
    ]


def test_short_kernel_names():
    assert cuda_resources.short_name(
        "void lowbit::cuda::(anonymous namespace)::k<float, 8>(float const*, long)") == "lowbit::cuda::k<float, 8>"
    long_args = "void cutlass::Kernel2<" + "x" * 200 + ">(int)"
    assert cuda_resources.short_name(long_args) == "cutlass::Kernel2<...>"


# ----------------------------------------------------------------------------- layout maps
LAYOUT_PROBE = r"""
#include <cstdio>
#include "lowbit/int8_layout.h"
using namespace lowbit::int8_layout;
int main() {
  for (int t = 0; t < simt::kThreads; ++t) {
    TileRun r = simt::load_map(t);
    std::printf("simt_load %d %d %d\n", t, r.row, r.col);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) std::printf("simt_out %d %d %d\n", t, simt::out_row(t, i), simt::out_col(t, j));
  }
  for (int t = 0; t < tiled::kThreads; ++t) {
    TileRun r = tiled::load_map(t);
    std::printf("tc_load %d %d %d\n", t, r.row, r.col);
  }
  for (int t = 0; t < tiled::kThreads32; ++t) {
    TileRun r = tiled::load_map32(t);
    std::printf("f32_load %d %d %d\n", t, r.row, r.col);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j)
        std::printf("f32_out %d %d %d\n", t, tiled::out_row32(t, i), tiled::out_col32(t, j));
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int step = 0; step < 3; ++step) std::printf("gemv %d %d %lld\n", lane, step, (long long)gemv::vec_k(step, lane));
  std::printf("const %d %d %d %d %d %d %d %d %d %d\n", simt::kBM, simt::kBN, simt::kBK, simt::kRun, tiled::kBM,
              tiled::kBN, tiled::kBK, tiled::kRun, tiled::kBK32, tiled::kRun32);
  return 0;
}
"""


@pytest.fixture(scope="module")
def layout_maps(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("layout")
    src, exe = d / "probe.cpp", d / "probe"
    src.write_text(LAYOUT_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O0", "-I", os.path.join(ROOT, "csrc", "include"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    maps: dict[str, list[tuple[int, ...]]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        key, *vals = line.split()
        maps.setdefault(key, []).append(tuple(int(v) for v in vals))
    return maps


def _covered_once(loads, rows, cols, run):
    cells = Counter()
    for _, r, c in loads:
        assert 0 <= r < rows and 0 <= c and c + run <= cols, (r, c)
        assert c % run == 0, "a run must start on a multiple of its length (one aligned vector)"
        for e in range(run):
            cells[(r, c + e)] += 1
    return cells == Counter({(r, c): 1 for r in range(rows) for c in range(cols)})


def test_simt_gemm_maps_cover_each_tile_cell_once(layout_maps):
    bm, bn, bk, run, *_ = layout_maps["const"][0]
    assert bm == bn == 64
    # The A and B tiles are [64 rows, bk bytes]: every byte loaded by exactly one thread.
    assert _covered_once(layout_maps["simt_load"], bm, bk, run)
    # Every output of the 64x64 tile owned by exactly one (thread, i, j).
    owners = Counter((r, c) for _, r, c in layout_maps["simt_out"])
    assert owners == Counter({(r, c): 1 for r in range(bm) for c in range(bn)})


def test_weight_only_tile_maps_cover_each_tile_cell_once(layout_maps):
    *_, tbm, tbn, tbk, trun, tbk32, trun32 = layout_maps["const"][0]
    assert _covered_once(layout_maps["tc_load"], tbm, tbk, trun)
    assert _covered_once(layout_maps["f32_load"], tbm, tbk32, trun32)
    owners = Counter((r, c) for _, r, c in layout_maps["f32_out"])
    assert owners == Counter({(r, c): 1 for r in range(tbm) for c in range(tbn)})


def test_gemv_lanes_tile_k_without_gaps(layout_maps):
    starts = sorted(k for _, _, k in layout_maps["gemv"])
    # 3 steps x 32 lanes x 16 weights: k = 0, 16, 32, ... with no gap or overlap.
    assert starts == list(range(0, 3 * 32 * 16, 16))


# ============================================================================= INT4
# ----------------------------------------------------------------------------- int4_layout.h
INT4_PROBE = r"""
#include <cstdio>
#include <vector>
#include "lowbit/int4_layout.h"
using namespace lowbit::int4_layout;
static uint32_t le32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | uint32_t(p[3]) << 24; }
static uint32_t le16(const uint8_t* p) { return p[0] | p[1] << 8; }
int main(int argc, char** argv) {
  // stdin: N K, then the packed bytes of an [N, row_bytes(K)] tensor.
  long long N, K;
  if (std::scanf("%lld %lld", &N, &K) != 2) return 1;
  const long long rb = row_bytes(K);
  std::vector<uint8_t> w(N * rb);
  for (auto& v : w) { unsigned b; if (std::scanf("%u", &b) != 1) return 1; v = uint8_t(b); }
  std::printf("rb %lld %lld\n", rb, num_blocks(K));
  for (long long n = 0; n < N; ++n) {
    const uint8_t* row = &w[n * rb];
    for (long long k = 0; k < K; ++k) std::printf("code %lld %lld %d\n", n, k, code_at(row, k));
    for (long long b = 0; b < num_blocks(K); ++b) {
      const uint8_t* blk = row + b * kBlockBytes;
      for (int wi = 0; wi < 4; ++wi)  // GEMV: four 32-bit words of a 128-bit load
        for (int h = 0; h < 2; ++h)
          for (int e = 0; e < 4; ++e)
            std::printf("gemv %lld %lld %d\n", n, b * kBlock + gemv::col_in_block(wi, e, h),
                        int(code_byte_to_float(nibbles(le32(blk + 4 * wi), h), e)));
      for (int lane = 0; lane < 32; ++lane) {  // tensor core: lanes whose fragment column is this row
        if (mma::b_n(lane) != n % 8) continue;
        const uint32_t word = mma::b_word(le16(blk + mma::b_pair_offset(lane, 0)), le16(blk + mma::b_pair_offset(lane, 1)));
        for (int h = 0; h < 2; ++h)
          for (int i = 0; i < 4; ++i)
            std::printf("mma %lld %lld %d\n", n, b * kBlock + mma::b_col(lane, i, h),
                        int(code_byte_to_float(nibbles(word, h), i)));
      }
      for (int t = 0; t < tiled::kThreads32; ++t) {  // fp32 tiled: threads whose weight row is this row
        if (tiled::w_row32(t) != n % tiled::kBN) continue;
        const uint32_t word = le32(blk + tiled::w_byte32(t));
        for (int h = 0; h < 2; ++h)
          for (int e = 0; e < 4; ++e)
            std::printf("f32 %lld %lld %d\n", n, b * kBlock + tiled::w_col32(t, e, h),
                        int(code_byte_to_float(nibbles(word, h), e)));
      }
    }
  }
  // Magic-number decode of every code in every byte position, and the zero subtraction.
  for (uint32_t u = 0; u < 16; ++u)
    for (int i = 0; i < 4; ++i) std::printf("magic %u %d %.9g\n", u, i, code_byte_to_float(u << (8 * i), i));
  // Fragment maps.
  for (int lane = 0; lane < 32; ++lane) {
    for (int r = 0; r < 2; ++r)
      for (int e = 0; e < 2; ++e) std::printf("bfrag %d %d %d %d %d\n", lane, r, e, mma::b_k(lane, r, e), mma::b_n(lane));
    for (int c = 0; c < 4; ++c) std::printf("cfrag %d %d %d %d\n", lane, c, mma::c_m(lane, c), mma::c_n(lane, c));
    std::printf("afrag %d %d %d\n", lane, mma::a_row(lane), mma::a_col(lane));
  }
  // Shared-memory maps.
  for (int r = 0; r < gemv::kMaxRows; ++r)
    for (int c = 0; c < gemv::kChunk; ++c) std::printf("xidx %d %d %d\n", r, c, gemv::x_index(r, c));
  for (int i = 0; i < tiled::kXChunks; ++i) std::printf("xchunk %d %d %d\n", i, tiled::x_chunk(i).row, tiled::x_chunk(i).col);
  for (int t = 0; t < tiled::kThreads32; ++t) {
    std::printf("xrun32 %d %d %d\n", t, tiled::x_run32(t).row, tiled::x_run32(t).col);
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) std::printf("out32 %d %d %d\n", t, tiled::out_row32(t, i), tiled::out_col32(t, j));
  }
  // Groups: for (K, group_size) pairs, the group of each block.
  const long long cases[][2] = {{100, 100}, {4100, 4100}, {96, 32}, {100, 32}, {200, 64}, {300, 128}, {4096, 128}, {64, 64}};
  for (const auto& c : cases)
    for (long long b = 0; b < num_blocks(c[0]); ++b)
      std::printf("group %lld %lld %lld %lld\n", c[0], c[1], b, group_of_block(b, blocks_per_group(c[1], c[0])));
  std::printf("const %d %d %d %d %d %d\n", gemv::kChunk, gemv::kMaxRows, gemv::kXFloats, tiled::kBM, tiled::kBN,
              tiled::kXChunks);
  return 0;
}
"""

INT4_SHAPES = [(3, 100), (9, 32), (2, 4100), (65, 64)]  # partial blocks, exact blocks, > 1 chunk, > 1 tile row


@pytest.fixture(scope="module")
def int4_probe(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("int4_layout")
    src, exe = d / "probe.cpp", d / "probe"
    src.write_text(INT4_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(packed):
        N, rb = packed.shape
        K = run.K
        stdin = f"{N} {K}\n" + " ".join(str(int(v)) for v in packed.flatten().tolist()) + "\n"
        out: dict[str, list[tuple]] = {}
        for line in subprocess.run([str(exe)], input=stdin, check=True, capture_output=True,
                                   text=True).stdout.splitlines():
            key, *vals = line.split()
            out.setdefault(key, []).append(tuple(float(v) if "." in v else int(v) for v in vals))
        return out

    return run


@pytest.mark.parametrize("N,K", INT4_SHAPES)
def test_int4_layout_decodes_like_the_python_format(int4_probe, N, K):
    import torch

    from lowbit.formats import int4 as fmt

    g = torch.Generator().manual_seed(N * 10007 + K)
    codes = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    packed = fmt.pack(codes)
    int4_probe.K = K
    out = int4_probe(packed)
    assert out["rb"] == [(packed.shape[1], fmt.padded_k(K) // 32)]
    expected = {(n, k): int(codes[n, k]) for n in range(N) for k in range(K)}
    assert {(n, k): c for n, k, c in out["code"]} == expected
    # Each kernel's decode path reaches every real column of every row exactly once with the
    # right code; padding columns (k >= K) decode to 0, which the kernels pair with x = 0.
    for path in ("gemv", "mma", "f32"):
        seen = Counter((n, k) for n, k, _ in out[path])
        assert seen == Counter({(n, k): 1 for n in range(N) for k in range(fmt.padded_k(K))}), path
        got = {(n, k): c for n, k, c in out[path]}
        assert {key: got[key] for key in expected} == expected, path
        assert all(c == 0 for (n, k), c in got.items() if k >= K), path


@pytest.fixture(scope="module")
def int4_maps(int4_probe):
    import torch

    int4_probe.K = 1
    return int4_probe(torch.zeros((1, 16), dtype=torch.uint8))


def test_int4_magic_number_decode_is_exact(int4_maps):
    assert sorted(int4_maps["magic"]) == sorted((u, i, float(u)) for u in range(16) for i in range(4))


def test_int4_mma_fragment_maps_match_the_ptx_layout(int4_maps):
    # PTX ISA, mma.m16n8k16 (f16/bf16): B element (row k, col n) of lane = 4 * groupID + tid
    # sits in b{r}.{e} with k = 2 * tid + e + 8 * r and n = groupID; each (k, n) held by one lane.
    b = {(lane, r, e): (k, n) for lane, r, e, k, n in int4_maps["bfrag"]}
    assert b == {(lane, r, e): (2 * (lane % 4) + e + 8 * r, lane // 4)
                 for lane in range(32) for r in range(2) for e in range(2)}
    assert sorted(b.values()) == [(k, n) for k in range(16) for n in range(8)]
    # C/D: c{0,1} at row groupID, c{2,3} at row groupID + 8; column 2 * tid + (c % 2).
    c = {(lane, i): (m, n) for lane, i, m, n in int4_maps["cfrag"]}
    assert c == {(lane, i): (lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2) for lane in range(32) for i in range(4)}
    # ldmatrix.x4: lanes 8j..8j+7 address the rows of matrix j, and the A fragment's a{j} is
    # (rows 0-7 | 8-15) x (k 0-7 | 8-15) in the order j = 0: (0, 0), 1: (8, 0), 2: (0, 8), 3: (8, 8).
    a = {lane: (row, col) for lane, row, col in int4_maps["afrag"]}
    for j, (r0, c0) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        assert [a[lane] for lane in range(8 * j, 8 * j + 8)] == [(r0 + i, c0) for i in range(8)]


def test_int4_gemv_staging_is_injective_and_conflict_free(int4_maps):
    chunk, max_rows, floats, *_ = int4_maps["const"][0]
    idx = {(r, c): i for r, c, i in int4_maps["xidx"]}
    assert len(set(idx.values())) == len(idx) == max_rows * chunk
    assert all(0 <= i < floats for i in idx.values())
    for r in range(max_rows):
        for j in range(32):  # one read step: lane l reads column j of block l -> 32 distinct banks
            assert len({idx[(r, 32 * lane + j)] % 32 for lane in range(32)}) == 32
        for c0 in range(0, chunk, 32):  # staging: 32 consecutive columns by 32 lanes -> 32 banks
            assert len({idx[(r, c)] % 32 for c in range(c0, c0 + 32)}) == 32


def test_int4_tile_maps_cover_each_cell_once(int4_maps):
    *_, bm, bn, x_chunks = int4_maps["const"][0]
    assert _covered_once(int4_maps["xchunk"], bm, 32, 8) and len(int4_maps["xchunk"]) == x_chunks
    assert _covered_once(int4_maps["xrun32"], bm, 32, 8)
    owners = Counter((r, c) for _, r, c in int4_maps["out32"])
    assert owners == Counter({(r, c): 1 for r in range(bm) for c in range(bn)})


def test_int4_group_of_each_block_holds_its_columns(int4_maps):
    seen = set()
    for K, gs, b, g in int4_maps["group"]:
        seen.add((K, gs))
        cols = range(32 * b, min(32 * b + 32, K))
        assert {k // gs for k in cols} == {g}, (K, gs, b, g)
    assert len(seen) == 8


# ============================================================================= FP8
@needs_cuda_build
def test_fp8_small_m_kernels_use_128_bit_loads():
    so = cuda_resources.extension_path()
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")
    funcs = _sass_by_function(so)
    for arch in expected_archs():
        # The vectorized small-M variants (template flag kVec = true, mangled "Lb1E") stream
        # the fp8 weights with 128-bit loads.
        vec = [body for (a, n), body in funcs.items() if a == arch and re.search(r"fp8_gemv_kernel.*Lb1EEEv", n)]
        assert vec and all("LDG.E.128" in body for body in vec), f"fp8_gemv_kernel on {arch}: no 128-bit loads"


# ============================================================================= binary
# binary_prep_kernel: the CUTLASS GEMM's prepass; the GEMM itself is CUTLASS's DefaultGemmWithVisitor
# on cutlass::uint1b_t (= integer_subbyte<1, false> in the mangled name).
BINARY_CUTLASS = "DefaultGemmWithVisitorINS_15integer_subbyteILi1ELb0EEE"
BINARY_KERNELS = [BINARY_CUTLASS, "binary_prep_kernel", "binary_gemv_kernel", "binary_quantize_kernel"]
# b1 tensor cores: mma.sync m16n8k256 .and.popc is BMMA.168256.AND.POPC in SASS on sm_80, sm_89
# and sm_90a alike (checked with nvcc 13.0 + cuobjdump); CUTLASS feeds it with cp.async (LDGSTS)
# and ldmatrix (LDSM). The small-M kernel is __popc on CUDA cores.
SASS_EXPECTED[BINARY_CUTLASS] = ["BMMA.168256.AND.POPC", "LDGSTS", "LDSM"]
SASS_EXPECTED["binary_gemv_kernel"] = ["POPC"]
SASS_EXPECTED["binary_prep_kernel"] = ["POPC"]


@needs_cuda_build
@pytest.mark.parametrize("family", BINARY_KERNELS)
def test_every_binary_kernel_present_for_every_arch(resources, family):
    for arch in expected_archs():
        names = [r["kernel"] for r in resources if r["arch"] == arch]
        assert any(family in n for n in names), f"{family} missing from the {arch} SASS"


@needs_cuda_build
def test_binary_cutlass_kernels_are_attributed_to_binary_ops(resources):
    rows = [r for r in resources if BINARY_CUTLASS in r["kernel"]]
    assert rows and all(r["op"] == "binary_mm, binary_scaled_mm" for r in rows), {r["op"] for r in rows}


BINARY_PROBE = r"""
#include <cstdio>
#include <vector>
#include "lowbit/binary_layout.h"
using namespace lowbit::binary_layout;
int main() {
  // stdin: K, rows of a, rows of b, then the words (uint32) of a [Ma, W] and b [Mb, W].
  long long K, Ma, Mb;
  if (std::scanf("%lld %lld %lld", &K, &Ma, &Mb) != 3) return 1;
  const long long W = num_words(K), Wp = cutlass_row_words(K);
  std::vector<unsigned> a(Ma * W), b(Mb * W), ap(Ma * Wp), bp(Mb * Wp);
  for (auto& v : a) if (std::scanf("%u", &v) != 1) return 1;
  for (auto& v : b) if (std::scanf("%u", &v) != 1) return 1;
  std::printf("words %lld %lld\n", W, Wp);
  for (long long w = 0; w <= W; ++w) std::printf("mask %lld %u\n", w, word_mask(K, w));
  // The CUTLASS operands as binary_prep_kernel writes them, and their epilogue terms.
  std::vector<int> ta(Ma), tb(Mb);
  for (long long r = 0; r < Ma; ++r) {
    long long pop = 0;
    for (long long w = 0; w < Wp; ++w) pop += __builtin_popcount(ap[r * Wp + w] = cutlass_operand_word(&a[r * W], K, W, w));
    ta[r] = cutlass_a_term(K, pop);
  }
  for (long long r = 0; r < Mb; ++r) {
    long long pop = 0;
    for (long long w = 0; w < Wp; ++w) pop += __builtin_popcount(bp[r * Wp + w] = cutlass_operand_word(&b[r * W], K, W, w));
    tb[r] = cutlass_b_term(pop);
  }
  for (long long i = 0; i < Ma; ++i)
    for (long long j = 0; j < Mb; ++j) {
      long long x = 0, an = 0;
      for (long long w = 0; w < W; ++w) x += __builtin_popcount((a[i * W + w] ^ b[j * W + w]) & word_mask(K, w));
      // What the tensor cores count: AND over all K' bits of the repacked rows.
      for (long long w = 0; w < Wp; ++w) an += __builtin_popcount(ap[i * Wp + w] & bp[j * Wp + w]);
      std::printf("dot %lld %lld %d %d\n", i, j, dot_from_xor_count(K, x), dot_from_terms(ta[i], tb[j], int(an)));
    }
  for (long long i = 0; i < Ma * Wp; ++i) std::printf("apword %lld %u\n", i, ap[i]);
  // Element (r, k) of the repacked operands through CUTLASS's addressing (k < K' = 32 Wp).
  for (long long r = 0; r < Ma; ++r)
    for (long long k = 0; k < 32 * Wp; ++k) {
      const WordBit wb = b1_word_bit(b1_element_offset(r, k, Wp));
      std::printf("abit %lld %lld %u\n", r, k, (ap[wb.word] >> wb.bit) & 1u);
    }
  for (long long r = 0; r < Mb; ++r)
    for (long long k = 0; k < 32 * Wp; ++k) {
      const WordBit wb = b1_word_bit(b1_element_offset(r, k, Wp));
      std::printf("bbit %lld %lld %u\n", r, k, (bp[wb.word] >> wb.bit) & 1u);
    }
  // The terms at the extremes, where they and 4 * and wrap modulo 2^32.
  const long long kMax = 2147483647LL;
  const long long ext[][4] = {{kMax, kMax, kMax, kMax}, {kMax, kMax, 0, 0}, {kMax, 0, kMax, 0},
                              {kMax, 0, 0, 0}, {kMax, kMax / 2, kMax / 2 + 1, 7}, {1, 1, 1, 1}, {1, 0, 1, 0}};
  for (const auto& e : ext)
    std::printf("ext %lld %lld %lld %lld %d\n", e[0], e[1], e[2], e[3],
                dot_from_terms(cutlass_a_term(e[0], e[1]), cutlass_b_term(e[2]), int(e[3])));
  // The routing rule: queries "M N K aligned" after the operands, until EOF.
  long long M, N, Kq;
  int aligned;
  while (std::scanf("%lld %lld %lld %d", &M, &N, &Kq, &aligned) == 4)
    std::printf("route %lld %lld %lld %d %d %d\n", M, N, Kq, aligned, int(gemm_path(M, N, Kq)),
                int(cutlass_needs_repack(Kq, aligned != 0)));
  return 0;
}
"""

# The same repacked buffer read through CUTLASS's own host-side sub-byte references (TensorRef of
# uint1b_t, RowMajor for A and ColumnMajor for B with ld = K' bits): the packing the GEMM assumes.
BINARY_CUTLASS_PROBE = r"""
#include <cstdio>
#include <vector>
#include "cutlass/numeric_types.h"
#include "cutlass/layout/matrix.h"
#include "cutlass/tensor_ref.h"
int main() {
  // stdin: rows, words per row (a multiple of 4), then the words.
  long long R, Wp;
  if (std::scanf("%lld %lld", &R, &Wp) != 2) return 1;
  std::vector<unsigned> words(R * Wp);
  for (auto& v : words) if (std::scanf("%u", &v) != 1) return 1;
  auto* base = reinterpret_cast<cutlass::uint1b_t*>(words.data());
  cutlass::TensorRef<cutlass::uint1b_t, cutlass::layout::RowMajor> a(base, cutlass::layout::RowMajor(32 * Wp));
  cutlass::TensorRef<cutlass::uint1b_t, cutlass::layout::ColumnMajor> b(base, cutlass::layout::ColumnMajor(32 * Wp));
  for (long long r = 0; r < R; ++r)
    for (long long k = 0; k < 32 * Wp; ++k)
      std::printf("%lld %lld %d %d\n", r, k, int(a.at({int(r), int(k)})), int(b.at({int(k), int(r)})));
  return 0;
}
"""


def _host_cxx():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def binary_probe(tmp_path_factory):
    cxx = _host_cxx()
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp("binary_layout")
    src, exe = d / "probe.cpp", d / "probe"
    src.write_text(BINARY_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(K, a, b, routes=()):
        rows = [f"{K} {a.shape[0]} {b.shape[0]}"]
        rows += [" ".join(str(int(v) & 0xFFFFFFFF) for v in t.flatten().tolist()) for t in (a, b)]
        rows += [" ".join(str(int(v)) for v in q) for q in routes]
        out: dict[str, list[tuple]] = {}
        for line in subprocess.run([str(exe)], input="\n".join(rows) + "\n", check=True, capture_output=True,
                                   text=True).stdout.splitlines():
            key, *vals = line.split()
            out.setdefault(key, []).append(tuple(int(v) for v in vals))
        return out

    return run


def _random_words(rows, K, seed):
    """Random words, padding bits included: the format lets them be set, and kernels must ignore them."""
    import torch

    from lowbit.formats import binary as fmt

    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (rows, fmt.num_words(K)), generator=g, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("K", [1, 31, 32, 33, 65, 127, 128, 129, 1000])
def test_binary_layout_masks_and_dot_identities_match_the_format(binary_probe, K):
    import torch

    from lowbit.formats import binary as fmt

    W = fmt.num_words(K)
    a, b = _random_words(5, K, K), _random_words(7, K, K + 1)
    out = binary_probe(K, a, b)
    assert out["words"] == [(W, -(-W // 4) * 4)]
    # word_mask: exactly the bits of columns k < K; zero for a word past the row
    for w, mask in out["mask"]:
        assert mask == sum(1 << bit for bit in range(32) if 32 * w + bit < K), (w, mask)
    # the XOR count and the CUTLASS path (AND over the repacked rows + the epilogue terms) both
    # give the ±1 dot product of the format's definition, with the padding bits set in the input
    exact = (fmt.unpack(a, K, torch.float64) @ fmt.unpack(b, K, torch.float64).T).to(torch.int64)
    for i, j, via_xor, via_and in out["dot"]:
        assert via_xor == via_and == int(exact[i, j]), (i, j)


@pytest.mark.parametrize("K", [1, 33, 128, 200])
def test_binary_cutlass_element_addressing_matches_the_format(binary_probe, K):
    from lowbit.formats import binary as fmt

    a, b = _random_words(3, K, 2 * K), _random_words(4, K, 2 * K + 1)
    out = binary_probe(K, a, b)
    Wp = out["words"][0][1]
    for name, t in (("abit", a), ("bbit", b)):
        bits = fmt.unpack_bits(t, K)
        got = {(r, k): v for r, k, v in out[name]}
        assert len(got) == t.shape[0] * 32 * Wp
        for (r, k), v in got.items():
            # element (r, k) is bit k % 32 of word k / 32 of row r; zero past K (AND ignores it)
            assert v == (int(bits[r, k]) if k < K else 0), (name, r, k)


def test_binary_dot_terms_wrap_exactly_at_the_largest_k(binary_probe):
    import torch

    out = binary_probe(1, torch.zeros((1, 1), dtype=torch.int32), torch.zeros((1, 1), dtype=torch.int32))
    assert len(out["ext"]) == 7
    for K, pa, pb, both, dot in out["ext"]:
        # K - 2 popc(a ^ b), popc(a ^ b) = pa + pb - 2 and
        assert dot == K - 2 * (pa + pb - 2 * both), (K, pa, pb, both)


def _expected_route(M, N, K, aligned):
    """The routing rule, stated independently: (path, needs_repack); path 1 = CUTLASS, 0 = GEMV."""
    row_bits = -(-K // 128) * 128
    cutlass = M > 8 and M < 2**31 and N < 2**31 and -(-N // 256) <= 65535 and row_bits < 2**31
    return int(cutlass), int(K % 128 != 0 or not aligned)


def test_binary_gemm_routing_rule(binary_probe):
    import torch

    big_k = 2**31 - 1
    queries = [(M, N, K, al) for M in (1, 8, 9, 17, 256, 2**31 - 1, 2**31) for N in (1, 7, 65535 * 256,
               65535 * 256 + 1, 2**31) for K in (1, 96, 100, 128, 2**31 - 128, 2**31 - 129, big_k) for al in (0, 1)]
    out = binary_probe(1, torch.zeros((1, 1), dtype=torch.int32), torch.zeros((1, 1), dtype=torch.int32), queries)
    assert len(out["route"]) == len(queries)
    for M, N, K, al, path, repack in out["route"]:
        assert (path, repack) == _expected_route(M, N, K, al), (M, N, K, al)
    # the sweep reaches both paths and both repack decisions
    assert {r[4] for r in out["route"]} == {0, 1} and {r[5] for r in out["route"]} == {0, 1}


def _cutlass_host_includes():
    try:
        import cutlass_library
    except ImportError:
        return None
    inc = [os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")]
    # CUTLASS's headers include cuda_runtime_api.h and libcu++ (cuda/std/...), even on the host.
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for d in (os.path.join(cuda, "include"), os.path.join(cuda, "include", "cccl")):
        if os.path.isdir(d):
            inc.append(d)
    return inc if len(inc) == 3 else None


@pytest.mark.parametrize("K", [33, 256])
def test_cutlass_reads_the_repacked_words_as_the_format_says(binary_probe, tmp_path, K):
    from lowbit.formats import binary as fmt

    cxx, inc = _host_cxx(), _cutlass_host_includes()
    if cxx is None or inc is None:
        pytest.skip("needs a host C++ compiler, nvidia-cutlass and the CUDA headers")
    src, exe = tmp_path / "cutlass_probe.cpp", tmp_path / "cutlass_probe"
    src.write_text(BINARY_CUTLASS_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O0", *[f"-I{d}" for d in inc], str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    a = _random_words(3, K, 3 * K)
    out = binary_probe(K, a, a)
    Wp = out["words"][0][1]
    # the repacked words exactly as the prepass writes them, read by CUTLASS
    words = [v for _, v in sorted(out["apword"])]
    assert len(words) == 3 * Wp
    stdin = f"3 {Wp}\n" + " ".join(map(str, words)) + "\n"
    res = subprocess.run([str(exe)], input=stdin, check=True, capture_output=True, text=True).stdout.split("\n")
    ref_bits = fmt.unpack_bits(a, K)
    seen = 0
    for line in filter(None, res):
        r, k, via_row_major, via_col_major = map(int, line.split())
        want = int(ref_bits[r, k]) if k < K else 0
        assert via_row_major == via_col_major == want, (r, k)
        seen += 1
    assert seen == 3 * 32 * Wp


# ----------------------------------------------------------------------------- FP8 native GEMMs
# Kernels compiled for one architecture only: (kernel substring, arch) -> SASS opcodes. The
# sm_90a CUTLASS 3.x kernel: fp8 wgmma (QGMMA) fed by TMA (UTMALDG), results stored by TMA
# (UTMASTG); the sm_89 CUTLASS 2.x kernel: fp8 mma.sync (QMMA) fed by cp.async (LDGSTS).
FP8_NATIVE = {
    "fp8_sm908Sm90Only": ("sm_90a", ["QGMMA", "UTMALDG", "UTMASTG"]),
    "fp8_sm898Sm89Only": ("sm_89", ["QMMA", "LDGSTS"]),
}
TENSOR_CORE_OPCODES = ("QGMMA", "HGMMA", "IGMMA", "QMMA", "HMMA", "IMMA", "UTMALDG", "LDGSTS")


@needs_cuda_build
@pytest.mark.parametrize("family", FP8_NATIVE)
def test_fp8_native_kernels_only_in_their_arch(family):
    so = cuda_resources.extension_path()
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")
    funcs = _sass_by_function(so)
    home, opcodes = FP8_NATIVE[family]
    for arch in expected_archs():
        bodies = [body for (a, n), body in funcs.items() if a == arch and family in n]
        assert bodies, f"{family} not found in the {arch} SASS"
        for body in bodies:
            if arch == home:
                for opcode in opcodes:
                    assert opcode in body, f"{family} on {arch} has no {opcode} instruction"
            else:
                # Every other object carries an empty stub: no tensor-core or async-copy code.
                assert not any(op in body for op in TENSOR_CORE_OPCODES), f"{family} on {arch} is not a stub"


def test_short_names_keep_the_first_template_level_when_it_fits():
    # `lowbit info --kernels` then names lowbit's wrapper of a CUTLASS kernel, not just CUTLASS's entry point.
    inner = "cutlass::gemm::kernel::GemmUniversal<" + "x" * 300 + ">"
    assert cuda_resources.short_name(f"void cutlass::device_kernel<lowbit::cuda::fp8_sm90::Sm90Only<{inner}>>(int)") \
        == "cutlass::device_kernel<lowbit::cuda::fp8_sm90::Sm90Only<...>>"


# ============================================================================= codebook
# ----------------------------------------------------------------------------- codebook_layout.h
CODEBOOK_PROBE = r"""
#include <cstdio>
#include <vector>

#include "lowbit/codebook_layout.h"
using namespace lowbit::codebook_layout;

int main() {
  long long n, row_bytes, num_codes;
  int bits;
  while (std::scanf("%d %lld %lld %lld", &bits, &n, &num_codes, &row_bytes) == 4) {
    std::vector<uint8_t> data(n * row_bytes);
    for (auto& b : data) {
      int v;
      std::scanf("%d", &v);
      b = static_cast<uint8_t>(v);
    }
    for (long long r = 0; r < n; ++r)
      for (long long i = 0; i < num_codes; ++i)
        std::printf("%u ", code_at(data.data() + r * row_bytes, i, bits, row_bytes));
    std::printf("\n");
  }
  std::printf("%lld\n", (long long)entry_index(5, 7, 1, 3, 2, 4, 2, 2, 8));
  return 0;
}
"""


def test_codebook_layout_decodes_like_the_python_format(tmp_path):
    import torch

    from lowbit.formats import codebook as fmt
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src, exe = tmp_path / "probe.cpp", tmp_path / "probe"
    src.write_text(CODEBOOK_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O1", "-fsanitize=address", "-I", os.path.join(ROOT, "csrc", "include"),
                    str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    stdin, want = [], []
    for bits in range(1, 17):
        codes = torch.randint(0, 2**bits, (3, 7, 2))
        packed = fmt.pack(codes, bits)
        stdin.append(f"{bits} 3 14 {packed.shape[1]} " + " ".join(str(int(v)) for v in packed.flatten().tolist()))
        want.append(codes.reshape(-1).tolist())
    lines = subprocess.run([str(exe)], input="\n".join(stdin) + "\n", check=True, capture_output=True,
                           text=True).stdout.splitlines()
    assert [[int(v) for v in line.split()] for line in lines[:-1]] == want
    # row 5 of R-groups of 2 rows -> r = 2; sub-vector 7 of groups of 4 -> g = 1; G = 2, C = 2, E = 8
    assert int(lines[-1]) == ((2 * 2 + 1) * 2 + 1) * 8 + 3


CODEBOOK_WORD_PROBE = r"""
#include <cstdio>
#include <vector>

#include "lowbit/codebook_layout.h"
using namespace lowbit::codebook_layout;

int main() {
  int bits, C;
  long long n, J, row_bytes;
  while (std::scanf("%d %d %lld %lld %lld", &bits, &C, &n, &J, &row_bytes) == 5) {
    std::vector<uint8_t> data(n * row_bytes);
    for (auto& b : data) {
      int v;
      std::scanf("%d", &v);
      b = static_cast<uint8_t>(v);
    }
    const int per_word = subvecs_per_word(bits, C);
    for (long long r = 0; r < n; ++r)
      for (long long j = 0; j < J; ++j)
        for (int c = 0; c < C; ++c)
          std::printf("%u ", code_in_word(word_at(data.data() + r * row_bytes, j / per_word), j % per_word, c, bits, C));
    std::printf("\n");
  }
  // (bits, C, row_bytes, vecs_per_g) -> applies?
  std::printf("%d %d %d %d %d\n", word_decode_applies(4, 1, 2048, 512), word_decode_applies(3, 1, 1536, 512),
              word_decode_applies(8, 1, 1026, 4), word_decode_applies(8, 1, 1024, 2), word_decode_applies(8, 2, 2048, 2));
  return 0;
}
"""


def test_codebook_word_decode_matches_the_python_format(tmp_path):
    """The CUDA whole-word GEMV's decode (word_at + code_in_word) against lowbit.formats.codebook.pack."""
    import torch

    from lowbit.formats import codebook as fmt
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    src, exe = tmp_path / "probe.cpp", tmp_path / "probe"
    src.write_text(CODEBOOK_WORD_PROBE)
    subprocess.run([cxx, "-std=c++17", "-O1", "-fsanitize=address", "-I", os.path.join(ROOT, "csrc", "include"),
                    str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    stdin, want = [], []
    for bits in (1, 2, 4, 8, 16):
        for C in (1, 2):
            if 32 % (bits * C):
                continue
            J = 3 * 32 // (bits * C) + 32 // (bits * C) // 2  # a partial last word when it holds > 1
            codes = torch.randint(0, 2**bits, (3, J, C))
            packed = fmt.pack(codes, bits)
            pad = (-packed.shape[1]) % 4  # the kernel takes this path only for rows of whole words
            packed = torch.nn.functional.pad(packed, (0, pad))
            stdin.append(f"{bits} {C} 3 {J} {packed.shape[1]} " + " ".join(str(int(v)) for v in packed.flatten()))
            want.append(codes.reshape(-1).tolist())
    lines = subprocess.run([str(exe)], input="\n".join(stdin) + "\n", check=True, capture_output=True,
                           text=True).stdout.splitlines()
    assert [[int(v) for v in line.split()] for line in lines[:-1]] == want
    # 3-bit codes straddle words; 1026-byte rows are not whole words; 2 sub-vectors per column
    # group but 4 per word would mix groups in a word.
    assert lines[-1].split() == ["1", "0", "0", "0", "1"]


# ============================================================================= int4 cutlass_sm90
# csrc/cuda/int4_sm90.cu: the repack and fallback kernels (every arch), and CUTLASS's sm_90
# mixed-input GEMM: the real kernel in the sm_90a object only (HGMMA with the converted int4
# weights as the register operand, TMA loads of weights / activations / scales / zeros, TMA
# store of the output), an empty stub elsewhere.
INT4_SM90_KERNELS = ["int4_sm90_repack_kernel", "int4_sm90_repack_scales_kernel", "int4_sm90_dequant_kernel",
                     "int4_sm908Sm90Only"]
INT4_SM90_NATIVE = {"int4_sm908Sm90Only": ("sm_90a", ["HGMMA", "UTMALDG", "UTMASTG"])}


@needs_cuda_build
@pytest.mark.parametrize("family", INT4_SM90_KERNELS)
def test_every_int4_sm90_kernel_present_for_every_arch(resources, family):
    for arch in expected_archs():
        names = [r["kernel"] for r in resources if r["arch"] == arch]
        assert any(family in n for n in names), f"{family} missing from the {arch} SASS"


@needs_cuda_build
@pytest.mark.parametrize("family", INT4_SM90_NATIVE)
def test_int4_sm90_kernel_only_in_its_arch(family):
    so = cuda_resources.extension_path()
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")
    funcs = _sass_by_function(so)
    home, opcodes = INT4_SM90_NATIVE[family]
    for arch in expected_archs():
        bodies = [body for (a, n), body in funcs.items() if a == arch and family in n]
        assert bodies, f"{family} not found in the {arch} SASS"
        for body in bodies:
            if arch == home:
                for opcode in opcodes:
                    assert opcode in body, f"{family} on {arch} has no {opcode} instruction"
            else:
                assert not any(op in body for op in TENSOR_CORE_OPCODES), f"{family} on {arch} is not a stub"
