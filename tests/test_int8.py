"""INT8 ops through the dispatcher, on every backend this machine has, against the reference.

CPU tensors run the C++ CPU kernels (or the reference when the extension is not built).
On a GPU machine the same tests run on CUDA tensors once per forced backend (cuda, triton,
reference). The Triton kernels are also run in the interpreter on the CPU by
tests/test_triton_int8.py.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import cpu_routes
import lowbit
import lowbit.bench
from lowbit import ops
from lowbit.backends.reference import int8 as ref

INT8_OPS = ["int8_quantize_dynamic", "int8_quantize_static", "int8_mm", "int8_scaled_mm", "int8_weight_only_mm"]

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


def rand_int8(*shape, device="cpu", low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, device=device)


M_SWEEP = [1, 2, 15, 16, 17, 33, 128]
NK_SWEEP = [(1, 1), (7, 33), (33, 100), (64, 4101), (129, 31), (3, 1000)]


# ----------------------------------------------------------------------------- int8_mm
@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("N,K", NK_SWEEP)
def test_int8_mm_exact(target, M, N, K):
    a, b = rand_int8(M, K, device=target), rand_int8(N, K, device=target)
    out = ops.int8_mm(a, b)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    torch.testing.assert_close(out.cpu(), ref.int8_mm(a.cpu(), b.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("value_a,value_b", [(-128, -128), (127, 127), (-127, 127), (-128, 127)])
def test_int8_mm_worst_case_large_k_does_not_overflow(target, value_a, value_b):
    K = lowbit._checks.INT8_MAX_K  # the largest K the op accepts
    a = torch.full((2, K), value_a, dtype=torch.int8, device=target)
    b = torch.full((3, K), value_b, dtype=torch.int8, device=target)
    out = ops.int8_mm(a, b)
    expected = K * value_a * value_b
    assert abs(expected) < 2**31
    assert (out.cpu() == expected).all(), (out, expected)


def test_int8_mm_non_contiguous_equals_contiguous(target):
    at = rand_int8(67, 9, device=target)           # a = at.T is [9, 67], column-major
    b_wide = rand_int8(11, 134, device=target)
    a, b = at.T, b_wide[:, ::2]                    # b has a K stride of 2
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(ops.int8_mm(a, b), ops.int8_mm(a.contiguous(), b.contiguous()), rtol=0, atol=0)


# On AMX-INT8 CPUs the CPU op hands W8A8 products from M = 10 on to at::_int_mm (csrc/cpu/int8.cpp,
# use_torch_int_mm); LOWBIT_INT8_ONEDNN=0 / 1 force either path, so both are tested on every CPU.
CPU_INT8_PATHS = [pytest.param("0", id="lowbit-avx2"), pytest.param("1", id="torch-int-mm")]


@pytest.mark.parametrize("path", CPU_INT8_PATHS)
@pytest.mark.parametrize("M", [9, 10, 17, 129, 300])
@pytest.mark.parametrize("N,K", [(7, 33), (129, 31), (33, 1000)])
def test_cpu_int8_products_are_exact_and_identical_on_both_cpu_paths(monkeypatch, path, M, N, K):
    a, b = rand_int8(M, K), rand_int8(N, K)
    scale_a, scale_b = torch.rand(M) * 0.01 + 1e-3, torch.rand(N) * 0.01 + 1e-3
    bias = torch.randn(N)
    monkeypatch.setenv("LOWBIT_INT8_ONEDNN", path)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = ops.int8_mm(a, b)
    assert any(e.name == "aten::_int_mm" for e in prof.events()) == (path == "1" and M >= 10)  # kTorchIntMmMinM
    torch.testing.assert_close(out, ref.int8_mm(a, b), rtol=0, atol=0)
    scaled = {dt: ops.int8_scaled_mm(a, b, scale_a, scale_b, bias, dt) for dt in (torch.float32, torch.bfloat16)}
    # The other path: the same int32 products through the same epilogue, so bit-identical.
    monkeypatch.setenv("LOWBIT_INT8_ONEDNN", "1" if path == "0" else "0")
    torch.testing.assert_close(ops.int8_mm(a, b), out, rtol=0, atol=0)
    for dt, y in scaled.items():
        torch.testing.assert_close(ops.int8_scaled_mm(a, b, scale_a, scale_b, bias, dt), y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- scaled
def float_bound(exact: torch.Tensor, magnitude: torch.Tensor, K: int, out_dtype: torch.dtype) -> torch.Tensor:
    """Worst-case rounding error of an fp32-accumulated result rounded to out_dtype.

    |error| <= K * eps32 * sum|terms| (fp32 accumulation in any order) + half an ulp of the
    output format. Any indexing or scaling bug is far outside this bound.
    """
    eps32 = torch.finfo(torch.float32).eps
    out_eps = torch.finfo(out_dtype).eps
    return (K + 2) * eps32 * magnitude + out_eps * exact.abs() + torch.finfo(out_dtype).tiny


@pytest.mark.parametrize("M", [1, 16, 17, 33])
@pytest.mark.parametrize("N,K", [(7, 33), (64, 4101), (129, 31)])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scales", ["row-col", "scalar-col", "row-scalar", "one-element"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_int8_scaled_mm(target, M, N, K, out_dtype, scales, bias_dtype):
    a, b = rand_int8(M, K, device=target), rand_int8(N, K, device=target)
    scale_a = torch.rand(M, device=target) * 0.01 + 1e-3
    scale_b = torch.rand(N, device=target) * 0.01 + 1e-3
    if scales == "scalar-col":
        scale_a = scale_a[0].clone()
    elif scales == "row-scalar":
        scale_b = scale_b[0].clone()
    elif scales == "one-element":
        scale_a, scale_b = scale_a[:1].clone(), scale_b[:1].clone()
    bias = None if bias_dtype is None else torch.randn(N, device=target).to(bias_dtype)
    out = ops.int8_scaled_mm(a, b, scale_a, scale_b, bias, out_dtype)
    want_dtype = out_dtype or torch.float32
    assert out.dtype == want_dtype and out.shape == (M, N)

    acc = ref.int8_mm(a.cpu(), b.cpu()).double()
    sa = scale_a.cpu().double().reshape(-1, 1) if scale_a.numel() > 1 else scale_a.cpu().double().reshape(())
    sb = scale_b.cpu().double().reshape(1, -1) if scale_b.numel() > 1 else scale_b.cpu().double().reshape(())
    expected = acc * sa * sb
    magnitude = expected.abs()
    if bias is not None:
        expected = expected + bias.cpu().double()
        magnitude = magnitude + bias.cpu().double().abs()
    err = (out.cpu().double() - expected).abs()
    # The integer part is exact; what remains is the int->fp32 conversion and 3 fp32 operations.
    bound = float_bound(expected, magnitude, 4, want_dtype)
    assert (err <= bound).all(), f"max err {err.max()} vs bound {bound[err > bound][:3]}"


def test_int8_scaled_mm_non_contiguous(target):
    a = rand_int8(40, 21, device=target).T
    b = rand_int8(13, 80, device=target)[:, ::2]
    sa = torch.rand(21, device=target)
    sb = torch.rand(26, device=target)[::2]                      # a strided scale
    out = ops.int8_scaled_mm(a, b, sa, sb)
    torch.testing.assert_close(out, ops.int8_scaled_mm(a.contiguous(), b.contiguous(), sa, sb.contiguous()),
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- weight-only
@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("N,K", [(7, 33), (33, 100), (64, 4101), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_weight_only_mm(target, M, N, K, dtype, with_bias):
    x = torch.randn(M, K, device=target).to(dtype)
    w = rand_int8(N, K, low=-127, device=target)
    scale = (torch.rand(N, device=target) * 0.02 + 1e-3)
    bias = torch.randn(N, device=target).to(dtype) if with_bias else None
    out = ops.int8_weight_only_mm(x, w, scale, bias)
    assert out.dtype == dtype and out.shape == (M, N)
    xd, wd, sd = x.cpu().double(), w.cpu().double(), scale.cpu().double()
    expected = (xd @ wd.T) * sd
    magnitude = (xd.abs() @ wd.abs().T) * sd
    if bias is not None:
        expected = expected + bias.cpu().double()
        magnitude = magnitude + bias.cpu().double().abs()
    err = (out.cpu().double() - expected).abs()
    bound = float_bound(expected, magnitude, K, dtype)
    assert (err <= bound).all(), f"max err {err.max()}"


@pytest.mark.parametrize("env", ["0", "1"])
@pytest.mark.parametrize("M", [95, 96, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_int8_weight_only_decoded_gemm_route(monkeypatch, env, M, dtype):
    """From M = 96 on AVX-512F CPUs (LOWBIT_DECODED_GEMM=1: on any AVX2 CPU) the int8 rows are
    widened to fp32 in 8 MiB panels (1024 rows at K = 2050: N = 2100 takes three) for torch's
    sgemm; the same fp32 bound as the packed kernel, and at::mm runs exactly on that route."""
    monkeypatch.setenv("LOWBIT_DECODED_GEMM", env)
    N, K = 2100, 2050
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scale, bias = torch.rand(N, generator=g) * 0.02 + 1e-3, torch.randn(N, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = ops.int8_weight_only_mm(x, w, scale, bias)
    avx2 = "avx2" in lowbit.bench.cpu_flags() and os.environ.get("LOWBIT_CPU_ISA") != "scalar"
    assert any(e.name == "aten::mm" for e in prof.events()) == (env == "1" and M >= 96 and avx2)
    xd, wd, sd = x.double(), w.double(), scale.double()
    expected = (xd @ wd.T) * sd + bias.double()
    magnitude = (xd.abs() @ wd.abs().T) * sd + bias.double().abs()
    err = (out.double() - expected).abs()
    assert (err <= float_bound(expected, magnitude, K, dtype)).all(), f"max err {err.max()}"


# bf16 x of M >= 5 rows on AMX CPUs: lowbit's AMX kernel (csrc/cpu/int8.cpp, wo_amx; exact
# products, fp32 accumulation: the bound above holds and test_int8_weight_only_mm covers it).
WO_AMX_MIN_M = 5


def wo_takes_amx(M, env=None):
    if not cpu_routes.amx_bf16_ready() or env == "0":
        return False
    return env == "1" or (M >= WO_AMX_MIN_M and os.environ.get("LOWBIT_DECODED_GEMM", "")[:1] != "1")


@pytest.mark.parametrize("env", ["0", "1", None], ids=["never", "always", "auto"])
@pytest.mark.parametrize("M", [1, 4, 5, 64, 65, 300])
def test_cpu_int8_weight_only_amx_route(monkeypatch, env, M):
    """Where the AMX kernel runs it counts subnormal bf16 activations as zero (documented): a
    subnormal x times a weight of 1 tells the routes apart. Every other row checks the values."""
    if env is None:
        monkeypatch.delenv("LOWBIT_INT8_WO_AMX", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_INT8_WO_AMX", env)
    monkeypatch.delenv("LOWBIT_DECODED_GEMM", raising=False)
    N, K = 37, 100
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).bfloat16()
    x[0] = 0
    x[0, 3] = 1e-39  # a bf16 subnormal
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    w[:, 3] = 1
    scale = torch.ones(N)
    out = ops.int8_weight_only_mm(x, w, scale)
    assert torch.equal(out[0], torch.zeros(N, dtype=torch.bfloat16) if wo_takes_amx(M, env) else x[0, 3].expand(N))
    expected = (x[1:].double() @ w.double().T)
    bound = float_bound(expected, x[1:].double().abs() @ w.double().abs().T, K, torch.bfloat16)
    assert ((out[1:].double() - expected).abs() <= bound).all()


def test_int8_weight_only_mm_non_contiguous(target):
    x = torch.randn(50, 9, device=target).T            # [9, 50]
    w = rand_int8(12, 100, device=target)[:, ::2]      # [12, 50]
    scale = torch.rand(24, device=target)[::2]
    out = ops.int8_weight_only_mm(x, w, scale)
    torch.testing.assert_close(out, ops.int8_weight_only_mm(x.contiguous(), w.contiguous(), scale.contiguous()))


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("shape", [(1,), (5,), (1, 1), (3, 4099), (2, 3, 17), (64, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_row", [True, False])
def test_int8_quantize_dynamic_bit_exact(target, shape, dtype, per_row):
    x = (torch.randn(shape, device=target) * 3).to(dtype)
    if x.dim() >= 2:
        x[0].zero_()  # an all-zero row must give scale 1 and q 0, not NaN
    q, scale = ops.int8_quantize_dynamic(x, per_row)
    q_ref, scale_ref = ref.int8_quantize_dynamic(x.cpu(), per_row)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == (x.shape[:-1] if per_row else ())
    torch.testing.assert_close(scale.cpu(), scale_ref, rtol=0, atol=0)
    torch.testing.assert_close(q.cpu(), q_ref, rtol=0, atol=0)
    assert torch.isfinite(scale).all()


def test_int8_quantize_ties_round_to_even(target):
    # With amax = 127 the scale is exactly 1, so x/scale hits the .5 ties exactly.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=target)
    q, scale = ops.int8_quantize_dynamic(x)
    assert scale.item() == 1.0
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


@pytest.mark.parametrize("scale_kind", ["scalar", "one", "per-row"])
def test_int8_quantize_static_bit_exact_and_clamps(target, scale_kind):
    x = torch.randn(6, 37, device=target) * 10
    scale = {"scalar": torch.tensor(0.05, device=target), "one": torch.tensor([0.05], device=target),
             "per-row": torch.rand(6, device=target) * 0.1 + 0.01}[scale_kind]
    q = ops.int8_quantize_static(x, scale)
    torch.testing.assert_close(q.cpu(), ref.int8_quantize_static(x.cpu(), scale.cpu()), rtol=0, atol=0)
    assert q.min() >= -127 and q.max() <= 127


def test_int8_quantize_non_contiguous(target):
    x = torch.randn(33, 10, device=target).T
    q, s = ops.int8_quantize_dynamic(x)
    q2, s2 = ops.int8_quantize_dynamic(x.contiguous())
    assert torch.equal(q, q2) and torch.equal(s, s2)


# ----------------------------------------------------------------------------- bad inputs
def _bad_calls(device):
    i8 = lambda *s: torch.zeros(s, dtype=torch.int8, device=device)  # noqa: E731
    f32 = lambda *s: torch.ones(s, device=device)  # noqa: E731
    meta = torch.device("meta")
    return [
        ("int8_mm", (f32(2, 4), i8(3, 4)), "a must have dtype int8"),
        ("int8_mm", (i8(2, 4), i8(3, 5)), "their K must match"),
        ("int8_mm", (i8(2, 4, 1), i8(3, 4)), "a must be 2-D"),
        ("int8_mm", (i8(0, 4), i8(3, 4)), "a must not have a zero-sized"),
        ("int8_mm", (i8(2, 4), i8(3, 4).to(meta)), "b is on meta"),
        ("int8_mm", (i8(1, lowbit._checks.INT8_MAX_K + 1), i8(1, lowbit._checks.INT8_MAX_K + 1)), "exceeds"),
        ("int8_scaled_mm", (i8(2, 4), i8(3, 4), f32(3), f32(3)), "scale_a must have shape [M]=[2]"),
        ("int8_scaled_mm", (i8(2, 4), i8(3, 4), f32(2), f32(2)), "scale_b must have shape [N]=[3]"),
        ("int8_scaled_mm", (i8(2, 4), i8(3, 4), f32(2).half(), f32(3)), "scale_a must have dtype float32"),
        ("int8_scaled_mm", (i8(2, 4), i8(3, 4), f32(2), f32(3), f32(4)), "bias must have shape [N]=[3]"),
        ("int8_scaled_mm", (i8(2, 4), i8(3, 4), f32(2), f32(3), None, torch.int32), "out_dtype must be"),
        ("int8_weight_only_mm", (i8(2, 4), i8(3, 4), f32(3)), "x must have dtype float32, float16, bfloat16"),
        ("int8_weight_only_mm", (f32(2, 4), f32(3, 4), f32(3)), "w must have dtype int8"),
        ("int8_weight_only_mm", (f32(2, 4), i8(3, 4), f32(4)), "scale must have shape [N]=[3]"),
        ("int8_weight_only_mm", (f32(2, 4), i8(3, 5), f32(3)), "their K must match"),
        ("int8_quantize_dynamic", (i8(2, 4),), "x must have dtype float32"),
        ("int8_quantize_dynamic", (f32(2, 0),), "x must not have a zero-sized"),
        ("int8_quantize_static", (f32(2, 4), f32(3)), "scale must be a scalar"),
        ("int8_quantize_static", (f32(2, 4), f32(2).double()), "scale must have dtype float32"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls("cpu"))))
def test_bad_inputs_raise_value_error_naming_the_argument(target, index):
    op, args, message = _bad_calls(target)[index]
    with pytest.raises(ValueError, match=_escape(f"lowbit.{op}: ") + ".*" + _escape(message)):
        getattr(torch.ops.lowbit, op)(*args)


def _escape(s):
    import re

    return re.escape(s)


# ----------------------------------------------------------------------------- opcheck / compile
def sample_inputs(device):
    a, b = rand_int8(5, 40, device=device), rand_int8(7, 40, device=device)
    x = torch.randn(5, 40, device=device)
    return {
        "int8_quantize_dynamic": [(x,), (x, False), (x.bfloat16(),)],
        "int8_quantize_static": [(x, torch.tensor(0.1, device=device)), (x, torch.rand(5, device=device))],
        "int8_mm": [(a, b)],
        "int8_scaled_mm": [(a, b, torch.rand(5, device=device), torch.rand(7, device=device)),
                           (a, b, torch.rand(5, device=device), torch.rand(7, device=device),
                            torch.randn(7, device=device), torch.bfloat16)],
        "int8_weight_only_mm": [(x, b, torch.rand(7, device=device)),
                                (x.half(), b, torch.rand(7, device=device), torch.randn(7, device=device).half())],
    }


def test_every_int8_op_has_samples():
    assert set(sample_inputs("cpu")) == set(INT8_OPS)
    assert set(INT8_OPS) <= set(lowbit._ops.op_names())


@pytest.mark.parametrize("op", INT8_OPS)
def test_opcheck(target, op):
    for args in sample_inputs(target)[op]:
        torch.library.opcheck(getattr(torch.ops.lowbit, op).default, args)


def test_torch_compile_fullgraph_w8a8(target):
    w = torch.randn(24, 40, device=target)
    qw, sw = ops.int8_quantize_dynamic(w)

    def w8a8_linear(x):
        qx, sx = ops.int8_quantize_dynamic(x)
        return ops.int8_scaled_mm(qx, qw, sx, sw, None, torch.float32)

    x = torch.randn(9, 40, device=target)
    compiled = torch.compile(w8a8_linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), w8a8_linear(x), rtol=0, atol=0)
