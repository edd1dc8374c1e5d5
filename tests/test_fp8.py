"""FP8 ops through the dispatcher, on every backend this machine has, against the reference
(lowbit.backends.reference.fp8) and against torch's own fp8 dtype conversion."""

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
from lowbit import _checks, bench, ops
from lowbit.backends.reference import fp8 as ref

FP8_OPS = ["fp8_quantize_dynamic", "fp8_quantize_static", "fp8_scaled_mm", "fp8_weight_only_mm"]
FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
MIN_SUBNORMAL = {"e4m3": 2.0**-9, "e5m2": 2.0**-16}

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


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.uint8)


def fp8_amx_runs(M: int = 2) -> bool:
    """Whether fp8 CPU GEMMs of M rows take the AMX kernel (csrc/cpu/fp8.cpp, use_fp8_amx: from
    M = 2 with vector scales where AMX-BF16 is ready, unless LOWBIT_FP8_AMX=0 or
    LOWBIT_DECODED_GEMM=1; every M with LOWBIT_FP8_AMX=1)."""
    env = os.environ.get("LOWBIT_FP8_AMX", "")[:1]
    if not cpu_routes.amx_bf16_ready() or env == "0":
        return False
    return env == "1" or (M >= 2 and os.environ.get("LOWBIT_DECODED_GEMM", "")[:1] != "1")


def assert_decoded(out: torch.Tensor, expected: torch.Tensor, amx: bool = False):
    """Decoded values equal torch's conversion bit for bit on the CPU.

    GPU tensor cores and CPU AMX tiles canonicalize NaN payloads and start their sums from +0, so
    there the NaN codes must decode to NaN and every other code to exactly the same value (+0 ==
    -0 is checked separately by the CPU run without AMX). amx: out came from the AMX kernel.
    """
    if out.device.type == "cpu" and not amx:
        assert torch.equal(bits(out), bits(expected))
        return
    out, expected = out.cpu(), expected.cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(bits(out[~nan] + 0.0), bits(expected[~nan] + 0.0))


def all_codes(fmt, device="cpu"):
    return torch.arange(256, dtype=torch.uint8, device=device).view(FORMATS[fmt])


def rand_fp8(fmt, *shape, device="cpu", scale=1.0):
    return ((torch.randn(shape) * scale).to(FORMATS[fmt])).to(device)


# ----------------------------------------------------------------------------- decode
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 40])  # the small-M (in-register) and large-M (decoded block) paths
def test_every_code_decodes_bit_exactly_in_weight_only_mm(target, fmt, M):
    w = all_codes(fmt, target).reshape(256, 1)
    out = ops.fp8_weight_only_mm(torch.ones(M, 1, device=target), w, torch.ones((), device=target))
    expected = w.cpu().to(torch.float32).reshape(1, 256).expand(M, 256)
    assert_decoded(out, expected)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_runs_of_codes_along_k_decode_bit_exactly_in_weight_only_gemv(target, fmt, x_dtype):
    """Codes along K, as the small-M kernel decodes them (32 at a time on the CPU): rows of normal
    codes and zeros only (e4m3's integer fast path, zeros included), rows with many zeros, and rows
    that also hold subnormals (the fp16 route); every finite code appears. One-hot rows of x read
    the decoded weights back exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    vals = codes.view(FORMATS[fmt]).float()
    smallest_normal = 2.0**-6 if fmt == "e4m3" else 2.0**-14
    finite = torch.isfinite(vals)
    normal_or_zero = codes[finite & ((vals.abs() >= smallest_normal) | (vals == 0))]
    any_finite = codes[finite]
    g = torch.Generator().manual_seed(0)
    K = 256
    pick = lambda pool: pool[torch.randint(len(pool), (K,), generator=g)]  # noqa: E731
    rows = [pick(normal_or_zero) for _ in range(6)] + [pick(any_finite) for _ in range(4)]
    rows[0][: len(normal_or_zero)] = normal_or_zero
    rows[6][: len(any_finite)] = any_finite
    rows[1][::3] = 0      # +0 every third code
    rows[2][1::2] = 0x80  # -0 every other code
    w = torch.stack(rows).view(FORMATS[fmt]).to(target)
    one = torch.ones((), device=target)
    for k0 in range(0, K, 4):  # bf16 x: the AMX kernel where AMX-BF16 is ready
        x = torch.zeros(4, K)
        x[torch.arange(4), k0 + torch.arange(4)] = 1.0
        out = ops.fp8_weight_only_mm(x.to(target, x_dtype), w, one).float().cpu()
        expected = w.cpu().float()[:, k0:k0 + 4].T.to(x_dtype).float()
        # + 0.0: a -0 weight times 1, summed with +0 products, is +0 on every backend.
        assert torch.equal(bits(out + 0.0), bits(expected + 0.0)), f"columns {k0}..{k0 + 3}"


@pytest.mark.parametrize("fmt_a", FORMATS)
@pytest.mark.parametrize("fmt_b", FORMATS)
@pytest.mark.parametrize("amx", ["auto", "off"])
def test_every_code_decodes_bit_exactly_in_scaled_mm(monkeypatch, target, fmt_a, fmt_b, amx):
    if amx == "off":  # the CPU kernels without AMX, bit for bit (NaN payloads and -0 included)
        if target.type != "cpu" or not cpu_routes.amx_bf16_ready():
            pytest.skip("the same run as amx=auto here")
        monkeypatch.setenv("LOWBIT_FP8_AMX", "0")
    else:
        monkeypatch.delenv("LOWBIT_FP8_AMX", raising=False)
    one = lambda fmt: torch.ones(1, 1, device=target).to(FORMATS[fmt])  # noqa: E731
    s = torch.ones((), device=target)
    codes_a, codes_b = all_codes(fmt_a, target).reshape(256, 1), all_codes(fmt_b, target).reshape(256, 1)
    # a in chunks of 16 rows (the small-M kernel, whose sums start from -0 and so keep -0.0)
    out_a = torch.cat([ops.fp8_scaled_mm(chunk, one(fmt_b), s, s) for chunk in codes_a.split(16)])
    out_b = ops.fp8_scaled_mm(one(fmt_a), codes_b, s, s)  # [1, 256]: decodes b
    assert_decoded(out_a, codes_a.cpu().float(), amx=fp8_amx_runs(16))
    assert_decoded(out_b, codes_b.cpu().float().T, amx=fp8_amx_runs(1))
    # All 256 rows at once take the decode + BLAS path (or AMX): exact too, except that their
    # sums start from +0, so a lone -0.0 product comes out +0.0 (as torch.mm gives).
    out = ops.fp8_scaled_mm(codes_a, one(fmt_b), s, s).cpu()
    if fp8_amx_runs(256):
        assert_decoded(out + 0.0, codes_a.cpu().float() + 0.0, amx=True)
    else:
        assert torch.equal(bits(out + 0.0), bits(codes_a.cpu().float() + 0.0))


@pytest.mark.parametrize("env", ["0", "1", None], ids=["never", "always", "auto"])
@pytest.mark.parametrize("M", [1, 2, 20])
def test_cpu_fp8_amx_route(monkeypatch, env, M):
    """Where the AMX kernel runs it counts subnormal bf16 activations as zero (documented): a
    subnormal x times a weight of 1 tells the routes apart; the other rows check the values, and
    fp8_scaled_mm (fp8 activations: never subnormal in bf16) stays within the fp32 bound either way."""
    monkeypatch.delenv("LOWBIT_DECODED_GEMM", raising=False)
    if env is None:
        monkeypatch.delenv("LOWBIT_FP8_AMX", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_FP8_AMX", env)
    N, K = 19, 70
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).bfloat16()
    x[0] = 0
    x[0, 3] = 1e-39  # a bf16 subnormal
    w = (torch.randn(N, K, generator=g) * 4).to(torch.float8_e4m3fn)
    w[:, 3] = 1.0
    out = ops.fp8_weight_only_mm(x, w, torch.ones(N))
    amx = fp8_amx_runs(M)
    assert torch.equal(out[0], torch.zeros(N, dtype=torch.bfloat16) if amx else x[0, 3].expand(N))
    exact = x[1:].double() @ w.double().T
    bound = (K + 2) * torch.finfo(torch.float32).eps * (x[1:].double().abs() @ w.double().abs().T)
    assert ((out[1:].double() - exact).abs() <= bound + torch.finfo(torch.bfloat16).eps * exact.abs()).all()
    a = (torch.randn(M, K, generator=g) * 4).to(torch.float8_e5m2)
    sa, sw = torch.rand(M, generator=g) + 0.5, torch.rand(N, generator=g) + 0.5
    got = ops.fp8_scaled_mm(a, w, sa, sw)
    monkeypatch.setenv("LOWBIT_FP8_AMX", "0")
    other = ops.fp8_scaled_mm(a, w, sa, sw)
    exact = (a.double() @ w.double().T) * sa.double()[:, None] * sw.double()
    bound = (K + 4) * torch.finfo(torch.float32).eps * (a.double().abs() @ w.double().abs().T) * sa.double()[:, None] * sw.double()
    assert ((got.double() - exact).abs() <= bound).all() and ((other.double() - exact).abs() <= bound).all()


# ----------------------------------------------------------------------------- encode policy
def _policy_cases(fmt):
    inf, nan = float("inf"), float("nan")
    m, sub = FMAX[fmt], MIN_SUBNORMAL[fmt]
    # value -> (saturating result, non-saturating result)
    cases = {
        0.0: (0.0, 0.0), m: (m, m), inf: (m, inf), nan: (nan, nan),
        sub: (sub, sub), sub / 2: (0.0, 0.0),            # a tie: rounds to the even code, 0
        sub * 0.5000001: (sub, sub), sub * 1.5: (2 * sub, 2 * sub),  # tie to even: 2 * sub
        sub * 0.49: (0.0, 0.0),
    }
    if fmt == "e4m3":
        cases.update({448.5: (448.0, 448.0), 464.0: (448.0, 448.0), 464.01: (448.0, nan), 465.0: (448.0, nan),
                      480.0: (448.0, nan), 1e30: (448.0, nan), 2.0**-6: (2.0**-6, 2.0**-6), inf: (448.0, nan)})
    else:
        cases.update({57344.0: (57344.0, 57344.0), 61439.0: (57344.0, 57344.0), 61440.0: (57344.0, inf),
                      1e30: (57344.0, inf), 2.0**-14: (2.0**-14, 2.0**-14)})
    return cases


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_boundary_values_follow_the_saturation_policy(target, fmt, saturate):
    cases = _policy_cases(fmt)
    values = torch.tensor(list(cases), dtype=torch.float32)
    x = torch.cat([values, -values]).to(target)
    want = torch.tensor([v[0 if saturate else 1] for v in cases.values()], dtype=torch.float32)
    want = torch.cat([want, -want])
    one = torch.ones((), device=target)
    for q in (ops.fp8_quantize_static(x, one, fmt, saturate), ref.fp8_quantize_static(x.cpu(), one.cpu(), fmt, saturate)):
        got = q.cpu().float()
        assert q.dtype == FORMATS[fmt]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (x, got)
        ok = torch.isnan(want) | (got == want) & (torch.signbit(got) == torch.signbit(want))
        assert ok.all(), (x[~ok], got[~ok], want[~ok])


def _encode_probe(fmt):
    """Every fp8 value, the midpoints between neighbours (RNE ties) and one fp32 ulp either side."""
    v = all_codes(fmt).float()
    v = v[torch.isfinite(v) & (v >= 0)].unique().sort().values.double()
    mids = ((v[1:] + v[:-1]) / 2).float()
    probe = torch.cat([v.float(), mids, torch.nextafter(mids, torch.tensor(0.0)),
                       torch.nextafter(mids, torch.tensor(float("inf"))), torch.tensor([v[-1].item() * 1.03])])
    random_bits = torch.randint(-2**31, 2**31 - 1, (4096,), dtype=torch.int32).view(torch.float32)
    return torch.cat([probe, -probe, random_bits])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_encoding_is_bit_exact_on_ties_and_random_bit_patterns(target, fmt, saturate):
    x = _encode_probe(fmt)
    q = ops.fp8_quantize_static(x.to(target), torch.ones((), device=target), fmt, saturate)
    expected = ref.fp8_quantize_static(x, torch.ones(()), fmt, saturate)
    assert torch.equal(bits(q), bits(expected))
    # The reference itself agrees with torch's conversion wherever torch has no overflow to decide.
    in_range = x.abs() <= FMAX[fmt]
    # (Indexed as bytes: torch 2.6 has no boolean indexing of float8 tensors on the CPU.)
    assert torch.equal(bits(expected)[in_range], bits(x.to(FORMATS[fmt]))[in_range])


# ----------------------------------------------------------------------------- quantize
GRANULARITY_SHAPES = [
    ("tensor", (5,)), ("tensor", (3, 4099)), ("row", (1, 1)), ("row", (2, 3, 17)), ("row", (64, 256)),
    ("block1x128", (3, 300)), ("block1x128", (2, 2, 128)), ("block128x128", (130, 257)), ("block128x128", (1, 5)),
]


@pytest.mark.parametrize("granularity,shape", GRANULARITY_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_dynamic_bit_exact(target, granularity, shape, dtype, fmt):
    x = (torch.randn(shape) * 3).to(dtype)
    if x.dim() >= 2:
        x.reshape(-1, x.shape[-1])[0].zero_()  # an all-zero row/block: scale 1, q 0, no NaN
    if x.numel() > 8:
        x.view(-1)[3], x.view(-1)[5], x.view(-1)[7] = float("inf"), float("nan"), -float("inf")
    q, scale = ops.fp8_quantize_dynamic(x.to(target), fmt, granularity)
    q_ref, scale_ref = ref.fp8_quantize_dynamic(x, fmt, granularity)
    assert q.dtype == FORMATS[fmt] and scale.dtype == torch.float32 and scale.shape == scale_ref.shape
    assert torch.equal(bits(scale), bits(scale_ref)) and torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(bits(q), bits(q_ref))


def test_quantize_dynamic_scale_shapes_and_round_trip(target):
    x = torch.randn(130, 300, device=target)
    shapes = {"tensor": (), "row": (130,), "block1x128": (130, 3), "block128x128": (2, 3)}
    for granularity, shape in shapes.items():
        q, s = ops.fp8_quantize_dynamic(x, "e4m3", granularity)
        assert s.shape == shape
        # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normals, plus the subnormal step.
        err = (ref.fp8_dequantize(q.cpu(), s.cpu()) - x.cpu()).abs()
        bound = x.cpu().abs() * 2**-4 + ref.expand_scale(s.cpu(), x.shape) * MIN_SUBNORMAL["e4m3"] / 2
        assert (err <= bound).all()


def test_all_zero_and_tiny_inputs_give_finite_scales(target):
    for x in (torch.zeros(4, 200), torch.full((4, 200), 1e-45)):
        for granularity in ("tensor", "row", "block1x128", "block128x128"):
            q, s = ops.fp8_quantize_dynamic(x.to(target), "e4m3", granularity)
            assert torch.isfinite(s).all() and (s > 0).all()
            assert not torch.isnan(q.float()).any()


@pytest.mark.parametrize("scale_kind", ["scalar", "one", "per-row", "per-block"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_static_bit_exact(target, scale_kind, fmt):
    x = torch.randn(6, 300) * 1000
    scale = {"scalar": torch.tensor(0.5), "one": torch.tensor([2.0]), "per-row": torch.rand(6) + 0.01,
             "per-block": torch.rand(6, 3) + 0.01}[scale_kind]
    q = ops.fp8_quantize_static(x.to(target), scale.to(target), fmt)
    assert torch.equal(bits(q), bits(ref.fp8_quantize_static(x, scale, fmt)))


def test_quantize_non_contiguous(target):
    x = torch.randn(300, 10, device=target).T
    q, s = ops.fp8_quantize_dynamic(x, "e4m3", "block1x128")
    q2, s2 = ops.fp8_quantize_dynamic(x.contiguous(), "e4m3", "block1x128")
    assert torch.equal(bits(q), bits(q2)) and torch.equal(s, s2)


# ----------------------------------------------------------------------------- GEMMs
def float_bound(exact, magnitude, K, out_dtype):
    """fp32 accumulation in any order (K * eps32 * sum|terms|) + half an ulp of the output."""
    eps32 = torch.finfo(torch.float32).eps
    return (K + 4) * eps32 * magnitude + torch.finfo(out_dtype).eps * exact.abs() + torch.finfo(out_dtype).tiny


def _expected(a, b, sa, sb, bias):
    """float64 result and the sum of |terms| for the fp32 bound."""
    a64, b64 = a.cpu().double(), b.cpu().double()
    if sa.dim() == 2:
        a64 = a64 * ref.expand_scale(sa.cpu().double(), a.shape)
        b64 = b64 * ref.expand_scale(sb.cpu().double(), b.shape)
        exact, magnitude = a64 @ b64.T, a64.abs() @ b64.abs().T
    else:
        s = ref._vector_scale(sa.cpu().double(), (-1, 1)) * ref._vector_scale(sb.cpu().double(), (1, -1))
        exact, magnitude = (a64 @ b64.T) * s, (a64.abs() @ b64.abs().T) * s.abs()
    if bias is not None:
        exact = exact + bias.cpu().double()
        magnitude = magnitude + bias.cpu().double().abs()
    return exact, magnitude


def _scales(kind, M, N, K, device):
    kb = (K + 127) // 128
    if kind == "row-col":
        return torch.rand(M) * 0.1 + 1e-3, torch.rand(N) * 0.1 + 1e-3
    if kind == "scalar":
        return torch.tensor(0.03), torch.tensor([0.02])
    return torch.rand(M, kb) * 0.1 + 1e-3, torch.rand((N + 127) // 128, kb) * 0.1 + 1e-3


@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("N,K", [(7, 33), (130, 300), (33, 1000)])
@pytest.mark.parametrize("fmts", [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e5m2")])
@pytest.mark.parametrize("scales", ["row-col", "scalar", "block"])
def test_fp8_scaled_mm(target, M, N, K, fmts, scales):
    a, b = rand_fp8(fmts[0], M, K, scale=4), rand_fp8(fmts[1], N, K, scale=4)
    sa, sb = _scales(scales, M, N, K, target)
    out_dtype = [torch.float32, torch.bfloat16, torch.float16][(M + N) % 3]
    bias = torch.randn(N) if M % 2 else None
    out = ops.fp8_scaled_mm(a.to(target), b.to(target), sa.to(target), sb.to(target),
                            None if bias is None else bias.to(target), out_dtype)
    assert out.dtype == out_dtype and out.shape == (M, N)
    exact, magnitude = _expected(a, b, sa, sb, bias)
    err = (out.cpu().double() - exact).abs()
    bound = float_bound(exact, magnitude, K, out_dtype)
    assert (err <= bound).all(), f"max err {err.max()}"


@pytest.mark.parametrize("M", [1, 2, 5, 16, 17, 64])
@pytest.mark.parametrize("N,K", [(7, 33), (130, 300), (3, 4101)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale_kind", ["row", "scalar", "block"])
def test_fp8_weight_only_mm(target, M, N, K, fmt, scale_kind):
    dtype = [torch.float32, torch.bfloat16, torch.float16][(M + K) % 3]
    x = torch.randn(M, K).to(dtype)
    w = rand_fp8(fmt, N, K, scale=8)
    scale = {"row": torch.rand(N) * 0.1 + 1e-3, "scalar": torch.tensor([0.05]),
             "block": torch.rand((N + 127) // 128, (K + 127) // 128) * 0.1 + 1e-3}[scale_kind]
    bias = torch.randn(N).to(dtype) if M % 2 else None
    out = ops.fp8_weight_only_mm(x.to(target), w.to(target), scale.to(target), None if bias is None else bias.to(target))
    assert out.dtype == dtype and out.shape == (M, N)
    if scale_kind == "block":
        exact, magnitude = _expected(x, w, torch.ones(M, scale.shape[1]), scale, bias)
    else:
        exact, magnitude = _expected(x, w, torch.ones(()), scale, bias)
    err = (out.cpu().double() - exact).abs()
    assert (err <= float_bound(exact, magnitude, K, dtype)).all(), f"max err {err.max()}"


def test_gemms_non_contiguous_equal_contiguous(target):
    a = rand_fp8("e4m3", 300, 9, device=target).T           # [9, 300], column-major
    b = rand_fp8("e5m2", 13, 600, device=target)[:, ::2]     # K stride 2
    sa, sb = torch.rand(9, device=target), torch.rand(26, device=target)[::2]
    torch.testing.assert_close(ops.fp8_scaled_mm(a, b, sa, sb),
                               ops.fp8_scaled_mm(a.contiguous(), b.contiguous(), sa, sb.contiguous()), rtol=0, atol=0)
    x = torch.randn(300, 9, device=target).T
    torch.testing.assert_close(ops.fp8_weight_only_mm(x, b, sb), ops.fp8_weight_only_mm(x.contiguous(), b.contiguous(), sb.contiguous()),
                               rtol=0, atol=0)


def test_nan_and_inf_weights_propagate(target):
    w = torch.tensor([[1.0, float("nan")], [1.0, 2.0]]).to(torch.float8_e5m2)
    w[1, 1] = float("inf")
    out = ops.fp8_weight_only_mm(torch.ones(1, 2, device=target), w.to(target), torch.ones((), device=target))
    assert torch.isnan(out[0, 0]) and out[0, 1] == float("inf")


def test_scalar_cpu_path_matches_the_reference():
    """The portable kernels (no AVX2) run in a subprocess: the ISA is chosen once per process."""
    code = """
import torch, lowbit
from lowbit import ops
from lowbit.backends.reference import fp8 as ref
assert not lowbit.backends._cpu_reference_ops, 'extension not built'
torch.manual_seed(0)
x = torch.randn(40, 300) * 100; x[0, 0] = float('inf'); x[1, 1] = float('nan')
for fmt in ('e4m3', 'e5m2'):
    for g in ('row', 'block128x128'):
        for sat in (True, False):
            q, s = ops.fp8_quantize_dynamic(x, fmt, g, sat); qr, sr = ref.fp8_quantize_dynamic(x, fmt, g, sat)
            assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    w = torch.arange(256, dtype=torch.uint8).view(ref.FP8_FORMATS[fmt]).reshape(256, 1)
    for M in (1, 40):
        out = ops.fp8_weight_only_mm(torch.ones(M, 1), w, torch.ones(()))
        assert torch.equal(out.view(torch.int32), w.float().reshape(1, 256).expand(M, 256).contiguous().view(torch.int32))
    qw, sw = ref.fp8_quantize_dynamic(torch.randn(70, 300), fmt, 'block128x128')
    for M in (1, 40):
        xx = torch.randn(M, 300)
        torch.testing.assert_close(ops.fp8_weight_only_mm(xx, qw, sw), ref.fp8_weight_only_mm(xx, qw, sw), rtol=1e-5, atol=1e-4)
print('ok')
"""
    if lowbit.backends._cpu_reference_ops:
        pytest.skip("the C++ extension is not built")
    env = dict(os.environ, LOWBIT_CPU_ISA="scalar")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_avx2_gemv_tiles_on_avx512_machines():
    """The decode and GEMM tests once more with the AVX2 tiles, where the AVX-512 ones (M <= 4)
    would otherwise run (a subprocess: LOWBIT_CPU_ISA is read once per process)."""
    if "avx512f" not in bench.cpu_flags() or os.environ.get("LOWBIT_CPU_ISA"):
        pytest.skip("the AVX2 tiles already run in this process")
    select = "cpu and (decode or fp8_scaled_mm or fp8_weight_only_mm) and not non_contiguous"
    cpu_routes.rerun_with_env(__file__, select, LOWBIT_CPU_ISA="avx2")


# ----------------------------------------------------------------------------- bad inputs
def _bad_calls(device):
    e4 = lambda *s: torch.zeros(s, device=device).to(torch.float8_e4m3fn)  # noqa: E731
    f32 = lambda *s: torch.ones(s, device=device)  # noqa: E731
    i8 = lambda *s: torch.zeros(s, dtype=torch.int8, device=device)  # noqa: E731
    meta = torch.device("meta")
    return [
        ("fp8_quantize_dynamic", (i8(2, 4),), "x must have dtype float32, float16, bfloat16, got int8"),
        ("fp8_quantize_dynamic", (e4(2, 4),), "x must have dtype float32, float16, bfloat16, got float8_e4m3fn"),
        ("fp8_quantize_dynamic", (f32(2, 0),), "x must not have a zero-sized"),
        ("fp8_quantize_dynamic", (f32(2, 4), "e3m4"), "format must be 'e4m3' or 'e5m2', got 'e3m4'"),
        ("fp8_quantize_dynamic", (f32(2, 4), "e4m3", "col"), "granularity must be 'tensor', 'row'"),
        ("fp8_quantize_dynamic", (f32(2, 2, 4), "e4m3", "block128x128"), "x must be 2-D for granularity"),
        ("fp8_quantize_static", (f32(2, 4), f32(3)), "scale must be a scalar ([] or [1]), have shape x.shape[:-1]=[2]"),
        ("fp8_quantize_static", (f32(2, 4), f32(2).double()), "scale must have dtype float32, got float64"),
        ("fp8_quantize_static", (f32(2, 4), f32().to(meta)), "scale is on meta"),
        ("fp8_scaled_mm", (i8(2, 4), e4(3, 4), f32(2), f32(3)), "a must have dtype float8_e4m3fn, float8_e5m2, got int8"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 5), f32(2), f32(3)), "their K must match"),
        ("fp8_scaled_mm", (e4(2, 4, 1), e4(3, 4), f32(2), f32(3)), "a must be 2-D"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 4), f32(3), f32(3)), "scale_a must have shape [M]=[2]"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 4), f32(2), f32(2)), "scale_b must have shape [N]=[3]"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 4), f32(2, 1), f32(3)), "scale_b must have shape [ceil(N/128), ceil(K/128)]=[1, 1]"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 4), f32(2, 2), f32(1, 1)), "scale_a must have shape [M, ceil(K/128)]=[2, 1]"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 4), f32(2).half(), f32(3)), "scale_a must have dtype float32, got float16"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 4), f32(2), f32(3), f32(4)), "bias must have shape [N]=[3]"),
        ("fp8_scaled_mm", (e4(2, 4), e4(3, 4), f32(2), f32(3), None, torch.int32), "out_dtype must be"),
        ("fp8_scaled_mm", (e4(0, 4), e4(3, 4), f32(), f32(3)), "a must not have a zero-sized"),
        ("fp8_weight_only_mm", (e4(2, 4), e4(3, 4), f32(3)), "x must have dtype float32, float16, bfloat16, got float8_e4m3fn"),
        ("fp8_weight_only_mm", (f32(2, 4), i8(3, 4), f32(3)), "w must have dtype float8_e4m3fn, float8_e5m2, got int8"),
        ("fp8_weight_only_mm", (f32(2, 4), e4(3, 4), f32(4)), "scale must be a scalar ([] or [1]), have shape [N]=[3]"),
        ("fp8_weight_only_mm", (f32(2, 4), e4(3, 5), f32(3)), "their K must match"),
        ("fp8_weight_only_mm", (f32(2, 4), e4(3, 4).to(meta), f32(3)), "w is on meta"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls("cpu"))))
def test_bad_inputs_raise_value_error_naming_the_argument(target, index):
    op, args, message = _bad_calls(target)[index]
    with pytest.raises(ValueError, match=re.escape(f"lowbit.{op}: ") + ".*" + re.escape(message)) as kernel_error:
        getattr(torch.ops.lowbit, op)(*args)
    # The C++ checks and the Python ones (fakes, reference) say exactly the same thing.
    with pytest.raises(ValueError) as python_error:
        getattr(_checks, op)(op, *args)
    assert str(python_error.value) == str(kernel_error.value).split("\n")[0]


# ----------------------------------------------------------------------------- opcheck / compile
def sample_inputs(device):
    x = torch.randn(5, 300, device=device)
    a, b = rand_fp8("e4m3", 5, 300, device=device), rand_fp8("e5m2", 7, 300, device=device)
    return {
        "fp8_quantize_dynamic": [(x,), (x, "e5m2", "tensor", False), (x.bfloat16(), "e4m3", "block1x128"),
                                 (x, "e4m3", "block128x128")],
        "fp8_quantize_static": [(x, torch.tensor(0.1, device=device)), (x, torch.rand(5, 3, device=device), "e5m2")],
        "fp8_scaled_mm": [(a, b, torch.rand(5, device=device), torch.rand(7, device=device)),
                          (a, b, torch.rand(5, 3, device=device), torch.rand(1, 3, device=device),
                           torch.randn(7, device=device), torch.bfloat16)],
        "fp8_weight_only_mm": [(x, b, torch.rand(7, device=device)),
                               (x.half(), b, torch.rand(1, 3, device=device), torch.randn(7, device=device).half())],
    }


def test_every_fp8_op_has_samples():
    assert set(sample_inputs("cpu")) == set(FP8_OPS)
    assert set(FP8_OPS) <= set(lowbit._ops.op_names())


@pytest.mark.parametrize("op", FP8_OPS)
def test_opcheck(target, op):
    # opcheck's schema test compares inputs before and after with allclose, which torch does not
    # implement for fp8 tensors; for ops with fp8 inputs the no-mutation check is done here instead.
    fp8_inputs = op in ("fp8_scaled_mm", "fp8_weight_only_mm")
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic") if fp8_inputs else None
    for args in sample_inputs(target)[op]:
        before = [bits(a.clone()) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(getattr(torch.ops.lowbit, op).default, args, **kwargs)
        getattr(torch.ops.lowbit, op)(*args)
        for a, b in zip(args, before):
            assert not isinstance(a, torch.Tensor) or torch.equal(bits(a), b)


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_torch_compile_fullgraph_matches_eager(target, granularity):
    w = torch.randn(24, 200, device=target)
    wg, ag = ("row", "row") if granularity == "row" else ("block128x128", "block1x128")
    qw, sw = ops.fp8_quantize_dynamic(w, "e4m3", wg)

    def fp8_linear(x):
        qx, sx = ops.fp8_quantize_dynamic(x, "e4m3", ag)
        return ops.fp8_scaled_mm(qx, qw, sx, sw, None, torch.float32) + ops.fp8_weight_only_mm(x, qw, sw)

    x = torch.randn(9, 200, device=target)
    compiled = torch.compile(fp8_linear, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), fp8_linear(x), rtol=0, atol=0)
