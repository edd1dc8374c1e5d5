"""Triton INT8 kernels against the reference (lowbit.backends.reference.int8).

On a machine without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported, and the kernels run in the interpreter on CPU tensors; with a GPU they run natively
on CUDA tensors. The host functions are called directly (no backend routing), with small
shapes: the interpreter runs numpy per program instance.

Exactness: integer results and quantization are bit-exact. scaled_mm is bit-exact in the
interpreter (same fp32 operations in the same order as the reference); on a GPU the bias add
may be fused into an FMA, so there it gets one fp32 rounding of slack. Float GEMMs get the
fp32 accumulation bound K * eps * sum|x||w| plus one unit of the output dtype.
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
from lowbit.backends.reference import int8 as ref  # noqa: E402
from lowbit.backends.triton import int8 as tk  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps

MS = (1, 2, 17, 33)
NKS = ((7, 33), (33, 65), (65, 7), (16, 64))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randint8(*shape, seed=0):
    return torch.randint(-128, 128, shape, generator=_gen(seed), dtype=torch.int8).to(DEVICE)


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype).to(DEVICE)


def strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t through a non-contiguous view."""
    if kind == "contiguous":
        return t
    if kind == "transposed":  # K-major storage seen as [rows, K]: stride (1, rows)
        return t.T.contiguous().T
    if kind == "sliced":  # every other column of a wider tensor: stride (2K, 2)
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    raise ValueError(kind)


LAYOUTS = ("contiguous", "transposed", "sliced")


# ============================================================================ quantize
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 7), (2, 33), (17, 65), (33, 1024), (2, 3, 65), (65,)])
@pytest.mark.parametrize("per_row", [True, False])
def test_quantize_dynamic_bit_exact(dtype, shape, per_row):
    x = randn(*shape, dtype=dtype, scale=3.0)
    if len(shape) >= 2 and shape[-2] > 1:
        x.view(-1, shape[-1])[1] = 0  # an all-zero row: scale 1.0, q 0
    q, s = tk.int8_quantize_dynamic(x, per_row)
    q_ref, s_ref = ref.int8_quantize_dynamic(x, per_row)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_quantize_dynamic_non_contiguous(layout):
    x = strided(randn(17, 65, scale=5.0), layout)
    q, s = tk.int8_quantize_dynamic(x)
    q_ref, s_ref = ref.int8_quantize_dynamic(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale_kind", ["0-d", "[1]", "per-row", "per-row-strided"])
@pytest.mark.parametrize("shape", [(1, 7), (17, 65), (2, 3, 33)])
def test_quantize_static_bit_exact(dtype, scale_kind, shape):
    x = randn(*shape, dtype=dtype, scale=4.0, seed=1)
    rows = shape[:-1]
    if scale_kind == "0-d":
        scale = torch.tensor(0.037, device=DEVICE)
    elif scale_kind == "[1]":
        scale = torch.tensor([0.011], device=DEVICE)
    elif scale_kind == "per-row":
        scale = (torch.rand(rows, generator=_gen(2)) * 0.05 + 0.001).to(DEVICE)
    else:
        scale = (torch.rand(rows + (2,), generator=_gen(2)) * 0.05 + 0.001).to(DEVICE)[..., 0]
    q = tk.int8_quantize_static(x, scale)
    assert torch.equal(q, ref.int8_quantize_static(x, scale))


def test_quantize_rounds_half_to_even_and_clamps():
    # With scale 1 each value is its own quotient: exact ties must go to the even neighbour,
    # and everything beyond +-127 (including the +-127.5 ties and infinities) clamps.
    vals = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, 126.5, -126.5, 127.5, -127.5, 300.0, -1e30,
            float("inf"), float("-inf"), 0.49999997, 2.5000002, -0.0]
    x = torch.tensor([vals], device=DEVICE)
    q = tk.int8_quantize_static(x, torch.tensor(1.0, device=DEVICE))
    expected = [0, 2, 2, 0, -2, -2, 126, 126, -126, 127, -127, 127, -127, 127, -127, 0, 3, 0]
    assert q.cpu().tolist() == [expected]
    assert torch.equal(q, ref.int8_quantize_static(x, torch.tensor(1.0, device=DEVICE)))


def test_quantize_division_is_ieee():
    # Quotients one ulp either side of a tie: an approximate division flips these.
    scale = torch.tensor(0.1, device=DEVICE)
    k = torch.arange(-127, 127, dtype=torch.float32, device=DEVICE) + 0.5
    x = (k * scale).reshape(1, -1)
    x = torch.cat([x, torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)])
    assert torch.equal(tk.int8_quantize_static(x, scale), ref.int8_quantize_static(x, scale))


# ============================================================================ int8_mm
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K", NKS)
def test_int8_mm_exact(M, N, K):
    a, b = randint8(M, K, seed=M), randint8(N, K, seed=N + K)
    c = tk.int8_mm(a, b)
    assert c.dtype == torch.int32 and c.shape == (M, N)
    assert torch.equal(c, ref.int8_mm(a, b))


@pytest.mark.parametrize("la", LAYOUTS)
@pytest.mark.parametrize("lb", LAYOUTS)
def test_int8_mm_non_contiguous(la, lb):
    a, b = randint8(17, 65, seed=3), randint8(33, 65, seed=4)
    assert torch.equal(tk.int8_mm(strided(a, la), strided(b, lb)), ref.int8_mm(a, b))


def test_int8_mm_worst_case_magnitude():
    # Every product is (-128)^2: the largest sums int32 must hold, with K spread over many
    # BLOCK_K steps.
    M, N, K = 17, 33, 1024
    a = torch.full((M, K), -128, dtype=torch.int8, device=DEVICE)
    b = torch.full((N, K), -128, dtype=torch.int8, device=DEVICE)
    c = tk.int8_mm(a, b)
    assert torch.equal(c, torch.full((M, N), K * 128 * 128, dtype=torch.int32, device=DEVICE))
    b[:, ::2] = 127  # mixed signs: -128*127 and 128*128 alternate
    assert torch.equal(tk.int8_mm(a, b), ref.int8_mm(a, b))


def _each_config(kernel, monkeypatch):
    """Yield each autotune config with the autotuner pinned to it (a one-config autotuner
    launches that config directly, on the GPU as in the interpreter)."""
    for cfg in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [cfg])
        yield cfg


def test_int8_mm_every_config(monkeypatch):
    # Ragged in every dimension for every tile size: M and N span several tiles and end in a
    # partial one, K (padded to 160) ends in a partial BLOCK_K step.
    M, N, K = 33, 130, 150
    a, b = randint8(M, K, seed=5), randint8(N, K, seed=6)
    expected = ref.int8_mm(a, b)
    for cfg in _each_config(tk._int8_mm_kernel, monkeypatch):
        assert torch.equal(tk.int8_mm(a, b), expected), cfg


# ============================================================================ int8_scaled_mm
def _assert_epilogue_close(out, expected, bound_terms):
    """Bit-exact in the interpreter; on a GPU one fp32 rounding (FMA) plus one output unit."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if INTERPRET:
        assert torch.equal(out, expected)
        return
    eps_out = torch.finfo(out.dtype).eps
    err = (out.float() - expected.float()).abs()
    bound = eps_out * expected.float().abs() + 2 * EPS32 * bound_terms
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def _scale(kind, n, seed):
    if kind == "vector":
        return (torch.rand(n, generator=_gen(seed)) * 0.02 + 1e-4).to(DEVICE)
    if kind == "0-d":
        return torch.tensor(0.013, device=DEVICE)
    return torch.tensor([0.007], device=DEVICE)


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sa_kind,sb_kind", [("vector", "vector"), ("0-d", "vector"), ("vector", "[1]"),
                                             ("[1]", "0-d")])
@pytest.mark.parametrize("M", (1, 17))
def test_int8_scaled_mm(out_dtype, bias_dtype, sa_kind, sb_kind, M):
    N, K = 33, 65
    a, b = randint8(M, K, seed=7), randint8(N, K, seed=8)
    sa, sb = _scale(sa_kind, M, 9), _scale(sb_kind, N, 10)
    bias = None if bias_dtype is None else randn(N, dtype=bias_dtype, scale=10.0, seed=11)
    out = tk.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    expected = ref.int8_scaled_mm(a, b, sa, sb, bias, out_dtype)
    terms = ref.int8_scaled_mm(a, b, sa, sb).abs() + (0 if bias is None else bias.float().abs())
    _assert_epilogue_close(out, expected, terms)


@pytest.mark.parametrize("la,lb", [("transposed", "sliced"), ("sliced", "transposed")])
def test_int8_scaled_mm_non_contiguous(la, lb):
    a, b = randint8(17, 65, seed=12), randint8(33, 65, seed=13)
    sa, sb = _scale("vector", 34, 14)[::2], _scale("vector", 66, 15)[::2]  # strided vectors
    bias = randn(66, scale=3.0, seed=16)[::2]
    out = tk.int8_scaled_mm(strided(a, la), strided(b, lb), sa, sb, bias, torch.bfloat16)
    expected = ref.int8_scaled_mm(a, b, sa, sb, bias, torch.bfloat16)
    _assert_epilogue_close(out, expected, ref.int8_scaled_mm(a, b, sa, sb).abs() + bias.abs())


def test_int8_scaled_mm_every_config(monkeypatch):
    M, N, K = 33, 130, 150
    a, b = randint8(M, K, seed=17), randint8(N, K, seed=18)
    sa, sb = _scale("vector", M, 19), _scale("vector", N, 20)
    bias = randn(N, scale=3.0, seed=21)
    expected = ref.int8_scaled_mm(a, b, sa, sb, bias, torch.float16)
    terms = ref.int8_scaled_mm(a, b, sa, sb).abs() + bias.abs()
    for cfg in _each_config(tk._int8_scaled_mm_kernel, monkeypatch):
        _assert_epilogue_close(tk.int8_scaled_mm(a, b, sa, sb, bias, torch.float16), expected, terms)


# ============================================================================ weight-only
def _assert_fp32_accumulation_close(out, x, w, scale, bias):
    expected = ref.int8_weight_only_mm(x, w, scale, bias)
    assert out.dtype == expected.dtype == x.dtype and out.shape == expected.shape
    K = x.shape[1]
    # Deterministic bound for K-term fp32 sums in any order, then one unit of the output.
    mag = (x.float().abs() @ w.float().abs().T) * scale.float().abs()
    bound = torch.finfo(out.dtype).eps * expected.float().abs() + K * EPS32 * mag
    if bias is not None:
        bound = bound + EPS32 * bias.float().abs()
    err = (out.float() - expected.float()).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("N,K", NKS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_weight_only_mm(dtype, M, N, K, with_bias):
    x = randn(M, K, dtype=dtype, seed=22)
    w = randint8(N, K, seed=23)
    scale = (torch.rand(N, generator=_gen(24)) * 0.01 + 1e-3).to(dtype).to(DEVICE)
    bias = randn(N, dtype=dtype, seed=25) if with_bias else None
    _assert_fp32_accumulation_close(tk.int8_weight_only_mm(x, w, scale, bias), x, w, scale, bias)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("lx,lw", [("transposed", "sliced"), ("sliced", "transposed")])
def test_int8_weight_only_mm_non_contiguous(dtype, lx, lw):
    x, w = randn(17, 65, dtype=dtype, seed=26), randint8(33, 65, seed=27)
    scale = (torch.rand(66, generator=_gen(28)) * 0.01).to(DEVICE)[::2]  # fp32 scale, strided
    bias = randn(33, dtype=torch.bfloat16, seed=29)
    out = tk.int8_weight_only_mm(strided(x, lx), strided(w, lw), scale, bias)
    _assert_fp32_accumulation_close(out, x, w, scale, bias)
    assert torch.equal(out, tk.int8_weight_only_mm(x, w, scale, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_weight_only_mm_every_config(dtype, monkeypatch):
    M, N, K = 33, 130, 150
    x, w = randn(M, K, dtype=dtype, seed=30), randint8(N, K, seed=31)
    scale = (torch.rand(N, generator=_gen(32)) * 0.01 + 1e-3).to(DEVICE)
    bias = randn(N, seed=33)
    kernel = tk._int8_weight_only_mm_fp32 if dtype == torch.float32 else tk._int8_weight_only_mm_tc
    for cfg in _each_config(kernel, monkeypatch):
        _assert_fp32_accumulation_close(tk.int8_weight_only_mm(x, w, scale, bias), x, w, scale, bias)


# ============================================================================ boundary
def test_kernels_cover_every_int8_op():
    from lowbit import _ops

    int8_ops = {op for op in _ops.op_names() if op.startswith("int8_")}
    assert set(tk.KERNELS) == int8_ops
    for op, fn in tk.KERNELS.items():
        assert fn.__name__ == op


@pytest.mark.parametrize("call", [
    lambda: tk.int8_mm(randint8(2, 3), randint8(4, 5)),
    lambda: tk.int8_mm(randint8(2, 3), randint8(4, 3).float()),
    lambda: tk.int8_mm(randint8(0, 3), randint8(4, 3)),
    lambda: tk.int8_scaled_mm(randint8(2, 3), randint8(4, 3), randn(3), randn(4)),
    lambda: tk.int8_weight_only_mm(randn(2, 3), randint8(4, 3), randn(5)),
    lambda: tk.int8_quantize_static(randn(2, 3), randn(3)),
    lambda: tk.int8_quantize_dynamic(randint8(2, 3)),
])
def test_bad_shapes_raise_before_launch(call):
    with pytest.raises(_checks.LowbitArgumentError):
        call()
