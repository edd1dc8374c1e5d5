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

# Every kernel family the INT8 .cu must contain, by a substring of its mangled name.
INT8_KERNELS = [
    "int8_quantize_rows_kernel",
    "int8_quantize_flat_kernel",
    "int8_amax_kernel",
    "int8_gemm_simt_kernel",
    "int8_wo_gemv_kernel",
    "int8_wo_wmma_kernel",
    "int8_wo_simt_f32_kernel",
    "DefaultGemmWithVisitor",  # CUTLASS int8 GEMM with the scaled epilogue visitor tree
    "cutlass6KernelINS_4gemm6kernel4Gemm",  # CUTLASS int8 GEMM, int32 out
]


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
@pytest.mark.parametrize("family", INT8_KERNELS)
def test_int8_kernels_present_for_every_arch(resources, family):
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


@needs_cuda_build
def test_tensor_core_instructions_are_used():
    so = cuda_resources.extension_path()
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found")
    funcs = _sass_by_function(so)
    expect = {  # kernel substring -> SASS opcode it must contain
        "DefaultGemmWithVisitor": "IMMA",
        "cutlass6KernelINS_4gemm6kernel4Gemm": "IMMA",
        "int8_wo_wmma_kernel": "HMMA",
        "int8_gemm_simt_kernel": "IDP.4A",
    }
    for arch in expected_archs():
        for family, opcode in expect.items():
            bodies = [body for (a, n), body in funcs.items() if a == arch and family in n]
            assert bodies, f"{family} not found in the {arch} SASS"
            for body in bodies:
                assert opcode in body, f"{family} on {arch} has no {opcode} instruction"


# ----------------------------------------------------------------------------- registration
@needs_cuda_build
@pytest.mark.parametrize("op", [op for op in _ops.op_names() if op.startswith("int8_")])
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
