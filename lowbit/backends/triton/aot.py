"""Ahead-of-time compile of every lowbit Triton kernel for the chips we ship to, without a GPU.

Triton builds real PTX and cubins for a chip it cannot see. For every kernel x autotune config x
target this module compiles the kernel, reads the cubin's resources with the ``cuobjdump`` that
Triton bundles, and flags what would fail or run badly on the chip:

* register spills (``STACK`` or ``LOCAL`` above 0),
* shared memory above the chip's per-block limit,
* more registers than one SM holds for the block (the launch would fail),
* a GEMM whose PTX lacks the tensor-core instruction (``mma`` on sm_80/sm_89; ``wgmma`` or
  ``mma`` on sm_90, the one found is recorded),
* a target that should refuse a kernel (e.g. fp8 on sm_80) but compiled it.

:data:`AOT_KERNELS` is the one list of kernels; each family appends its entries. Configs come
from the same functions the autotuners use, so what CI compiles is what the autotuner can pick.
tests/test_triton_aot.py fails when a kernel is missing from the list.

    python -m lowbit.backends.triton.aot [--json] [--targets 80,90] [--jobs N]

With ``TRITON_INTERPRET=1`` (CPU test runs) ``@triton.jit`` yields interpreter objects that
cannot be compiled, so :func:`compile_all` then compiles in a subprocess without that variable.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

import triton

from . import int8
from . import int4
from . import fp8
from . import sparse24

TARGETS = (80, 89, 90)

# The Triton of the GPU machines (torch 2.11's pin). Its ptxas allocates registers differently
# from later releases' (configs clean under 3.8 spilled under it, and int8 dots that compiled
# under 3.8 did not compile), so scripts/install.sh puts it in a side environment,
# GPU_TRITON_ENV, and tests/test_triton_aot.py runs this whole check under it as well.
GPU_MACHINE_TRITON = "3.6.0"
GPU_TRITON_ENV = ".venv-triton-gpu"

# Largest dynamic shared memory one block may opt into (CUDA programming guide, "Compute
# capabilities"): sm_86/sm_89 have a smaller carve-out than sm_80 despite the higher number.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536


@dataclasses.dataclass(frozen=True)
class AotKernel:
    """One kernel specialisation to compile with each of its configs on each target."""

    name: str  # "<op>[variant]", unique
    fn: object  # the module-level object: Autotuner, Heuristics or JITFunction
    signature: dict  # arg -> "*i8", "i32", "constexpr", ...
    constexprs: dict  # values of the non-config constexpr args (and args specialised to 1)
    configs: tuple  # dicts: constexpr values + num_warps + num_stages
    aligned: tuple = ()  # args compiled as divisible by 16, as the JIT does for aligned tensors
    gemm: bool = False
    tensor_cores: bool = True  # False: a GEMM whose dot is meant for CUDA cores (fp32 IEEE)
    targets: tuple = TARGETS
    refused: tuple = ()  # targets that must reject the kernel (e.g. fp8 below sm_89)
    options: tuple = ()  # (name, value) compile options the host function launches with


@dataclasses.dataclass
class AotResult:
    kernel: str
    config: str
    target: int
    status: str  # "ok", "refused" (as intended), "error"
    registers: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1  # bytes: static + dynamic
    threads: int = 0
    tensor_op: str = ""  # "wgmma", "mma", "none"
    seconds: float = 0.0
    problems: list = dataclasses.field(default_factory=list)


def config_dict(cfg: "triton.Config") -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _configs(config_fn) -> tuple:
    return tuple(config_dict(c) for c in config_fn())


def base_jit(obj):
    """The JITFunction (or interpreter function) under autotune/heuristics wrappers."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(obj, (Autotuner, Heuristics)):
        obj = obj.fn
    return obj


def _meta_params(fn) -> set:
    """Names of the kernel's tl.constexpr parameters."""
    params = inspect.signature(base_jit(fn).fn).parameters.values()
    return {p.name for p in params if "constexpr" in str(p.annotation)}


def _spec(fn, types: dict, *, unit=(), aligned=()):
    """(signature, constexprs, aligned) as the JIT specialises a launch.

    `types` gives the pointer types; other runtime arguments are i32. The `unit` strides are
    the constant 1 (the JIT turns an int argument equal to 1 into a constexpr) and the
    `aligned` arguments are divisible by 16 (16-byte-aligned pointers, sizes and strides that
    are multiples of 16), which lets loads vectorise."""
    names = base_jit(fn).arg_names
    meta = _meta_params(fn)
    unknown = (set(types) | set(unit) | set(aligned)) - set(names)
    if unknown:
        raise KeyError(f"{base_jit(fn).__name__}: no argument(s) {sorted(unknown)}")
    sig = {n: "constexpr" if (n in meta or n in unit) else types.get(n, "i32") for n in names}
    return sig, {n: 1 for n in unit}, tuple(a for a in aligned if a not in unit)


# ============================================================================ INT8
# As the JIT specialises a launch. The host functions hand every GEMM operand over
# K-contiguous, 16-byte aligned, with K and the row stride multiples of 16 (a tensor that is
# not is copied into a zero-padded one first: unaligned int8 tiles load byte by byte and
# spill heavily, 300 B to 4.5 KB of stack on every config), so the only layout freedom left
# is N, the output's row length: "" has N % 16 == 0, "[odd-N]" does not (LM heads, 50257).
# dtype variants cover every pointer type the host functions pass.
GEMM_LAYOUTS = ("", "odd-N")


def _int8_entries():
    entries = []

    def add(name, fn, types, configs, meta, *, unit, aligned, **kw):
        sig, ones, al = _spec(fn, types, unit=unit, aligned=aligned)
        entries.append(AotKernel(name, fn, sig, {**ones, **meta}, _configs(configs), aligned=al, **kw))

    def quantize(x_ty, dynamic):
        add(f"int8_quantize_{'dynamic' if dynamic else 'static'}[{x_ty[1:]}]", int8._int8_quantize_kernel,
            {"x_ptr": x_ty, "q_ptr": "*i8", "scale_ptr": "*fp32"}, int8.quantize_configs, {"DYNAMIC": dynamic},
            # a static scalar scale has stride 0 (broadcast), a per-row one stride 1
            unit=("stride_xk", "stride_qk") + (("stride_s",) if dynamic else ()),
            aligned=("x_ptr", "q_ptr", "scale_ptr", "K", "stride_xr", "stride_qr"))

    quantize("*fp32", True)
    quantize("*bf16", True)
    quantize("*fp16", False)

    def gemm(a, b, layout, vectors):
        """(unit, aligned, name suffix) for a [M, K] and b [N, K] operands, row-major c [M, N],
        and per-row/column `vectors` {stride name suffix: pointer name} read with stride 1."""
        unit = (f"stride_{a}k", f"stride_{b}k", "stride_cn") + tuple(f"stride_{v}" for v in vectors)
        aligned = (f"{a}_ptr", f"{b}_ptr", "c_ptr", "K", f"stride_{a}m", f"stride_{b}n")
        aligned += tuple(vectors.values())
        if layout != "odd-N":
            aligned += ("N", "stride_cm")
        return {"unit": unit, "aligned": aligned}, f"[{layout}]" if layout else ""

    for layout in GEMM_LAYOUTS:
        spec, suffix = gemm("a", "b", layout, {})
        add("int8_mm" + suffix, int8._int8_mm_kernel, {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*i32"},
            int8.gemm_configs, {}, gemm=True, **spec)

    def scaled(out_ty, bias_ty, layout="", scalar_scales=False):
        # Scalar scales are broadcast with stride 0. Without bias the host passes scale_b as
        # a dummy pointer with stride 0.
        vectors = {} if scalar_scales else {"sa": "scale_a_ptr", "sb": "scale_b_ptr"}
        vectors.update({"bias": "bias_ptr"} if bias_ty else {})
        spec, suffix = gemm("a", "b", layout, vectors)
        scales = ",scalar-scales" if scalar_scales else ""
        add(f"int8_scaled_mm[{out_ty[1:]},bias={bias_ty[1:] if bias_ty else 'none'}{scales}]{suffix}",
            int8._int8_scaled_mm_kernel,
            {"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": out_ty, "scale_a_ptr": "*fp32", "scale_b_ptr": "*fp32",
             "bias_ptr": bias_ty or "*fp32"},
            int8.gemm_configs, {"HAS_BIAS": bias_ty is not None}, gemm=True, **spec)

    scaled("*fp32", None, scalar_scales=True)
    scaled("*bf16", "*bf16")
    scaled("*fp16", "*fp32", "odd-N")

    def weight_only(x_ty, bias_ty, layout=""):
        ieee = x_ty == "*fp32"
        spec, suffix = gemm("x", "w", layout, {"s": "scale_ptr", **({"bias": "bias_ptr"} if bias_ty else {})})
        add(f"int8_weight_only_mm[{x_ty[1:]},bias={bias_ty[1:] if bias_ty else 'none'}]{suffix}",
            int8._int8_weight_only_mm_fp32 if ieee else int8._int8_weight_only_mm_tc,
            {"x_ptr": x_ty, "w_ptr": "*i8", "c_ptr": x_ty, "scale_ptr": x_ty, "bias_ptr": bias_ty or x_ty},
            int8.weight_only_fp32_configs if ieee else int8.weight_only_configs,
            {"HAS_BIAS": bias_ty is not None, "IEEE": ieee}, gemm=True, tensor_cores=not ieee, **spec)

    weight_only("*fp16", "*fp16")
    weight_only("*bf16", None)
    weight_only("*fp32", "*fp32")
    weight_only("*bf16", "*bf16", "odd-N")
    weight_only("*fp32", None, "odd-N")
    return entries


AOT_KERNELS: list[AotKernel] = []
AOT_KERNELS += _int8_entries()


# ============================================================================ INT4
# As the JIT specialises a launch from lowbit.backends.triton.int4.int4_weight_only_mm: x is
# handed over as for the INT8 GEMMs (K-contiguous, aligned, K padded to 16); packed_w rows are
# byte-contiguous and aligned, their length ceil(K/32)*16 a multiple of 16; group_size is a
# multiple of 32 (per channel becomes ceil(K/32)*32); scale and zero are contiguous [N, G], so
# their column stride is 1 and their row stride G is aligned only when G is (G = 1 per channel
# is specialised to 1, like any stride of 1). Variants cover every x dtype, scales in each
# float dtype, zero or symmetric, bias or not, odd N, per channel.
def _int4_entries():
    entries = []

    def weight_only(x_ty, s_ty, zero, bias_ty, layout=""):
        ieee = x_ty == "*fp32"
        fn = int4._int4_weight_only_mm_fp32 if ieee else int4._int4_weight_only_mm_tc
        unit = ("stride_xk", "stride_wk", "stride_cn", "stride_sg") + (("stride_bias",) if bias_ty else ())
        aligned = ("x_ptr", "w_ptr", "c_ptr", "scale_ptr", "zero_ptr", "K", "KB", "group_size",
                   "stride_xm", "stride_wn") + (("bias_ptr",) if bias_ty else ())
        if layout == "per-channel":
            unit += ("stride_sn",)
        if layout != "odd-N":
            aligned += ("N", "stride_cm")
        sig, ones, al = _spec(fn, {"x_ptr": x_ty, "w_ptr": "*u8", "c_ptr": x_ty, "scale_ptr": s_ty,
                                   "zero_ptr": s_ty, "bias_ptr": bias_ty or s_ty}, unit=unit, aligned=aligned)
        name = (f"int4_weight_only_mm[{x_ty[1:]},scale={s_ty[1:]},{'zero' if zero else 'sym'},"
                f"bias={bias_ty[1:] if bias_ty else 'none'}]" + (f"[{layout}]" if layout else ""))
        configs = int4.weight_only_fp32_configs if ieee else int4.weight_only_configs
        entries.append(AotKernel(name, fn, sig, {**ones, "HAS_ZERO": zero, "HAS_BIAS": bias_ty is not None,
                                                 "IEEE": ieee}, _configs(configs), aligned=al, gemm=True,
                                 tensor_cores=not ieee))

    weight_only("*fp16", "*fp16", True, "*fp16")
    weight_only("*bf16", "*bf16", False, None, "odd-N")
    weight_only("*bf16", "*fp32", True, None, "per-channel")
    weight_only("*fp32", "*fp32", True, "*fp32", "odd-N")
    return entries


AOT_KERNELS += _int4_entries()

# @triton.jit functions that are only ever called from kernels (inlined into them), so they
# are compiled as part of the kernels that use them.
DEVICE_FUNCTIONS = [int8._tile_offsets, int8._dot_k_loop]
DEVICE_FUNCTIONS += [int4._per_byte, int4._store_with_bias]

# ---- int4 cutlass_sm90 layout (Triton)
# As the JIT specialises launches from lowbit.backends.triton.int4.int4_cutlass_sm90_mm: x as for
# the other GEMMs (K-contiguous, aligned; K % 32 == 0); packed rows byte-contiguous and aligned,
# K/2 bytes long (a multiple of 16); scale and zero' contiguous [G, N] (stride 1 along N, row
# stride N aligned only when N % 16 == 0: N % 8 == 0 is all the op asks, hence "odd-N" = N % 16
# == 8); group_size 64, 128 or K rounded up to 64. M = 1 (decode) is specialised by the JIT like
# any argument equal to 1. Variants cover fp16 and bf16, bias or not (in T or fp32).
def _int4_sm90_entries():
    entries = []

    def mm(t_ty, bias_ty, layout=""):
        fn = int4._int4_cutlass_sm90_mm
        unit = ("stride_xk", "stride_wk", "stride_cn", "stride_sn") + (("stride_bias",) if bias_ty else ())
        unit += ("M",) if layout == "M=1" else ()
        aligned = ("x_ptr", "w_ptr", "c_ptr", "scale_ptr", "zero_ptr", "K", "group_size", "stride_xm", "stride_wn")
        aligned += ("bias_ptr",) if bias_ty else ()
        if layout != "odd-N":
            aligned += ("N", "stride_cm", "stride_sg")
        sig, ones, al = _spec(fn, {"x_ptr": t_ty, "w_ptr": "*u8", "c_ptr": t_ty, "scale_ptr": t_ty, "zero_ptr": t_ty,
                                   "bias_ptr": bias_ty or t_ty}, unit=unit, aligned=aligned)
        name = f"int4_cutlass_sm90_mm[{t_ty[1:]},bias={bias_ty[1:] if bias_ty else 'none'}]" + (
            f"[{layout}]" if layout else "")
        entries.append(AotKernel(name, fn, sig, {**ones, "HAS_BIAS": bias_ty is not None},
                                 _configs(int4.cutlass_sm90_configs), aligned=al, gemm=True,
                                 options=tuple(int4.CUTLASS_SM90_LAUNCH_OPTIONS.items())))

    mm("*fp16", "*fp16")
    mm("*bf16", None, "odd-N")
    mm("*bf16", "*fp32", "M=1")
    return entries


AOT_KERNELS += _int4_sm90_entries()
DEVICE_FUNCTIONS += [int4._round_to]


# ============================================================================ FP8
# As the JIT specialises launches from lowbit.backends.triton.fp8. GEMM operands are handed over
# as for the INT8 GEMMs (K-contiguous, aligned, K padded to 16). The fp8 weight of
# fp8_weight_only_mm and the quantize output are bytes (*u8), so those kernels have no fp8 type
# and compile for sm_80; fp8_scaled_mm's dot takes fp8 operands, which sm_80 must refuse
# (fp8.MIN_CAPABILITY keeps the op off sm_80 at run time). Variants cover both formats (and
# mixed pairs), every x / out dtype, each scale granularity, bias or not, odd N.
def _fp8_entries():
    entries = []

    def add(name, fn, types, configs, meta, *, unit, aligned, **kw):
        sig, ones, al = _spec(fn, types, unit=unit, aligned=aligned)
        entries.append(AotKernel(name, fn, sig, {**ones, **meta}, _configs(configs), aligned=al, **kw))

    def quantize(x_ty, fmt, saturate, dynamic, granularity):
        # Per row: one group of K columns, scale stride 1 along rows and 0 (aligned) along
        # groups. block1x128: 128-column groups, scale [rows, KB] (KB unaligned). block128x128:
        # as block1x128 with 128 rows per scale.
        unit = ["stride_xk", "stride_qk"]
        aligned = ["x_ptr", "q_ptr", "scale_ptr", "K", "stride_xr", "stride_qr", "GROUP_K"]
        if granularity == "row":
            unit += ["ROWS_PER_SCALE", "stride_sr"]
            aligned += ["stride_sg"]
        else:
            unit += ["stride_sg"] + (["ROWS_PER_SCALE"] if granularity == "block1x128" else [])
            aligned += [] if granularity == "block1x128" else ["ROWS_PER_SCALE"]
        add(f"fp8_quantize[{x_ty[1:]},{fmt},{'sat' if saturate else 'nosat'},"
            f"{'dynamic' if dynamic else 'static'}-{granularity}]", fp8._fp8_quantize_kernel,
            {"x_ptr": x_ty, "q_ptr": "*u8", "scale_ptr": "*fp32"}, fp8.quantize_configs,
            {"DYNAMIC": dynamic, "E5M2": fmt == "e5m2", "SATURATE": saturate},
            unit=tuple(unit), aligned=tuple(aligned))

    quantize("*fp32", "e4m3", True, True, "row")
    quantize("*bf16", "e5m2", False, False, "block1x128")
    quantize("*fp16", "e4m3", False, False, "block128x128")

    fp8_ty = {"e4m3": "*fp8e4nv", "e5m2": "*fp8e5"}

    def scaled(fa, fb, out_ty, bias_ty, scales, layout=""):
        unit = ["stride_ak", "stride_bk", "stride_cn"] + (["stride_bias"] if bias_ty else [])
        aligned = ["a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bn", "scale_a_ptr", "scale_b_ptr"]
        aligned += ["bias_ptr"] if bias_ty else []
        if scales == "block":  # [M, KB] and [ceil(N/128), KB], contiguous
            unit += ["stride_sak", "stride_sbk"]
        elif scales == "row-col":
            unit += ["stride_sam", "stride_sbn"]
            aligned += ["stride_sak", "stride_sbk"]
        else:  # scalars: every scale stride 0
            aligned += ["stride_sam", "stride_sbn", "stride_sak", "stride_sbk"]
        if layout != "odd-N":
            aligned += ["N", "stride_cm"]
        add(f"fp8_scaled_mm[{fa}x{fb},{out_ty[1:]},bias={bias_ty[1:] if bias_ty else 'none'},{scales}]"
            + (f"[{layout}]" if layout else ""), fp8._fp8_scaled_mm_kernel,
            {"a_ptr": fp8_ty[fa], "b_ptr": fp8_ty[fb], "c_ptr": out_ty, "scale_a_ptr": "*fp32",
             "scale_b_ptr": "*fp32", "bias_ptr": bias_ty or "*fp32"},
            fp8.scaled_mm_configs, {"BLOCK_SCALES": scales == "block", "HAS_BIAS": bias_ty is not None},
            unit=tuple(unit), aligned=tuple(aligned), gemm=True, refused=(80,))

    scaled("e4m3", "e4m3", "*fp32", None, "row-col")
    scaled("e5m2", "e4m3", "*bf16", "*bf16", "block")
    scaled("e4m3", "e5m2", "*fp16", "*fp32", "scalar", "odd-N")

    def weight_only(x_ty, fmt, scales, bias_ty, layout=""):
        ieee = x_ty == "*fp32"
        unit = ["stride_xk", "stride_wk", "stride_cn"] + (["stride_bias"] if bias_ty else [])
        aligned = ["x_ptr", "w_ptr", "c_ptr", "scale_ptr", "K", "stride_xm", "stride_wn"]
        aligned += ["bias_ptr"] if bias_ty else []
        if scales == "block":  # [ceil(N/128), KB], contiguous
            unit += ["stride_sk"]
        else:  # per channel: stride 1 along N, 0 along K
            unit += ["stride_sn"]
            aligned += ["stride_sk"]
        if layout != "odd-N":
            aligned += ["N", "stride_cm"]
        add(f"fp8_weight_only_mm[{x_ty[1:]},{fmt},{scales},bias={bias_ty[1:] if bias_ty else 'none'}]"
            + (f"[{layout}]" if layout else ""),
            fp8._fp8_weight_only_mm_fp32 if ieee else fp8._fp8_weight_only_mm_tc,
            {"x_ptr": x_ty, "w_ptr": "*u8", "c_ptr": x_ty, "scale_ptr": "*fp32", "bias_ptr": bias_ty or "*fp32"},
            fp8.weight_only_fp32_configs if ieee else fp8.weight_only_configs,
            {"E5M2": fmt == "e5m2", "BLOCK_SCALES": scales == "block", "HAS_BIAS": bias_ty is not None,
             "IEEE": ieee}, unit=tuple(unit), aligned=tuple(aligned), gemm=True, tensor_cores=not ieee)

    weight_only("*fp16", "e4m3", "row", "*fp16")
    weight_only("*bf16", "e5m2", "block", None, "odd-N")
    weight_only("*fp32", "e4m3", "block", "*fp32")
    return entries


AOT_KERNELS += _fp8_entries()
DEVICE_FUNCTIONS += [fp8._encode_fp8, fp8._decode_fp8, fp8._fp8_k_loop]


# ---- binary
# As the JIT specialises launches from lowbit.backends.triton.binary: packed operands and the
# output contiguous (word and column strides 1), pointers 16-byte aligned; per-row/column scales
# and bias read with stride 1 (a scalar scale has stride 0, an int). USE_POPC: compiled for a GPU
# the popcount is libdevice's popc. No tensor cores: there is no 1-bit tl.dot.
from . import binary  # noqa: E402


def _binary_entries():
    entries = []

    def add(name, fn, types, configs, meta, *, unit, aligned):
        sig, ones, al = _spec(fn, types, unit=unit, aligned=aligned)
        entries.append(AotKernel(name, fn, sig, {**ones, **meta}, _configs(configs), aligned=al))

    gemm_unit = ("stride_aw", "stride_bw", "stride_cn")
    gemm_aligned = ("a_ptr", "b_ptr", "c_ptr")
    add("binary_mm", binary._binary_mm_kernel,
        {"a_ptr": "*i32", "b_ptr": "*i32", "c_ptr": "*i32", "scale_a_ptr": "*i32", "scale_b_ptr": "*i32",
         "bias_ptr": "*i32"}, binary.gemm_configs, {"SCALED": False, "HAS_BIAS": False, "USE_POPC": True},
        unit=gemm_unit, aligned=gemm_aligned)

    def scaled(out_ty, bias_ty, scalar_a=False):
        unit = gemm_unit + ("stride_sb",) + (() if scalar_a else ("stride_sa",))
        unit += ("stride_bias",) if bias_ty else ()
        add(f"binary_scaled_mm[{out_ty[1:]},bias={bias_ty[1:] if bias_ty else 'none'}"
            f"{',scalar-scale_a' if scalar_a else ''}]", binary._binary_mm_kernel,
            {"a_ptr": "*i32", "b_ptr": "*i32", "c_ptr": out_ty, "scale_a_ptr": "*fp32", "scale_b_ptr": "*fp32",
             "bias_ptr": bias_ty or out_ty}, binary.gemm_configs,
            {"SCALED": True, "HAS_BIAS": bias_ty is not None, "USE_POPC": True},
            unit=unit, aligned=gemm_aligned + ("scale_a_ptr", "scale_b_ptr"))

    scaled("*fp32", None)
    scaled("*fp16", "*fp16")
    scaled("*bf16", "*fp32", scalar_a=True)

    for x_ty in ("*fp32", "*fp16", "*bf16"):
        add(f"binary_quantize[{x_ty[1:]}]", binary._binary_quantize_kernel,
            {"x_ptr": x_ty, "packed_ptr": "*i32", "scale_ptr": "*fp32"}, binary.quantize_configs, {},
            unit=("stride_xk",), aligned=("x_ptr", "packed_ptr", "scale_ptr"))
    return entries


AOT_KERNELS += _binary_entries()
DEVICE_FUNCTIONS += [binary._popcount32, binary._real_bits]


# ============================================================================ SPARSE24
# As the JIT specialises launches from lowbit.backends.triton.sparse24: x (or a) is handed over
# as for the INT8 GEMMs (K-contiguous, aligned, K padded to 16); values and meta are contiguous
# rows (their lengths Kp/2 and Kp/8 are multiples of 8 and 2, so only the values' row stride
# is aligned for 16-bit and wider values); scales and bias are vectors of stride 1. Variants
# cover each x dtype, float/int8 values (weight-only scale), the int8 W8A8 dot and its
# out dtypes, bias or not, odd N.
def _sparse24_entries():
    entries = []

    def add(name, fn, x_ty, v_ty, c_ty, *, scale, bias, int8_dot, odd_n, configs):
        unit = ("stride_xk", "stride_vk", "stride_mk", "stride_cn")
        unit += ("stride_s",) if (scale or int8_dot) else ()
        unit += ("stride_sa",) if int8_dot else ()
        unit += ("stride_bias",) if bias else ()
        aligned = ("x_ptr", "v_ptr", "meta_ptr", "c_ptr", "K", "KP", "stride_xm")
        aligned += ("stride_vn",) if v_ty in ("*fp32", "*fp16", "*bf16") else ()
        if not odd_n:
            aligned += ("N", "stride_cm")
        sig, ones, al = _spec(fn, {"x_ptr": x_ty, "v_ptr": v_ty, "meta_ptr": "*u8", "c_ptr": c_ty,
                                   "scale_ptr": "*fp32", "scale_a_ptr": "*fp32", "bias_ptr": "*fp32"},
                              unit=unit, aligned=aligned)
        meta = {**ones, "HAS_SCALE": scale, "HAS_BIAS": bias, "IEEE": x_ty == "*fp32" and not int8_dot,
                "INT8_DOT": int8_dot}
        entries.append(AotKernel(name, fn, sig, meta, _configs(configs), aligned=al, gemm=True,
                                 tensor_cores=x_ty != "*fp32"))

    add("sparse24_mm[fp16,values=fp16]", sparse24._sparse24_mm_tc, "*fp16", "*fp16", "*fp16", scale=False,
        bias=True, int8_dot=False, odd_n=False, configs=sparse24.float_configs)
    add("sparse24_mm[bf16,values=bf16][odd-N]", sparse24._sparse24_mm_tc, "*bf16", "*bf16", "*bf16", scale=False,
        bias=False, int8_dot=False, odd_n=True, configs=sparse24.float_configs)
    add("sparse24_mm[bf16,values=int8,scale]", sparse24._sparse24_mm_tc, "*bf16", "*i8", "*bf16", scale=True,
        bias=True, int8_dot=False, odd_n=False, configs=sparse24.float_configs)
    add("sparse24_mm[fp32,values=fp32][odd-N]", sparse24._sparse24_mm_fp32, "*fp32", "*fp32", "*fp32", scale=False,
        bias=True, int8_dot=False, odd_n=True, configs=sparse24.fp32_configs)
    add("sparse24_int8_scaled_mm[out=fp32]", sparse24._sparse24_mm_int8, "*i8", "*i8", "*fp32", scale=False,
        bias=True, int8_dot=True, odd_n=False, configs=sparse24.int8_configs)
    add("sparse24_int8_scaled_mm[out=bf16][odd-N]", sparse24._sparse24_mm_int8, "*i8", "*i8", "*bf16", scale=False,
        bias=False, int8_dot=True, odd_n=True, configs=sparse24.int8_configs)
    return entries


AOT_KERNELS += _sparse24_entries()


# ============================================================================ codebook
# As the JIT specialises launches from lowbit.backends.triton.codebook: x handed over as for the
# other GEMMs (K-contiguous, aligned, K padded to 16); codes rows byte-contiguous (their length,
# ceil(J*C*bits/8), is not a multiple of 16 in general, so not marked aligned); codebooks, scale
# contiguous. Variants cover every x dtype and the shipped layouts: scalar 4-bit (kmeans4), 3-bit
# with row/column groups, PQ d=4 x 8 bits (pq2), AQ 2x8 d=8 (aq2), 1x16 d=8 (AQLM-style), with and
# without scale/bias, odd N.
from . import codebook  # noqa: E402


def _codebook_entries():
    entries = []

    def mm(x_ty, cb_ty, C, bits, d, scale, bias_ty, layout=""):
        ieee = x_ty == "*fp32"
        fn = codebook._codebook_mm_fp32 if ieee else codebook._codebook_mm_tc
        unit = ("stride_xk", "stride_on") + (("stride_bias",) if bias_ty else ())
        aligned = ("x_ptr", "codes_ptr", "cb_ptr", "c_ptr", "K", "stride_xm") + (("bias_ptr",) if bias_ty else ())
        if layout != "odd-N":
            aligned += ("N", "stride_om")
        sig, ones, al = _spec(fn, {"x_ptr": x_ty, "codes_ptr": "*u8", "cb_ptr": cb_ty, "scale_ptr": "*fp32",
                                   "bias_ptr": bias_ty or cb_ty, "c_ptr": x_ty}, unit=unit, aligned=aligned)
        name = (f"codebook_mm[{x_ty[1:]},cb={cb_ty[1:]},C{C}xb{bits}xd{d},{'scale' if scale else 'noscale'},"
                f"bias={bias_ty[1:] if bias_ty else 'none'}]" + (f"[{layout}]" if layout else ""))
        configs = codebook.mm_fp32_configs if ieee else codebook.mm_configs
        entries.append(AotKernel(name, fn, sig, {**ones, "C": C, "E": 2**bits, "BITS": bits, "D": d,
                                                 "HAS_SCALE": scale, "HAS_BIAS": bias_ty is not None, "IEEE": ieee},
                                 _configs(configs), aligned=al, gemm=True, tensor_cores=not ieee))

    mm("*fp16", "*fp16", 1, 4, 1, False, None)
    mm("*bf16", "*fp16", 1, 3, 1, True, "*bf16", "odd-N")
    mm("*bf16", "*fp16", 1, 8, 4, False, None)
    mm("*fp16", "*fp16", 2, 8, 8, True, "*fp16")
    mm("*fp16", "*fp16", 1, 16, 8, False, None)
    mm("*fp32", "*fp32", 1, 4, 1, True, "*fp32", "odd-N")
    mm("*fp32", "*fp16", 2, 8, 8, False, None)

    def dequant(out_ty, cb_ty, C, bits, d, scale):
        fn = codebook._codebook_dequant
        sig, ones, al = _spec(fn, {"codes_ptr": "*u8", "cb_ptr": cb_ty, "scale_ptr": "*fp32", "out_ptr": out_ty},
                              aligned=("codes_ptr", "cb_ptr", "out_ptr", "K", "stride_on"))
        name = f"codebook_dequant[{out_ty[1:]},cb={cb_ty[1:]},C{C}xb{bits}xd{d},{'scale' if scale else 'noscale'}]"
        entries.append(AotKernel(name, fn, sig, {**ones, "C": C, "E": 2**bits, "BITS": bits, "D": d,
                                                 "HAS_SCALE": scale}, _configs(codebook.dequant_configs), aligned=al))

    dequant("*fp16", "*fp16", 1, 4, 1, True)
    dequant("*fp32", "*fp16", 2, 8, 8, False)
    return entries


AOT_KERNELS += _codebook_entries()
DEVICE_FUNCTIONS += [codebook._decode_tile]


# ============================================================================ completeness
def _is_jit_object(obj) -> bool:
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    kinds = [JITFunction, Autotuner, Heuristics]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        kinds.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - older triton
        pass
    return isinstance(obj, tuple(kinds))


def jit_objects(modules=None) -> dict[str, object]:
    """'module.name' -> every @triton.jit object (wrapped or not) at module level in the package."""
    if modules is None:
        pkg = importlib.import_module(__package__)
        modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    found = {}
    for mod in modules:
        for name, obj in vars(mod).items():
            # Count each object where it is defined, not where it is imported.
            if _is_jit_object(obj) and base_jit(obj).fn.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    return found


def unlisted(modules=None) -> list[str]:
    """Jit objects in the package that are neither an AOT kernel nor a device function.

    A plain jit function wrapped by listed autotuners counts as listed: it is compiled with
    their configs (the wrappers themselves are module-level objects and must be listed)."""
    known = {id(k.fn) for k in AOT_KERNELS} | {id(base_jit(k.fn)) for k in AOT_KERNELS}
    known |= {id(f) for f in DEVICE_FUNCTIONS}
    return sorted(name for name, obj in jit_objects(modules).items() if id(obj) not in known)


def source_of(obj) -> str:
    base = base_jit(obj)
    src = getattr(base, "src", None)
    return src if src is not None else inspect.getsource(base.fn)


# ============================================================================ compile
def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m is None:
            raise RuntimeError(f"cuobjdump printed no {key}: {out!r}")
        usage[key] = int(m.group(1))
    return usage


def config_label(cfg: dict) -> str:
    meta = [f"{k.removeprefix('BLOCK_')}{v}" if k.startswith("BLOCK_") else f"{k}={v}"
            for k, v in cfg.items() if k not in ("num_warps", "num_stages", "GROUP_M")]
    return " ".join(meta + [f"w{cfg['num_warps']}", f"s{cfg['num_stages']}"])


def compile_one(entry: AotKernel, cfg: dict, target: int) -> AotResult:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = base_jit(entry.fn)
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in entry.aligned if entry.signature[a] != "constexpr"}
    res = AotResult(entry.name, config_label(cfg), target, "error", threads=32 * cfg["num_warps"])
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=entry.signature, constexprs={**entry.constexprs, **meta}, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", target, 32),
                                  options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                                           **dict(entry.options)})
    except Exception as e:  # noqa: BLE001 - any failure is a result to report
        res.seconds = time.perf_counter() - t0
        if target in entry.refused:
            res.status = "refused"
        else:
            res.problems.append(f"does not compile: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
        return res
    res.seconds = time.perf_counter() - t0
    if target in entry.refused:
        res.problems.append(f"compiled for sm_{target}, which must refuse it")
    usage = _resource_usage(compiled.asm["cubin"])
    res.registers, res.stack, res.local = usage["REG"], usage["STACK"], usage["LOCAL"]
    res.shared = usage["SHARED"] + compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    res.tensor_op = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "none")
    res.status = "ok"

    if res.stack or res.local:
        res.problems.append(f"spills: STACK={res.stack} LOCAL={res.local}")
    limit = SHARED_LIMIT[target]
    if res.shared > limit:
        res.problems.append(f"shared memory {res.shared} B > {limit} B on sm_{target}")
    if res.registers * res.threads > REGISTERS_PER_SM:
        res.problems.append(f"{res.registers} registers x {res.threads} threads > {REGISTERS_PER_SM}")
    if entry.gemm and entry.tensor_cores:
        allowed = ("mma", "wgmma") if target >= 90 else ("mma",)
        if res.tensor_op not in allowed:
            res.problems.append(f"no tensor-core instruction ({'/'.join(allowed)}) in the PTX")
    if res.problems:
        res.status = "error"
    return res


def _jobs_list(targets, kernels):
    jobs = []
    for i, entry in enumerate(AOT_KERNELS):
        if kernels and not any(k in entry.name for k in kernels):
            continue
        for j, _ in enumerate(entry.configs):
            for t in entry.targets:
                if targets is None or t in targets:
                    jobs.append((i, j, t))
    return jobs


def _run_job(job):
    i, j, t = job
    entry = AOT_KERNELS[i]
    return compile_one(entry, entry.configs[j], t)


def compile_all(targets=None, jobs: int | None = None, kernels=None) -> list[AotResult]:
    """Compile every entry x config x target (optionally only `targets` / names containing `kernels`)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or int8.INTERPRET:
        return _compile_in_subprocess(targets, jobs, kernels)
    todo = _jobs_list(targets, kernels)
    jobs = jobs or min(2, os.cpu_count() or 1)
    if jobs <= 1:
        return [_run_job(j) for j in todo]
    # fork: the workers inherit AOT_KERNELS (jit functions do not pickle).
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(_run_job, todo))


def _compile_in_subprocess(targets, jobs, kernels) -> list[AotResult]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", __name__, "--json", "--no-fail"]
    if targets:
        cmd += ["--targets", ",".join(str(t) for t in targets)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    if kernels:
        cmd += ["--kernels", ",".join(kernels)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return [AotResult(**r) for r in json.loads(out.stdout)]


def format_table(results: list[AotResult]) -> str:
    head = ("kernel", "config", "sm", "regs", "shared", "spill", "tc", "s", "status")
    rows = [head]
    for r in results:
        rows.append((r.kernel, r.config, str(r.target), str(r.registers), f"{r.shared / 1024:.1f}K" if r.shared >= 0 else "-",
                     f"{r.stack}/{r.local}", r.tensor_op or "-", f"{r.seconds:.1f}",
                     r.status + ("" if not r.problems else ": " + "; ".join(r.problems))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.backends.triton.aot", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--targets", help="comma-separated compute capabilities (default: 80,89,90)")
    p.add_argument("--kernels", help="only entries whose name contains one of these (comma-separated)")
    p.add_argument("--jobs", type=int, help="parallel compiles (default: min(2, cores))")
    p.add_argument("--no-fail", action="store_true", help="exit 0 even when a check fails")
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")] if args.targets else None
    kernels = args.kernels.split(",") if args.kernels else None
    results = compile_all(targets, args.jobs, kernels)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    else:
        print(format_table(results))
        missing = unlisted()
        if missing:
            print("jit functions missing from AOT_KERNELS:", ", ".join(missing))
    failed = any(r.status == "error" for r in results)
    return 0 if args.no_fail or not failed else 1


if __name__ == "__main__":
    sys.exit(main())

