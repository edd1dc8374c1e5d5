"""Binary (XNOR-popcount) format and ops through the dispatcher, on every backend, against the reference.

CPU tensors run the C++ CPU kernels (or the reference when the extension is not built); on a
GPU machine the same tests run on CUDA tensors once per forced backend. The Triton kernels
also run in the interpreter on the CPU (tests/test_triton_binary.py).

The oracle for binary_mm is the definition itself: unpack to ±1 floats and multiply in
float64, where every partial sum (|sum| <= K) is exact.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch

import cpu_routes
import lowbit
import lowbit.bench
from lowbit import ops
from lowbit.backends.reference import binary as ref
from lowbit.formats import binary as fmt

BINARY_OPS = ["binary_quantize", "binary_mm", "binary_scaled_mm"]

TARGETS = [
    pytest.param(("cpu", None), id="cpu"),
    pytest.param(("cuda", "cuda"), id="cuda-cpp", marks=pytest.mark.cuda),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.cuda),
    pytest.param(("cuda", "reference"), id="cuda-reference", marks=pytest.mark.cuda),
]


@pytest.fixture(params=TARGETS)
def target(request):
    device, backend = request.param
    ctx = lowbit.backends.use(backend) if backend else contextlib.nullcontext()
    with ctx:
        yield torch.device(device)


def random_words(rows, K, device="cpu", seed=0):
    """Random packed rows, padding bits included (kernels must ignore them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (rows, fmt.num_words(K)), generator=g, dtype=torch.int64).to(
        torch.int32).to(device)


def pm1_matmul(a, b, K):
    """The definition: ±1 vectors, float64 matmul (exact)."""
    return fmt.unpack(a.cpu(), K, torch.float64) @ fmt.unpack(b.cpu(), K, torch.float64).T


K_SWEEP = [1, 63, 64, 65, 1000, 4096]
M_SWEEP = [1, 17, 128]


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("K", [1, 31, 32, 33, 100])
def test_pack_unpack_round_trip(K):
    signs = torch.where(torch.rand(7, K) < 0.5, -1.0, 1.0)
    packed = fmt.pack(signs)
    assert packed.dtype == torch.int32 and packed.shape == (7, fmt.num_words(K))
    assert torch.equal(fmt.unpack(packed, K), signs)
    assert torch.equal(fmt.pack(fmt.unpack(packed, K)), packed)
    # padding bits are written as 0
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if K % 32:
        assert (words[:, -1] >> (K % 32) == 0).all()


def test_documented_bit_layout():
    # column k -> word k // 32, bit k % 32 (LSB first); 1 = +1; 0, -0.0 and NaN -> +1
    x = torch.full((1, 40), -1.0)
    x[0, 0], x[0, 3], x[0, 31], x[0, 32], x[0, 39] = 0.0, 2.0, -0.0, float("nan"), 5.0
    words = (fmt.pack(x).to(torch.int64) & 0xFFFFFFFF).tolist()[0]
    assert words == [(1 << 0) | (1 << 3) | (1 << 31), (1 << 0) | (1 << 7)]
    assert fmt.pack(x)[0, 0].item() == words[0] - 2**32  # int32 storage of the same bits


def test_quantize_weight_and_accounting():
    w = torch.randn(10, 70)
    q = fmt.quantize_weight(w)
    torch.testing.assert_close(q.scale, w.abs().mean(1), rtol=0, atol=0)
    torch.testing.assert_close(fmt.dequantize(q), torch.where(w < 0, -1.0, 1.0) * w.abs().mean(1, keepdim=True))
    assert q.nbytes() == 10 * 3 * 4 + 10 * 4
    assert abs(q.bits_per_weight() - 8 * q.nbytes() / 700) < 1e-12
    with pytest.raises(ValueError, match="packed must be int32"):
        fmt.BinaryWeight(q.packed[:, :2], q.scale, 70)


# ----------------------------------------------------------------------------- binary_mm
@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("K", K_SWEEP)
def test_binary_mm_exact(target, M, K):
    N = 37
    a, b = random_words(M, K, target, seed=M), random_words(N, K, target, seed=K)
    out = ops.binary_mm(a, b, K)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    expected = pm1_matmul(a, b, K)
    assert torch.equal(out.cpu().double(), expected)
    assert torch.equal(out.cpu(), ref.binary_mm(a.cpu(), b.cpu(), K))


def test_binary_mm_large_k_multiple_blocks(target):
    # K beyond one split K-block (16 * 256) and beyond the byte counters' 31-step flush, odd tail
    K = 9000 * 2 + 5
    a, b = random_words(9, K, target), random_words(70, K, target, seed=1)
    assert torch.equal(ops.binary_mm(a, b, K).cpu().double(), pm1_matmul(a, b, K))


@pytest.mark.parametrize("threads", [1, 2])
def test_binary_mm_split_planes_tiles_and_edges(threads):
    """The CPU split-plane loop (M >= 8): several tiles of a (64 rows) and b (64 rows) with partial
    3 x 2 register blocks at their ends, two K blocks of 31 steps plus tail words, per-thread
    scratch on 1 and 2 threads; binary_scaled_mm takes the same loop."""
    M, N, K = 131, 133, 32 * 256 + 70
    a, b = random_words(M, K, seed=3), random_words(N, K, seed=4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.binary_mm(a, b, K)
        sa, sb = torch.rand(M) + 0.5, torch.rand(N) + 0.5
        scaled = ops.binary_scaled_mm(a, b, K, sa, sb)
    finally:
        torch.set_num_threads(before)
    exact = pm1_matmul(a, b, K)
    assert torch.equal(out.double(), exact)
    assert torch.equal(scaled, ref.binary_scaled_mm(a, b, K, sa, sb))


@pytest.mark.parametrize("K", [1, 65, 1000])
def test_padding_bits_are_ignored(target, K):
    a, b = random_words(17, K, target), random_words(9, K, target, seed=1)
    clean_a, clean_b = fmt.pack(fmt.unpack(a.cpu(), K)).to(target), fmt.pack(fmt.unpack(b.cpu(), K)).to(target)
    assert torch.equal(ops.binary_mm(a, b, K), ops.binary_mm(clean_a, clean_b, K))


def test_binary_mm_extremes(target):
    K = 4099
    ones = fmt.pack(torch.ones(3, K)).to(target)
    neg = fmt.pack(-torch.ones(5, K)).to(target)
    assert (ops.binary_mm(ones, ones, K) == K).all()
    assert (ops.binary_mm(ones, neg, K) == -K).all()


def test_binary_mm_non_contiguous_equals_contiguous(target):
    a = random_words(40, 100, target).T.contiguous().T      # column-major [40, 4]
    b = torch.cat([random_words(11, 100, target)] * 2, dim=1)[:, ::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(ops.binary_mm(a, b, 100), ops.binary_mm(a.contiguous(), b.contiguous(), 100))


# ----------------------------------------------------------------------------- scaled
@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("K", [63, 1000])
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scales,bias_dtype", [("row-col", None), ("scalar-col", torch.float32),
                                               ("row-one", torch.bfloat16), ("row-col", torch.float16)])
def test_binary_scaled_mm(target, M, K, out_dtype, scales, bias_dtype):
    N = 33
    a, b = random_words(M, K, target), random_words(N, K, target, seed=1)
    sa, sb = torch.rand(M, device=target) + 0.01, torch.rand(N, device=target) + 0.01
    if scales == "scalar-col":
        sa = sa[0].clone()
    elif scales == "row-one":
        sb = sb[:1].clone()
    bias = None if bias_dtype is None else torch.randn(N, device=target).to(bias_dtype)
    out = ops.binary_scaled_mm(a, b, K, sa, sb, bias, out_dtype)
    assert out.dtype == (out_dtype or torch.float32) and out.shape == (M, N)
    # Same fp32 operations in the same order as the reference: bit-identical on the CPU. A GPU
    # compiler may fuse the bias add into an FMA: one fp32 rounding of the result.
    expected = ref.binary_scaled_mm(a.cpu(), b.cpu(), K, sa.cpu(), sb.cpu(),
                                    None if bias is None else bias.cpu(), out_dtype)
    if target.type == "cpu":
        assert torch.equal(out, expected)
    else:
        slack = torch.finfo(torch.float32).eps * expected.float().abs() + torch.finfo(out.dtype).eps * expected.float().abs()
        assert ((out.cpu().float() - expected.float()).abs() <= slack + 1e-30).all()


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("M,K", [(1, 1), (3, 31), (17, 64), (5, 1000), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_binary_quantize(target, M, K, dtype):
    x = torch.randn(M, K, device=target).to(dtype)
    x[0, 0] = 0.0  # sign(0) = +1
    if K > 2:
        x[0, 1] = -0.0
    packed, scale = ops.binary_quantize(x)
    ref_packed, ref_scale = ref.binary_quantize(x.cpu())
    assert packed.dtype == torch.int32 and scale.dtype == torch.float32
    assert torch.equal(packed.cpu(), ref_packed)
    # Summation order is not part of the spec: |error| <= K * eps32 * mean|x| (plus the division).
    bound = (K + 1) * torch.finfo(torch.float32).eps * ref_scale
    assert ((scale.cpu() - ref_scale).abs() <= bound).all()


def test_binary_quantize_non_contiguous(target):
    x = torch.randn(70, 9, device=target).T
    p, s = ops.binary_quantize(x)
    p2, s2 = ops.binary_quantize(x.contiguous())
    assert torch.equal(p, p2)
    torch.testing.assert_close(s, s2, rtol=1e-6, atol=0)


def test_xnor_gemm_approximates_float_gemm(target):
    # End to end: alpha * beta * sign-dot is XNOR-Net's estimate of x @ w.T.
    x, w = torch.randn(8, 512, device=target), torch.randn(16, 512, device=target)
    px, sx = ops.binary_quantize(x)
    pw, sw = ops.binary_quantize(w)
    out = ops.binary_scaled_mm(px, pw, 512, sx, sw)
    estimate = (fmt.binarize(x) * sx[:, None]) @ (fmt.binarize(w) * sw[:, None]).T
    torch.testing.assert_close(out, estimate, rtol=1e-5, atol=1e-4)


def test_portable_path_matches_reference():
    """The no-AVX2 path (LOWBIT_CPU_ISA=scalar): the 64-bit popcnt GEMM loop and the scalar quantize.

    LOWBIT_BINARY_LOOP=popcnt64 selects the same GEMM loop on an AVX2 machine (for benchmarks)."""
    if lowbit.backends._cpu_reference_ops:
        pytest.skip("the C++ extension is not built")
    code = """
import torch, lowbit
from lowbit import ops
from lowbit.backends.reference import binary as ref
g = torch.Generator().manual_seed(0)
for M, N, K in [(1, 5, 1), (17, 37, 65), (128, 9, 1000), (3, 70, 4096), (9, 4, 9005)]:
    a = torch.randint(-2**31, 2**31, (M, (K + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    b = torch.randint(-2**31, 2**31, (N, (K + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(ops.binary_mm(a, b, K), ref.binary_mm(a, b, K)), (M, N, K)
    sa, sb, bias = torch.rand(M), torch.rand(N), torch.randn(N)
    assert torch.equal(ops.binary_scaled_mm(a, b, K, sa, sb, bias, torch.bfloat16),
                       ref.binary_scaled_mm(a, b, K, sa, sb, bias, torch.bfloat16))
    x = torch.randn(M, K).half()
    assert torch.equal(ops.binary_quantize(x)[0], ref.binary_quantize(x)[0])
print('ok')
"""
    env = dict(os.environ, LOWBIT_CPU_ISA="scalar")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_avx2_loops_on_avx512_vpopcntdq_machines():
    """This file's exactness tests once more on the AVX2 loops (LOWBIT_BINARY_LOOP=avx2, read once
    per process), where the AVX-512 VPOPCNTDQ loop would otherwise run every binary GEMM."""
    if "avx512_vpopcntdq" not in lowbit.bench.cpu_flags() or os.environ.get("LOWBIT_BINARY_LOOP"):
        pytest.skip("the AVX2 loops already run in this process")
    cpu_routes.rerun_with_env(__file__, "cpu and not avx2_loops and not portable and not opcheck and not compile",
                              LOWBIT_BINARY_LOOP="avx2")


# ----------------------------------------------------------------------------- bad inputs
def _bad_calls(device):
    i32 = lambda *s: torch.zeros(s, dtype=torch.int32, device=device)  # noqa: E731
    f32 = lambda *s: torch.ones(s, device=device)  # noqa: E731
    meta = torch.device("meta")
    return [
        ("binary_mm", (i32(2, 2), i32(3, 2), 100), "a must have shape [M, ceil(K/32)]=[2, 4] for K=100, got [2, 2]"),
        ("binary_mm", (i32(2, 4), i32(3, 3), 100), "b must have shape [N, ceil(K/32)]=[3, 4] for K=100, got [3, 3]"),
        ("binary_mm", (f32(2, 4), i32(3, 4), 100), "a must have dtype int32, got float32"),
        ("binary_mm", (i32(2, 4), i32(3, 4).to(torch.int64), 100), "b must have dtype int32, got int64"),
        ("binary_mm", (i32(2, 4), i32(3, 4), 0), "K must be an int in [1, 2147483647], got 0"),
        ("binary_mm", (i32(2, 4, 1), i32(3, 4), 100), "a must be 2-D"),
        ("binary_mm", (i32(0, 4), i32(3, 4), 100), "a must not have a zero-sized"),
        ("binary_mm", (i32(2, 4), i32(3, 4).to(meta), 100), "b is on meta"),
        ("binary_scaled_mm", (i32(2, 1), i32(3, 1), 5, f32(3), f32(3)), "scale_a must have shape [M]=[2]"),
        ("binary_scaled_mm", (i32(2, 1), i32(3, 1), 5, f32(2), f32(2)), "scale_b must have shape [N]=[3]"),
        ("binary_scaled_mm", (i32(2, 1), i32(3, 1), 5, f32(2).half(), f32(3)), "scale_a must have dtype float32"),
        ("binary_scaled_mm", (i32(2, 1), i32(3, 1), 5, f32(2), f32(3), f32(4)), "bias must have shape [N]=[3]"),
        ("binary_scaled_mm", (i32(2, 1), i32(3, 1), 5, f32(2), f32(3), None, torch.int32),
         "out_dtype must be float32, float16 or bfloat16, got torch.int32"),
        ("binary_quantize", (i32(2, 4),), "x must have dtype float32, float16, bfloat16, got int32"),
        ("binary_quantize", (f32(2, 4, 1),), "x must be 2-D"),
        ("binary_quantize", (f32(2, 0),), "x must not have a zero-sized"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls("cpu"))))
def test_bad_inputs_raise_value_error_naming_the_argument(target, index):
    op, args, message = _bad_calls(target)[index]
    with pytest.raises(ValueError, match=re.escape(f"lowbit.{op}: ") + ".*" + re.escape(message)):
        getattr(torch.ops.lowbit, op)(*args)


@pytest.mark.parametrize("index", range(len(_bad_calls("cpu"))))
def test_python_and_cpp_checks_say_the_same(index):
    op, args, _ = _bad_calls("cpu")[index]
    with pytest.raises(ValueError) as cpp:
        getattr(torch.ops.lowbit, op)(*args)
    with pytest.raises(ValueError) as py:
        lowbit.backends.checked_reference(op)(*args)
    assert str(cpp.value).splitlines()[0] == str(py.value).splitlines()[0]


# ----------------------------------------------------------------------------- opcheck / compile
def sample_inputs(device):
    a, b = random_words(5, 70, device), random_words(7, 70, device, seed=1)
    x = torch.randn(5, 70, device=device)
    return {
        "binary_quantize": [(x,), (x.bfloat16(),)],
        "binary_mm": [(a, b, 70)],
        "binary_scaled_mm": [(a, b, 70, torch.rand(5, device=device), torch.rand(7, device=device)),
                             (a, b, 70, torch.rand(5, device=device), torch.rand(1, device=device),
                              torch.randn(7, device=device), torch.bfloat16)],
    }


def test_every_binary_op_has_samples():
    assert set(sample_inputs("cpu")) == set(BINARY_OPS)
    assert set(BINARY_OPS) <= set(lowbit._ops.op_names())


@pytest.mark.parametrize("op", BINARY_OPS)
def test_opcheck(target, op):
    for args in sample_inputs(target)[op]:
        torch.library.opcheck(getattr(torch.ops.lowbit, op).default, args)


def test_torch_compile_fullgraph_xnor_linear(target):
    w = torch.randn(24, 70, device=target)
    pw, sw = ops.binary_quantize(w)

    def xnor_linear(x):
        px, sx = ops.binary_quantize(x)
        return ops.binary_scaled_mm(px, pw, 70, sx, sw, None, torch.float32)

    x = torch.randn(9, 70, device=target)
    compiled = torch.compile(xnor_linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), xnor_linear(x), rtol=0, atol=0)
