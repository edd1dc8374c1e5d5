"""The cutlass_sm90 int4 CUDA kernels (csrc/cuda/int4_sm90.cu), forced with
lowbit.backends.use("cuda"), against the reference, on a real GPU. PENDING: none has run yet.

On an sm_90 GPU int4_cutlass_sm90_mm runs CUTLASS's mixed-input TMA + wgmma GEMM; elsewhere the
dequantize + at::mm fallback. The bound (derived in tests/test_int4_sm90.py, exact_and_bound)
adds, per weight, the difference between the spec's two roundings round_T(round_T(q s) + z')
and one fused multiply-add round_T(q s + z') that the compiler may emit for cutlass::half_t /
bfloat16_t arithmetic: |difference| <= u(3|q s| + 2|z'|) (first order). The tensor cores
accumulate in fp32 but may truncate instead of rounding inside an instruction: 2 eps32 per add.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.backends.reference import int4 as ref
from lowbit.formats import int4 as fmt

pytestmark = pytest.mark.cuda

DTYPES = [torch.float16, torch.bfloat16]
U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
EPS32 = torch.finfo(torch.float32).eps
M_SWEEP = [1, 7, 128, 129, 1000]
# (N, K, group_size): tile-exact, partial tiles in N and K (K % 64 == 32), partial last
# group, per-channel groups, a large problem.
NKG_SWEEP = [(128, 128, 64), (136, 96, 96), (264, 320, 128), (8, 160, 64), (4096, 4096, 128), (1024, 8192, 8192)]


def is_sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def make(N, K, gs, symmetric, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g) * 3)
    q = fmt.quantize_weight(w, gs, symmetric, dtype)
    return fmt.Int4Weight(q.packed.cuda(), q.scale.cuda(), None if q.zero is None else q.zero.cuda(), K, gs)


def bound(x, packed, scale_t, zero_t, gs, bias, dtype):
    K = x.shape[1]
    w = fmt.dequantize_cutlass_sm90(packed, scale_t, zero_t, gs).double()
    q = fmt.signed_codes_cutlass_sm90(packed).double()
    s = scale_t.t().double().repeat_interleave(gs, 1)[:, :K]
    z = zero_t.t().double().repeat_interleave(gs, 1)[:, :K]
    u = U[dtype]
    dw = u * (3 * (q * s).abs() + 2 * z.abs()) * (1 + 4 * u)
    x64 = x.double()
    exact = x64 @ w.T
    mag = x64.abs() @ w.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    acc = 2 * (K + 2) * EPS32 * mag + x64.abs() @ dw.T
    return exact, acc + u * (exact.abs() + acc) + torch.finfo(dtype).tiny


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repack_matches_the_reference(dtype, symmetric):
    q = make(264, 320, 64, symmetric, dtype)
    with lowbit.backends.use("cuda"):
        got = lowbit.ops.int4_repack_cutlass_sm90(q.packed, q.scale, q.zero, 64, 320, dtype)
    want = ref.int4_repack_cutlass_sm90(q.packed.cpu(), q.scale.cpu(), None if q.zero is None else q.zero.cpu(), 64,
                                        320, dtype)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,gs", NKG_SWEEP)
@pytest.mark.parametrize("M", M_SWEEP)
def test_mm_matches_the_reference(M, N, K, gs, dtype, symmetric):
    q = make(N, K, gs, symmetric, dtype, seed=M + N)
    packed, scale_t, zero_t = fmt.to_cutlass_sm90(q.packed, q.scale, q.zero, gs, K, dtype)
    x = torch.randn(M, K, device="cuda").to(dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype) if M % 2 else None
    with lowbit.backends.use("cuda"):
        out = lowbit.ops.int4_cutlass_sm90_mm(x, packed, scale_t, zero_t, gs, bias)
    torch.cuda.synchronize()
    exact, b = bound(x, packed, scale_t, zero_t, gs, bias, dtype)
    err = (out.double() - exact).abs()
    assert (err <= b).all(), f"max excess {(err - b).max().item()} (sm90={is_sm90()})"


def test_misaligned_views_are_copied():
    dtype, N, K, gs = torch.float16, 64, 256, 128
    q = make(N, K, gs, False, dtype)
    packed, scale_t, zero_t = fmt.to_cutlass_sm90(q.packed, q.scale, q.zero, gs, K, dtype)
    xbig = torch.randn(5 * K + 1, device="cuda").to(dtype)
    x = xbig[1:].view(5, K)  # 2-byte offset: not 16-byte aligned
    with lowbit.backends.use("cuda"):
        out = lowbit.ops.int4_cutlass_sm90_mm(x, packed, scale_t, zero_t, gs)
    exact, b = bound(x, packed, scale_t, zero_t, gs, None, dtype)
    assert ((out.double() - exact).abs() <= b).all()


@pytest.mark.skipif(not is_sm90(), reason="the CUTLASS kernel runs on sm_90 only")
def test_sm90_kernel_is_the_one_that_runs():
    # A profile of one call names the CUTLASS kernel, not the fallback's dequant kernel.
    dtype, N, K, gs = torch.bfloat16, 256, 512, 128
    q = make(N, K, gs, False, dtype)
    packed, scale_t, zero_t = fmt.to_cutlass_sm90(q.packed, q.scale, q.zero, gs, K, dtype)
    x = torch.randn(64, K, device="cuda").to(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with lowbit.backends.use("cuda"):
            lowbit.ops.int4_cutlass_sm90_mm(x, packed, scale_t, zero_t, gs)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    assert "int4_sm90" in names and "Sm90Only" in names, names[:2000]
    assert "int4_sm90_dequant_kernel" not in names
