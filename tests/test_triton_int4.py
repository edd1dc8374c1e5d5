"""Triton INT4 weight-only GEMM against the spec (lowbit.backends.reference.int4).

On a machine without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported and the kernel runs in the interpreter on CPU tensors; with a GPU it runs natively.
The host function is called directly (no backend routing), with small shapes.

Bound: the spec dequantizes w = (u - zero) * scale in fp32 and accumulates x * w in fp32. The
kernel dequantizes with the same fp32 operations, so before the dot its weights equal the
spec's bit for bit; with fp16/bf16 x the tensor-core operand is x's dtype, which rounds each
weight once (relative error <= eps/2 of that dtype). The error against the exact (float64)
result of the spec is then at most
    (K + 2) * eps32 * sum|x||w| + eps_x / 2 * sum|x||w| + eps_out * |exact| + tiny_out:
fp32 accumulation in any order, the weight rounding, the output rounding. A nibble-order,
group-index or masking bug is far outside it.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from lowbit import _checks  # noqa: E402
from lowbit.backends.reference import int4 as ref  # noqa: E402
from lowbit.backends.triton import int4 as tk  # noqa: E402
from lowbit.formats import int4 as fmt  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=_gen(seed)).to(dtype).to(DEVICE)


def make_weight(N, K, group_size, symmetric, scale_dtype=torch.float32, seed=0):
    """Random codes over all 16 values, positive scales, integer zeros over [0, 15]."""
    G = fmt.num_groups(K, group_size)
    codes = torch.randint(0, 16, (N, K), generator=_gen(seed), dtype=torch.uint8)
    scale = (torch.rand(N, G, generator=_gen(seed + 1)) * 0.1 + 0.01).to(scale_dtype)
    zero = None if symmetric else torch.randint(0, 16, (N, G), generator=_gen(seed + 2)).to(scale_dtype)
    packed = fmt.pack(codes)
    return packed.to(DEVICE), scale.to(DEVICE), None if zero is None else zero.to(DEVICE)


def assert_within_bound(out, x, packed, scale, zero, group_size, bias):
    M, K = x.shape
    assert out.dtype == x.dtype and out.shape == (M, packed.shape[0])
    w = ref.int4_dequantize(packed, scale, zero, group_size, K).double()
    x64 = x.double()
    exact = x64 @ w.T
    mag = x64.abs() @ w.abs().T
    if bias is not None:
        exact = exact + bias.double()
    out_info = torch.finfo(out.dtype)
    weight_rounding = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps / 2
    bias_mag = 0.0 if bias is None else bias.double().abs()
    bound = ((K + 2) * EPS32 * (mag + bias_mag) + weight_rounding * mag
             + out_info.eps * exact.abs() + out_info.tiny)
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()} (max err {err.max().item()})"


def run(x, packed, scale, zero, group_size, bias=None):
    out = tk.int4_weight_only_mm(x, packed, scale, zero, group_size, bias)
    assert_within_bound(out, x, packed, scale, zero, group_size, bias)
    return out


# ============================================================================ sweep
SHAPES = ([(N, K, g) for N, K in ((33, 64), (64, 128), (33, 384), (64, 384)) for g in (32, 64, 128)]
          + [(33, 100, 100),   # per channel, K ends inside a 32-block
             (64, 192, 128),   # partial last group (128 + 64)
             (33, 100, 32)])   # partial 32-block and partial last group


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("N,K,group_size", SHAPES)
@pytest.mark.parametrize("M", (1, 3, 17))
def test_int4_weight_only_mm(M, N, K, group_size, symmetric, dtype):
    packed, scale, zero = make_weight(N, K, group_size, symmetric, seed=N + K + group_size)
    x = randn(M, K, dtype=dtype, seed=M)
    run(x, packed, scale, zero, group_size)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale_dtype", FLOATS)
@pytest.mark.parametrize("bias_dtype", [None, "x", torch.float32])
def test_int4_weight_only_mm_dtypes_and_bias(dtype, scale_dtype, bias_dtype):
    M, N, K, g = 5, 40, 160, 64
    packed, scale, zero = make_weight(N, K, g, False, scale_dtype, seed=1)
    x = randn(M, K, dtype=dtype, seed=2)
    bias = None if bias_dtype is None else randn(N, dtype=dtype if bias_dtype == "x" else bias_dtype, seed=3)
    run(x, packed, scale, zero, g, bias)


def test_int4_weight_only_mm_large_groups_of_large_values():
    # Codes 0 and 15 with zero 8 or 0 and scales spanning 2**-10 .. 2**6: a scale or zero
    # applied to the wrong group, or nibbles swapped, moves results by orders of magnitude.
    N, K, g = 33, 256, 32
    G = K // g
    codes = torch.where(torch.rand(N, K, generator=_gen(4)) < 0.5, 0, 15).to(torch.uint8)
    scale = 2.0 ** torch.randint(-10, 7, (N, G), generator=_gen(5)).float()
    zero = torch.where(torch.rand(N, G, generator=_gen(6)) < 0.5, 8.0, 0.0)
    packed = fmt.pack(codes).to(DEVICE)
    x = randn(3, K, dtype=torch.float16, seed=7)
    run(x, packed, scale.to(DEVICE), zero.to(DEVICE), g)


def test_padding_codes_do_not_change_the_result():
    # The format stores code 0 in the padding (K <= k < ceil(K/32)*32); kernels must not
    # depend on it (their x reads stop at K).
    N, K, g = 33, 100, 32
    packed, scale, zero = make_weight(N, K, g, False, seed=8)
    x = randn(3, K, seed=9)
    clean = tk.int4_weight_only_mm(x, packed, scale, zero, g)
    dirty = packed.clone()
    dirty[:, -16:] |= 0xF0  # high nibbles of the last block: columns 112..127, all padding
    dirty[:, -12:] |= 0x0F  # low nibbles of columns 100..111
    assert torch.equal(fmt.unpack(dirty, K), fmt.unpack(packed, K))
    assert torch.equal(tk.int4_weight_only_mm(x, dirty, scale, zero, g), clean)


# ============================================================================ layouts
def strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t through a non-contiguous view."""
    if kind == "transposed":  # column-major storage seen as [rows, cols]
        return t.T.contiguous().T
    if kind == "sliced":  # every other column of a wider tensor
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    if kind == "offset":  # contiguous rows, but starting one element into the storage
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("lx", ["transposed", "sliced", "offset"])
def test_int4_weight_only_mm_non_contiguous_x(dtype, lx):
    N, K, g = 33, 96, 32
    packed, scale, zero = make_weight(N, K, g, False, seed=10)
    x = randn(17, K, dtype=dtype, seed=11)
    bias = randn(N, dtype=dtype, seed=12)
    out = run(strided(x, lx), packed, scale, zero, g, bias)
    assert torch.equal(out, tk.int4_weight_only_mm(x, packed, scale, zero, g, bias))


@pytest.mark.parametrize("lw", ["transposed", "sliced", "offset"])
def test_int4_weight_only_mm_non_contiguous_weight_scale_zero(lw):
    N, K, g = 33, 160, 32
    packed, scale, zero = make_weight(N, K, g, False, torch.bfloat16, seed=13)
    x = randn(3, K, dtype=torch.float16, seed=14)
    bias = randn(2 * N, seed=15)[::2]  # strided bias
    out = run(x, strided(packed, lw), strided(scale, "transposed"), strided(zero, "sliced"), g, bias)
    assert torch.equal(out, tk.int4_weight_only_mm(x, packed, scale, zero, g, bias.contiguous()))


# ============================================================================ configs
def _each_config(kernel, monkeypatch):
    """Yield each autotune config with the autotuner pinned to it (a one-config autotuner
    launches that config directly, on the GPU as in the interpreter)."""
    for cfg in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [cfg])
        yield cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_weight_only_mm_every_config(dtype, monkeypatch):
    # Ragged in every dimension for every tile: M and N end in partial tiles, K = 300 ends
    # inside a 32-block (x padded to 304) and inside a BLOCK_K step, the last group is partial.
    M, N, K, g = 33, 130, 300, 64
    packed, scale, zero = make_weight(N, K, g, False, torch.float16, seed=16)
    x = randn(M, K, dtype=dtype, seed=17)
    bias = randn(N, seed=18)
    kernel = tk._int4_weight_only_mm_fp32 if dtype == torch.float32 else tk._int4_weight_only_mm_tc
    for cfg in _each_config(kernel, monkeypatch):
        out = tk.int4_weight_only_mm(x, packed, scale, zero, g, bias)
        assert_within_bound(out, x, packed, scale, zero, g, bias)


# ============================================================================ boundary
def test_kernels_cover_every_int4_op():
    from lowbit import _ops
    from lowbit.backends import triton as triton_backend

    # The cutlass_sm90 repack runs once per weight (CPU or CUDA C++, or the reference): no Triton
    # kernel (docs/ops.md, "Backend status"). Its GEMM has one (tests/test_triton_int4_sm90.py).
    int4_ops = {op for op in _ops.op_names() if op.startswith("int4_") and op != "int4_repack_cutlass_sm90"}
    assert set(tk.KERNELS) == int4_ops
    for op, fn in tk.KERNELS.items():
        assert fn.__name__ == op
        assert triton_backend.KERNELS[op] is fn


def _bad(**kw):
    packed, scale, zero = make_weight(8, 64, 32, False)
    args = dict(x=randn(2, 64), packed_w=packed, scale=scale, zero=zero, group_size=32, bias=None)
    args.update(kw)
    return lambda: tk.int4_weight_only_mm(**args)


@pytest.mark.parametrize("call", [
    _bad(x=randn(2, 65)),                                     # packed_w row length is for K = 64
    _bad(group_size=48),
    _bad(scale=randn(8, 3)),
    _bad(zero=randn(8, 2, dtype=torch.float16)),              # zero dtype != scale dtype
    _bad(packed_w=torch.zeros(8, 32, dtype=torch.int8, device=DEVICE)),
    _bad(bias=randn(9)),
    _bad(x=randn(0, 64)),
])
def test_bad_arguments_raise_before_launch(call):
    with pytest.raises(_checks.LowbitArgumentError):
        call()
