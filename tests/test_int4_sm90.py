"""The cutlass_sm90 int4 layout (lowbit/formats/int4.py), its repack op and int4_cutlass_sm90_mm,
on the CPU: the C++ kernels (csrc/cpu/int4_sm90.cpp) against the pure-torch reference.

The layout is what CUTLASS's sm_90 mixed-input GEMM reads; the CPU kernels build and read it
with the same __host__ __device__ functions as the CUDA kernels (lowbit/int4_layout.h, sm90::),
so a wrong nibble order or scale index fails here. The CUTLASS kernel itself is checked by
tests/test_int4_sm90_cuda.py on a GPU (pending: nothing has run on one).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowbit  # noqa: F401
from lowbit import _checks, _extension, ops
from lowbit.backends.reference import int4 as ref
from lowbit.formats import int4 as fmt

DTYPES = [torch.float16, torch.bfloat16]
U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff of T
EPS32 = torch.finfo(torch.float32).eps

needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="lowbit._C is not built")


def dtype_id(d):
    return str(d).removeprefix("torch.")


def make_weight(N, K, group_size, symmetric, scale_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g) * 3)
    return fmt.quantize_weight(w, group_size, symmetric, scale_dtype)


def repack(q, dtype):
    return ops.int4_repack_cutlass_sm90(q.packed, q.scale, q.zero, q.group_size, q.in_features, dtype)


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("N,K,gs", [(8, 64, 64), (24, 320, 128), (16, 96, 96), (8, 192, 64)])
def test_round_trip_is_bit_exact(N, K, gs, dtype, symmetric):
    # Scales already in T (as quantize_weight makes them for T weights) and integer zeros.
    q = make_weight(N, K, gs, symmetric, dtype)
    packed, scale_t, zero_t = fmt.to_cutlass_sm90(q.packed, q.scale, q.zero, gs, K, dtype)
    back_packed, back_scale, back_zero = fmt.from_cutlass_sm90(packed, scale_t, zero_t, symmetric)
    assert torch.equal(back_packed, q.packed)
    assert torch.equal(back_scale, q.scale)
    if symmetric:
        assert back_zero is None and torch.count_nonzero(zero_t) == 0
    else:
        assert torch.equal(back_zero, q.zero)


def test_nibble_order_by_hand():
    # Columns 0..31 with codes u = k % 16: byte j holds k = 2j (low) and 2j+1 (high), as u XOR 8.
    codes = (torch.arange(32, dtype=torch.uint8) % 16).reshape(1, 32).repeat(8, 1)
    packed, _, _ = fmt.to_cutlass_sm90(fmt.pack(codes), torch.ones(8, 1), None, 32, 32, torch.float16)
    want = [((2 * j % 16) ^ 8) | (((2 * j + 1) % 16) ^ 8) << 4 for j in range(16)]
    assert packed[0].tolist() == want
    assert fmt.signed_codes_cutlass_sm90(packed)[0].tolist() == [(k % 16) - 8 for k in range(32)]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dequantized_weight_within_the_derived_rounding_bound(dtype, scale_dtype, symmetric):
    # formats/int4.py: |w_T - w| <= (|q| + |8 - zero|)|s|u + |w|u (+ |w|u when the scale rounds to T).
    q = make_weight(40, 256, 64, symmetric, scale_dtype, seed=3)
    w = fmt.dequantize(q).double()
    packed, scale_t, zero_t = fmt.to_cutlass_sm90(q.packed, q.scale, q.zero, 64, 256, dtype)
    w_t = fmt.dequantize_cutlass_sm90(packed, scale_t, zero_t, 64).double()
    u = U[dtype]
    qs = fmt.signed_codes_cutlass_sm90(packed).double()
    s = q.scale.double().repeat_interleave(64, dim=1)
    z = (torch.full_like(s, 8.0) if symmetric else q.zero.double().repeat_interleave(64, dim=1))
    bound = (qs.abs() + (8 - z).abs()) * s.abs() * u + w.abs() * u * (2 if scale_dtype != dtype else 1)
    bound = bound * (1 + 4 * u)  # second-order terms
    assert ((w_t - w).abs() <= bound).all()
    if symmetric and scale_dtype == dtype:
        # zero' = 0: only q * s rounds, once.
        assert torch.equal(w_t, (qs * q.scale.double().repeat_interleave(64, 1)).to(dtype).double())


# ----------------------------------------------------------------------------- repack op
@needs_cpp
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("N,K,gs", [(24, 320, 128), (16, 96, 96), (136, 1024, 64)])
def test_repack_op_matches_the_reference_exactly(N, K, gs, dtype, scale_dtype, symmetric):
    q = make_weight(N, K, gs, symmetric, scale_dtype, seed=N + K)
    got = repack(q, dtype)
    want = ref.int4_repack_cutlass_sm90(q.packed, q.scale, q.zero, gs, K, dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


# ----------------------------------------------------------------------------- GEMM
def exact_and_bound(x, w_t, bias, K, dtype):
    """(float64 result from the spec's T weights, bound): fp32 accumulation in any order (K + 1
    roundings of at most eps32 * sum|x w|, + the bias add), then one rounding to T."""
    x64, w64 = x.double(), w_t.double()
    exact = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    acc = (K + 2) * EPS32 * mag
    return exact, acc + U[dtype] * (exact.abs() + acc) + torch.finfo(dtype).tiny


M_SWEEP = [1, 16, 37]
NKG_SWEEP = [(8, 64, 64), (40, 128, 128), (24, 96, 96), (16, 320, 128), (64, 512, 64), (8, 4096, 4096)]


@needs_cpp
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("N,K,gs", NKG_SWEEP)
@pytest.mark.parametrize("M", M_SWEEP)
def test_mm_matches_the_reference(M, N, K, gs, dtype, symmetric):
    q = make_weight(N, K, gs, symmetric, dtype, seed=M * 7 + N)
    packed, scale_t, zero_t = repack(q, dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    bias = torch.randn(N, dtype=dtype) if M == 37 else None
    out = ops.int4_cutlass_sm90_mm(x, packed, scale_t, zero_t, gs, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    w_t = fmt.dequantize_cutlass_sm90(packed, scale_t, zero_t, gs)
    exact, bound = exact_and_bound(x, w_t, bias, K, dtype)
    assert ((out.double() - exact).abs() <= bound).all()
    want = ref.int4_cutlass_sm90_mm(x, packed, scale_t, zero_t, gs, bias)
    assert ((want.double() - exact).abs() <= bound).all()


@needs_cpp
def test_mm_partial_last_group():
    # K = 160 with groups of 64: the last group covers 32 columns.
    N, K, gs = 16, 160, 64
    q = make_weight(N, K, gs, False, torch.float16, seed=11)
    packed, scale_t, zero_t = repack(q, torch.float16)
    assert scale_t.shape == (3, N)
    x = torch.randn(5, K).half()
    out = ops.int4_cutlass_sm90_mm(x, packed, scale_t, zero_t, gs)
    exact, bound = exact_and_bound(x, fmt.dequantize_cutlass_sm90(packed, scale_t, zero_t, gs), None, K,
                                   torch.float16)
    assert ((out.double() - exact).abs() <= bound).all()


@needs_cpp
def test_mm_stays_close_to_int4_weight_only_mm():
    # The layout's only change to the math is rounding each weight to T (the derived bound).
    N, K, gs = 32, 512, 128
    q = make_weight(N, K, gs, False, torch.float16, seed=5)
    x = torch.randn(9, K).half()
    packed, scale_t, zero_t = repack(q, torch.float16)
    out = ops.int4_cutlass_sm90_mm(x, packed, scale_t, zero_t, gs).double()
    w = fmt.dequantize(q).double()
    exact = x.double() @ w.T
    qs = fmt.signed_codes_cutlass_sm90(packed).double()
    s = q.scale.double().repeat_interleave(gs, 1)
    z = q.zero.double().repeat_interleave(gs, 1)
    dw = ((qs.abs() + (8 - z).abs()) * s.abs() * U[torch.float16] + w.abs() * U[torch.float16]) * (1 + 4 * U[torch.float16])
    # weight error, then fp32 accumulation over the T weights (|w_T| <= |w| + dw), then the output rounding
    err_w = x.double().abs() @ dw.T
    acc = (K + 2) * EPS32 * (x.double().abs() @ (w.abs() + dw).T)
    bound = err_w + acc + U[torch.float16] * (exact.abs() + err_w + acc) + torch.finfo(torch.float16).tiny
    assert ((out - exact).abs() <= bound).all()


@needs_cpp
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_dequantizes_bit_exactly(dtype, symmetric):
    # Rows of the identity pick single weights: one nonzero product, exact in fp32, and already in
    # T, so the op must return the spec's weight bit for bit (AVX2 path, or scalar under
    # LOWBIT_CPU_ISA=scalar).
    N, K, gs = 48, 384, 128
    q = make_weight(N, K, gs, symmetric, torch.float32, seed=9)
    packed, scale_t, zero_t = repack(q, dtype)
    eye = torch.eye(K, dtype=dtype)
    got = ops.int4_cutlass_sm90_mm(eye, packed, scale_t, zero_t, gs)
    assert torch.equal(got, fmt.dequantize_cutlass_sm90(packed, scale_t, zero_t, gs).T)


@needs_cpp
def test_portable_path_matches_reference():
    """The scalar dequantization (machines without AVX2) runs when LOWBIT_CPU_ISA=scalar is set at startup."""
    if os.environ.get("LOWBIT_CPU_ISA") == "scalar":
        pytest.skip("already running on the portable path")
    env = dict(os.environ, LOWBIT_CPU_ISA="scalar")
    ids = ["test_kernel_dequantizes_bit_exactly", "test_mm_matches_the_reference[37-24-96-96-bfloat16-asym]",
           "test_mm_partial_last_group"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + [f"{__file__}::{i}" for i in ids],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "6 passed" in r.stdout, r.stdout[-3000:]


# ----------------------------------------------------------------------------- bad inputs
def _good(M=3, N=16, K=128, gs=64, dtype=torch.float16):
    q = make_weight(N, K, gs, False, dtype)
    packed, scale_t, zero_t = fmt.to_cutlass_sm90(q.packed, q.scale, q.zero, gs, K, dtype)
    return dict(x=torch.randn(M, K).to(dtype), packed=packed, scale=scale_t, zero=zero_t, group_size=gs, bias=None)


@pytest.mark.parametrize("change,arg", [
    (lambda a: a.update(x=a["x"].float()), "x"),
    (lambda a: a.update(x=a["x"][0]), "x"),
    (lambda a: a.update(x=a["x"][:0]), "x"),
    (lambda a: a.update(x=torch.randn(3, 112).half()), "K"),  # K % 32 != 0
    (lambda a: a.update(packed=a["packed"][:12], scale=a["scale"][:, :12], zero=a["zero"][:, :12]), "N"),
    (lambda a: a.update(group_size=32), "group_size"),
    (lambda a: a.update(packed=a["packed"].to(torch.int8)), "packed"),
    (lambda a: a.update(packed=a["packed"][:, :32]), "packed"),
    (lambda a: a.update(scale=a["scale"].float()), "scale"),
    (lambda a: a.update(scale=a["scale"].t().contiguous()), "scale"),
    (lambda a: a.update(zero=a["zero"].bfloat16()), "zero"),
    (lambda a: a.update(zero=a["zero"][:1]), "zero"),
    (lambda a: a.update(bias=torch.randn(4)), "bias"),
])
def test_mm_bad_inputs_raise_value_error(change, arg):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=rf"lowbit\.int4_cutlass_sm90_mm: {arg}\b"):
        ops.int4_cutlass_sm90_mm(**args)


def _good_repack(N=16, K=128, gs=64):
    q = make_weight(N, K, gs, False, torch.float32)
    return dict(packed_w=q.packed, scale=q.scale, zero=q.zero, group_size=gs, K=K, dtype=torch.float16)


@pytest.mark.parametrize("change,arg", [
    (lambda a: a.update(dtype=torch.float32), "dtype"),
    (lambda a: a.update(group_size=32), "group_size"),
    (lambda a: a.update(K=100), "K"),
    (lambda a: a.update(packed_w=a["packed_w"][:12], scale=a["scale"][:12], zero=a["zero"][:12]), "N"),
    (lambda a: a.update(packed_w=a["packed_w"].to(torch.int8)), "packed_w"),
    (lambda a: a.update(packed_w=a["packed_w"][:, :32]), "packed_w"),
    (lambda a: a.update(scale=a["scale"][:, :1]), "scale"),
    (lambda a: a.update(zero=a["zero"].half()), "zero"),
])
def test_repack_bad_inputs_raise_value_error(change, arg):
    args = _good_repack()
    change(args)
    with pytest.raises(ValueError, match=rf"lowbit\.int4_repack_cutlass_sm90: {arg}\b"):
        ops.int4_repack_cutlass_sm90(**args)


@needs_cpp
@pytest.mark.parametrize("case", range(6))
def test_python_and_cpp_checks_say_the_same(case):
    # The C++ kernel's message (via the op) and _checks' (the fake / reference path) are identical.
    args = _good()
    changes = [
        lambda a: a.update(x=a["x"].float()),
        lambda a: a.update(x=torch.randn(3, 112).half()),
        lambda a: a.update(group_size=32),
        lambda a: a.update(scale=a["scale"].t().contiguous()),
        lambda a: a.update(zero=a["zero"].bfloat16()),
        lambda a: a.update(packed=a["packed"][:, :32]),
    ]
    changes[case](args)
    with pytest.raises(ValueError) as cpp:
        ops.int4_cutlass_sm90_mm(**args)
    with pytest.raises(ValueError) as py:
        _checks.int4_cutlass_sm90_mm("int4_cutlass_sm90_mm", *args.values())
    assert str(py.value) in str(cpp.value)


# ----------------------------------------------------------------------------- torch integration
@needs_cpp
def test_opcheck():
    fp16 = _good(M=7, N=24, K=96, gs=96)
    fp16["bias"] = torch.randn(24).half()
    for s in (fp16, _good(M=1, K=256, gs=128, dtype=torch.bfloat16)):
        torch.library.opcheck(torch.ops.lowbit.int4_cutlass_sm90_mm.default, tuple(s.values()))
    r = _good_repack()
    r["zero"] = None
    r["dtype"] = torch.bfloat16
    torch.library.opcheck(torch.ops.lowbit.int4_repack_cutlass_sm90.default, tuple(r.values()))


@needs_cpp
def test_torch_compile_fullgraph():
    a = _good(M=4, N=16, K=128, gs=64)

    def f(x, p, s, z):
        return torch.nn.functional.gelu(ops.int4_cutlass_sm90_mm(x * 2, p, s, z, 64)) + 1

    want = f(a["x"], a["packed"], a["scale"], a["zero"])
    got = torch.compile(f, fullgraph=True, backend="eager")(a["x"], a["packed"], a["scale"], a["zero"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_not_verified():
    from lowbit.backends import verified
    assert not verified.any_verified("cuda", "int4_cutlass_sm90_mm")
    assert not verified.any_verified("cuda", "int4_repack_cutlass_sm90")


# ----------------------------------------------------------------------------- module (opt-in)
@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_module_matches_its_int4_linear_within_the_layout_rounding(dtype):
    from lowbit.nn import Int4Linear, Int4LinearCutlassSm90
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 48).to(dtype)
    src = Int4Linear.from_float(lin, group_size=128)
    m = Int4LinearCutlassSm90.from_int4(src)
    assert "unverified" in repr(m) and m.scale.dtype == dtype
    x = torch.randn(2, 5, 256).to(dtype)
    y = m(x)
    assert y.shape == (2, 5, 48) and y.dtype == dtype
    exact, bound = exact_and_bound(x.reshape(-1, 256), fmt.dequantize_cutlass_sm90(m.packed, m.scale, m.zero, 128),
                                   m.bias, 256, dtype)
    assert ((y.reshape(-1, 48).double() - exact).abs() <= bound).all()
    with pytest.raises(ValueError, match="dtype"):
        m(x.float())
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), y, rtol=0, atol=0)
