"""Triton FP8 kernels against the reference (lowbit.backends.reference.fp8).

On a machine without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported, and the kernels run in the interpreter on CPU tensors; with a GPU they run natively
on CUDA tensors (fp8_scaled_mm only on sm_89+). The host functions are called directly (no
backend routing), with small shapes: the interpreter runs numpy per program instance.

Exactness: quantization (codes and scales) and the fp8 decode are bit-exact, NaN payloads and
signed zeros included. GEMMs get the fp32 accumulation bound of tests/test_fp8.py:
(K + 4) * eps32 * sum|terms| plus half an ulp of the output dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lowbit import _checks  # noqa: E402
from lowbit.backends.reference import fp8 as ref  # noqa: E402
from lowbit.backends.triton import fp8 as tk  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FMAX = {"e4m3": 448.0, "e5m2": 57344.0}
MIN_SUBNORMAL = {"e4m3": 2.0**-9, "e5m2": 2.0**-16}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps
FP8_DOT = INTERPRET or torch.cuda.get_device_capability() >= tk.MIN_CAPABILITY["fp8_scaled_mm"]
needs_fp8_dot = pytest.mark.skipif(not FP8_DOT, reason="fp8 tensor cores need sm_89+")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu().contiguous()
    return t.view(torch.uint8 if t.element_size() == 1 else torch.int16 if t.element_size() == 2 else torch.int32)


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(DEVICE)


def rand_fp8(fmt, *shape, scale=4.0, seed=0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(FORMATS[fmt]).to(DEVICE)


def all_codes(fmt):
    return torch.arange(256, dtype=torch.uint8).view(FORMATS[fmt])


def strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t through a non-contiguous view."""
    if kind == "transposed":  # K-major storage seen as [rows, K]
        return t.T.contiguous().T
    if kind == "sliced":  # every other column of a wider tensor
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    raise ValueError(kind)


# ============================================================================ encode / decode
@triton.jit
def _encode_probe_kernel(v_ptr, q_ptr, n, E5M2: tl.constexpr, SATURATE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(q_ptr + offs, tk._encode_fp8(v, E5M2, SATURATE).to(tl.uint8), mask=offs < n)


@triton.jit
def _decode_probe_kernel(c_ptr, v_ptr, n, E5M2: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(c_ptr + offs, mask=offs < n)
    tl.store(v_ptr + offs, tk._decode_fp8(c, E5M2), mask=offs < n)


def _encode_probe(fmt):
    """Every fp8 value, the midpoints between neighbours (RNE ties), one fp32 ulp either side,
    the overflow thresholds, fp32 subnormals, infinities, NaNs and random bit patterns."""
    v = all_codes(fmt).float()
    v = v[torch.isfinite(v) & (v >= 0)].unique().sort().values.double()
    mids = ((v[1:] + v[:-1]) / 2).float()
    fmax = FMAX[fmt]
    special = torch.tensor([fmax * 1.03, 464.0, 464.01, 61439.0, 61440.0, 1e30, float("inf"), float("nan"),
                            1e-45, 1e-39, MIN_SUBNORMAL[fmt] / 2, MIN_SUBNORMAL[fmt] * 0.49])
    probe = torch.cat([v.float(), mids, torch.nextafter(mids, torch.tensor(0.0)),
                       torch.nextafter(mids, torch.tensor(float("inf"))), special])
    random_bits = torch.randint(-2**31, 2**31 - 1, (4096,), generator=_gen(1), dtype=torch.int32).view(torch.float32)
    return torch.cat([probe, -probe, random_bits])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_encode_is_bit_exact(fmt, saturate):
    v = _encode_probe(fmt)
    q = torch.empty(v.shape, dtype=torch.uint8, device=DEVICE)
    grid = (triton.cdiv(v.numel(), 1024),)
    _encode_probe_kernel[grid](v.to(DEVICE), q, v.numel(), fmt == "e5m2", saturate, BLOCK=1024)
    assert torch.equal(q.cpu(), bits(ref.fp8_encode(v, fmt, saturate)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_is_bit_exact(fmt):
    # Every code, NaN payloads and -0.0 included, exactly as torch's float8 -> float32.
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    v = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _decode_probe_kernel[(1,)](codes, v, 256, fmt == "e5m2", BLOCK=256)
    assert torch.equal(bits(v), bits(all_codes(fmt).float()))


# ============================================================================ quantize
def _policy_cases(fmt):
    """value -> (saturating result, non-saturating result), as docs/ops.md states the policy."""
    inf, nan = float("inf"), float("nan")
    m, sub = FMAX[fmt], MIN_SUBNORMAL[fmt]
    cases = {0.0: (0.0, 0.0), m: (m, m), inf: (m, inf if fmt == "e5m2" else nan), nan: (nan, nan),
             sub: (sub, sub), sub / 2: (0.0, 0.0), sub * 1.5: (2 * sub, 2 * sub), sub * 0.49: (0.0, 0.0)}
    if fmt == "e4m3":
        cases.update({448.5: (448.0, 448.0), 464.0: (448.0, 448.0), 464.01: (448.0, nan), 1e30: (448.0, nan)})
    else:
        cases.update({61439.0: (57344.0, 57344.0), 61440.0: (57344.0, inf), 1e30: (57344.0, inf)})
    return cases


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saturate", [True, False])
def test_boundary_values_follow_the_saturation_policy(fmt, saturate):
    cases = _policy_cases(fmt)
    values = torch.tensor(list(cases), dtype=torch.float32)
    want = torch.tensor([v[0 if saturate else 1] for v in cases.values()], dtype=torch.float32)
    x, want = torch.cat([values, -values]), torch.cat([want, -want])
    got = tk.fp8_quantize_static(x.to(DEVICE), torch.ones((), device=DEVICE), fmt, saturate)
    assert got.dtype == FORMATS[fmt]
    got = got.cpu().float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    same = torch.isnan(want) | ((got == want) & (torch.signbit(got) == torch.signbit(want)))
    assert same.all(), (x[~same], got[~same], want[~same])
    assert torch.equal(bits(tk.fp8_quantize_static(x.to(DEVICE), torch.ones((), device=DEVICE), fmt, saturate)),
                       bits(ref.fp8_quantize_static(x, torch.ones(()), fmt, saturate)))


# Under the interpreter every program costs milliseconds: the 128x128 blocks across a row
# boundary (130 rows) are one case below, the grid here stays small.
GRANULARITY_SHAPES = [("tensor", (3, 300)), ("row", (2, 3, 17)), ("row", (5,)), ("block1x128", (3, 300)),
                      ("block1x128", (2, 2, 128)), ("block128x128", (5, 257)), ("block128x128", (1, 5))]


@pytest.mark.parametrize("granularity,shape", GRANULARITY_SHAPES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("fmt,saturate", [("e4m3", True), ("e5m2", False)])
def test_quantize_dynamic_bit_exact(granularity, shape, dtype, fmt, saturate):
    x = randn(*shape, dtype=dtype, scale=3.0, seed=len(shape)).cpu()
    if x.dim() >= 2:
        x.reshape(-1, x.shape[-1])[0].zero_()  # an all-zero row/block: scale 1, q 0
    if x.numel() > 8:
        x.view(-1)[3], x.view(-1)[5], x.view(-1)[7] = float("inf"), float("nan"), -float("inf")
    q, scale = tk.fp8_quantize_dynamic(x.to(DEVICE), fmt, granularity, saturate)
    q_ref, scale_ref = ref.fp8_quantize_dynamic(x, fmt, granularity, saturate)
    assert q.dtype == FORMATS[fmt] and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == scale_ref.shape
    assert torch.equal(bits(scale), bits(scale_ref))
    assert torch.equal(bits(q), bits(q_ref))


def test_quantize_dynamic_block128x128_across_row_blocks():
    # Partial row and column blocks; an inf and a NaN in the second row block.
    x = randn(130, 150, scale=30.0, seed=3).cpu()
    x[0:128, 0:128] *= 100  # blocks with very different scales side by side
    x[129, 3], x[128, 140] = float("inf"), float("nan")
    q, scale = tk.fp8_quantize_dynamic(x.to(DEVICE), "e4m3", "block128x128", False)
    q_ref, scale_ref = ref.fp8_quantize_dynamic(x, "e4m3", "block128x128", False)
    assert scale.shape == (2, 2) and torch.equal(bits(scale), bits(scale_ref))
    assert torch.equal(bits(q), bits(q_ref))


def test_quantize_dynamic_tiny_groups_give_finite_scales():
    # amax 1e-39 / 448 is subnormal and 1e-45 / 448 underflows to 0 (scale 1.0): both as the
    # reference, so the division must keep subnormals and the 0-test must follow it.
    x = torch.tensor([[1e-39] * 3 + [0.0], [1e-45] * 4])
    for granularity in ("row", "tensor", "block1x128"):
        q, s = tk.fp8_quantize_dynamic(x.to(DEVICE), "e4m3", granularity)
        q_ref, s_ref = ref.fp8_quantize_dynamic(x, "e4m3", granularity)
        assert torch.equal(bits(s), bits(s_ref)) and torch.equal(bits(q), bits(q_ref))
        assert torch.isfinite(s.cpu()).all() and (s.cpu() > 0).all()


@pytest.mark.parametrize("scale_kind", ["0-d", "[1]", "per-row", "per-row-strided", "per-block"])
@pytest.mark.parametrize("fmt,saturate", [("e4m3", False), ("e5m2", True)])
def test_quantize_static_bit_exact(scale_kind, fmt, saturate):
    x = randn(2, 3, 300, scale=500.0, seed=2)
    scale = {"0-d": torch.tensor(0.5), "[1]": torch.tensor([2.0]),
             "per-row": torch.rand(2, 3, generator=_gen(3)) + 0.01,
             "per-row-strided": (torch.rand(2, 3, 2, generator=_gen(3)) + 0.01)[..., 0],
             "per-block": torch.rand(2, 3, 3, generator=_gen(4)) + 0.01}[scale_kind].to(DEVICE)
    q = tk.fp8_quantize_static(x, scale, fmt, saturate)
    assert torch.equal(bits(q), bits(ref.fp8_quantize_static(x.cpu(), scale.cpu(), fmt, saturate)))


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("granularity", ["row", "block1x128", "block128x128"])
def test_quantize_non_contiguous(layout, granularity):
    x = randn(10, 300, scale=5.0, seed=5)
    q, s = tk.fp8_quantize_dynamic(strided(x, layout), "e4m3", granularity)
    q_ref, s_ref = ref.fp8_quantize_dynamic(x.cpu(), "e4m3", granularity)
    assert torch.equal(bits(q), bits(q_ref)) and torch.equal(bits(s), bits(s_ref))


def _each_config(kernel, monkeypatch):
    """Each autotune config with the autotuner pinned to it."""
    for cfg in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [cfg])
        yield cfg


def test_quantize_every_config(monkeypatch):
    # A row longer than the widest step (so no config is pruned) with a partial last step,
    # and 128-column groups (which a pinned wide config runs with most lanes masked).
    row = randn(1, 4100, scale=2.0, seed=6)
    row[0, 5] = float("inf")
    blocks = randn(2, 300, scale=2.0, seed=7)
    for cfg in _each_config(tk._fp8_quantize_kernel, monkeypatch):
        for x, granularity in ((row, "row"), (blocks, "block1x128")):
            q, s = tk.fp8_quantize_dynamic(x, "e5m2", granularity)
            q_ref, s_ref = ref.fp8_quantize_dynamic(x.cpu(), "e5m2", granularity)
            assert torch.equal(bits(q), bits(q_ref)) and torch.equal(bits(s), bits(s_ref)), cfg


# ============================================================================ GEMMs
def _expected(a, b, sa, sb, bias):
    """float64 result and sum of |terms| (tests/test_fp8.py)."""
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


def _assert_within_fp32_bound(out, a, b, sa, sb, bias, out_dtype):
    assert out.dtype == out_dtype and out.shape == (a.shape[0], b.shape[0])
    exact, magnitude = _expected(a, b, sa, sb, bias)
    K = a.shape[1]
    bound = (K + 4) * EPS32 * magnitude + torch.finfo(out_dtype).eps * exact.abs() + torch.finfo(out_dtype).tiny
    err = (out.cpu().double() - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def _scales(kind, M, N, K, seed):
    g = _gen(seed)
    kb = (K + 127) // 128
    if kind == "row-col":
        sa, sb = torch.rand(M, generator=g) * 0.1 + 1e-3, torch.rand(N, generator=g) * 0.1 + 1e-3
    elif kind == "scalar":
        sa, sb = torch.tensor(0.03), torch.tensor([0.02])
    else:
        sa, sb = torch.rand(M, kb, generator=g) * 0.1 + 1e-3, torch.rand((N + 127) // 128, kb, generator=g) * 0.1 + 1e-3
    return sa.to(DEVICE), sb.to(DEVICE)


PAIRS = [("e4m3", "e4m3"), ("e5m2", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e5m2")]
OUT_DTYPES = [None, torch.float32, torch.float16, torch.bfloat16]


@needs_fp8_dot
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(7, 33), (130, 150)])
@pytest.mark.parametrize("fmts", PAIRS)
@pytest.mark.parametrize("scales", ["row-col", "scalar", "block"])
def test_fp8_scaled_mm(M, N, K, fmts, scales):
    a, b = rand_fp8(fmts[0], M, K, seed=M), rand_fp8(fmts[1], N, K, seed=N)
    sa, sb = _scales(scales, M, N, K, seed=M + N)
    # Each out dtype and bias/no bias across the grid without multiplying it.
    out_dtype = OUT_DTYPES[(M + N + len(scales)) % 4]
    bias = randn(N, dtype=FLOATS[M % 3], seed=7) if (M + len(scales)) % 2 else None
    out = tk.fp8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    _assert_within_fp32_bound(out, a, b, sa, sb, bias, out_dtype or torch.float32)


@needs_fp8_dot
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_fp8_scaled_mm_out_and_bias_dtypes(out_dtype, bias_dtype):
    M, N, K = 3, 33, 200
    a, b = rand_fp8("e4m3", M, K, seed=8), rand_fp8("e5m2", N, K, seed=9)
    sa, sb = _scales("block", M, N, K, seed=10)
    bias = None if bias_dtype is None else randn(N, dtype=bias_dtype, scale=10.0, seed=11)
    out = tk.fp8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    _assert_within_fp32_bound(out, a, b, sa, sb, bias, out_dtype or torch.float32)


@needs_fp8_dot
@pytest.mark.parametrize("la,lb", [("transposed", "sliced"), ("sliced", "transposed")])
@pytest.mark.parametrize("scales", ["row-col", "block"])
def test_fp8_scaled_mm_non_contiguous(la, lb, scales):
    M, N, K = 17, 33, 150
    a, b = rand_fp8("e4m3", M, K, seed=12), rand_fp8("e5m2", N, K, seed=13)
    sa, sb = _scales(scales, M, N, K, seed=14)
    if scales == "row-col":  # strided vectors too
        sa, sb = torch.stack([sa, sa]).T[:, 0], torch.stack([sb, sb]).T[:, 1]
    else:
        sa, sb = sa.T.contiguous().T, sb.T.contiguous().T
    bias = randn(2 * N, scale=3.0, seed=15)[::2]
    out = tk.fp8_scaled_mm(strided(a, la), strided(b, lb), sa, sb, bias, torch.bfloat16)
    assert torch.equal(bits(out), bits(tk.fp8_scaled_mm(a, b, sa.contiguous(), sb.contiguous(), bias.contiguous(),
                                                        torch.bfloat16)))
    _assert_within_fp32_bound(out, a, b, sa, sb, bias, torch.bfloat16)


@needs_fp8_dot
@pytest.mark.parametrize("scales", ["row-col", "block"])
def test_fp8_scaled_mm_every_config(scales, monkeypatch):
    # Ragged in every dimension for every tile: M and N end in partial tiles, K (padded to
    # 272) in a partial BLOCK_K step and in a partial 128-block of scales.
    M, N, K = 33, 130, 270
    a, b = rand_fp8("e4m3", M, K, seed=16), rand_fp8("e4m3", N, K, seed=17)
    sa, sb = _scales(scales, M, N, K, seed=18)
    bias = randn(N, seed=19)
    for cfg in _each_config(tk._fp8_scaled_mm_kernel, monkeypatch):
        out = tk.fp8_scaled_mm(a, b, sa, sb, bias, torch.float16)
        _assert_within_fp32_bound(out, a, b, sa, sb, bias, torch.float16)


def _weight_scale(kind, N, K, seed):
    g = _gen(seed)
    return {"row": torch.rand(N, generator=g) * 0.1 + 1e-3, "scalar": torch.tensor([0.05]),
            "block": torch.rand((N + 127) // 128, (K + 127) // 128, generator=g) * 0.1 + 1e-3}[kind].to(DEVICE)


def _assert_weight_only_close(out, x, w, scale, bias):
    M, K = x.shape
    if scale.dim() == 2:
        _assert_within_fp32_bound(out, x, w, torch.ones(M, scale.shape[1]), scale, bias, x.dtype)
    else:
        _assert_within_fp32_bound(out, x, w, torch.ones(()), scale, bias, x.dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M,N,K", [(1, 130, 150), (3, 7, 33), (17, 33, 150)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale_kind", ["row", "scalar", "block"])
def test_fp8_weight_only_mm(dtype, M, N, K, fmt, scale_kind):
    x = randn(M, K, dtype=dtype, seed=M + K)
    w = rand_fp8(fmt, N, K, scale=8.0, seed=N)
    scale = _weight_scale(scale_kind, N, K, seed=20)
    bias = randn(N, dtype=dtype, seed=21) if (M + len(scale_kind)) % 2 else None
    _assert_weight_only_close(tk.fp8_weight_only_mm(x, w, scale, bias), x, w, scale, bias)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("lx,lw", [("transposed", "sliced"), ("sliced", "transposed")])
def test_fp8_weight_only_mm_non_contiguous(dtype, lx, lw):
    x, w = randn(17, 150, dtype=dtype, seed=22), rand_fp8("e5m2", 33, 150, seed=23)
    scale = (torch.rand(66, generator=_gen(24)) * 0.01).to(DEVICE)[::2]
    bias = randn(33, dtype=torch.bfloat16, seed=25)
    out = tk.fp8_weight_only_mm(strided(x, lx), strided(w, lw), scale, bias)
    _assert_weight_only_close(out, x, w, scale, bias)
    assert torch.equal(bits(out), bits(tk.fp8_weight_only_mm(x, w, scale.contiguous(), bias)))


def test_fp8_weight_only_mm_nan_and_inf_weights_propagate():
    w = torch.tensor([[1.0, float("nan")], [1.0, 2.0], [float("inf"), 1.0]]).to(torch.float8_e5m2).to(DEVICE)
    out = tk.fp8_weight_only_mm(torch.ones(1, 2, device=DEVICE), w, torch.ones((), device=DEVICE)).cpu()
    assert torch.isnan(out[0, 0]) and out[0, 1] == 3.0 and out[0, 2] == float("inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("scale_kind", ["row", "block"])
def test_fp8_weight_only_mm_every_config(dtype, scale_kind, monkeypatch):
    M, N, K = 17, 130, 150
    x, w = randn(M, K, dtype=dtype, seed=26), rand_fp8("e4m3", N, K, seed=27)
    scale = _weight_scale(scale_kind, N, K, seed=28)
    bias = randn(N, seed=29)
    kernel = tk._fp8_weight_only_mm_fp32 if dtype == torch.float32 else tk._fp8_weight_only_mm_tc
    for cfg in _each_config(kernel, monkeypatch):
        _assert_weight_only_close(tk.fp8_weight_only_mm(x, w, scale, bias), x, w, scale, bias)


# ============================================================================ boundary
def test_kernels_cover_every_fp8_op():
    from lowbit import _ops

    assert set(tk.KERNELS) == {op for op in _ops.op_names() if op.startswith("fp8_")}
    for op, fn in tk.KERNELS.items():
        assert fn.__name__ == op


def test_refused_aot_targets_are_below_the_ops_min_capability():
    """An AOT entry that a target must refuse (fp8 dot on sm_80) belongs to an op that
    kernel_for never returns on that target, and the ops that need no more than sm_80 compile
    there (no entry of theirs is refused)."""
    from lowbit.backends import triton as triton_backend
    from lowbit.backends.triton import aot

    refused_ops = set()
    for entry in aot.AOT_KERNELS:
        op = entry.name.split("[")[0]
        need = triton_backend.MIN_CAPABILITY.get(op, (8, 0))
        for target in entry.refused:
            assert need > divmod(target, 10), (entry.name, target, need)
            refused_ops.add(op)
    assert refused_ops == {"fp8_scaled_mm"}
    for op in tk.KERNELS:
        entries = [e for e in aot.AOT_KERNELS if e.name.split("[")[0] == op or
                   (op.startswith("fp8_quantize") and e.name.startswith("fp8_quantize["))]
        assert entries, op
        if op not in tk.MIN_CAPABILITY:
            assert all(80 in e.targets and 80 not in e.refused for e in entries), op


def test_kernel_for_keeps_the_fp8_dot_off_sm_80(monkeypatch):
    from lowbit.backends import triton as triton_backend

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert triton_backend.kernel_for("fp8_scaled_mm", dev) is None
    for op in ("fp8_quantize_dynamic", "fp8_quantize_static", "fp8_weight_only_mm"):
        assert triton_backend.kernel_for(op, dev) is tk.KERNELS[op]
    for cap in ((8, 9), (9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert triton_backend.kernel_for("fp8_scaled_mm", dev) is tk.fp8_scaled_mm


def _e4(*shape):
    return torch.zeros(shape, device=DEVICE).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("call", [
    lambda: tk.fp8_scaled_mm(_e4(2, 3), _e4(4, 5), torch.ones(2), torch.ones(4)),
    lambda: tk.fp8_scaled_mm(_e4(2, 3), _e4(4, 3), torch.ones(2, 1), torch.ones(4)),
    lambda: tk.fp8_scaled_mm(_e4(2, 3), torch.zeros(4, 3, dtype=torch.int8), torch.ones(2), torch.ones(4)),
    lambda: tk.fp8_weight_only_mm(torch.ones(2, 3), _e4(4, 3), torch.ones(5)),
    lambda: tk.fp8_quantize_static(torch.ones(2, 3), torch.ones(3)),
    lambda: tk.fp8_quantize_dynamic(torch.ones(2, 3), "e3m4"),
    lambda: tk.fp8_quantize_dynamic(torch.ones(2, 2, 3), "e4m3", "block128x128"),
])
def test_bad_inputs_raise_before_launch(call):
    with pytest.raises(_checks.LowbitArgumentError):
        call()
