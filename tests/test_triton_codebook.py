"""Triton codebook_mm / codebook_dequant against the spec (lowbit.backends.reference.codebook).

On a machine without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported
and the kernels run in the interpreter on CPU tensors; with a GPU they run natively. The host
functions are called directly (no backend routing), with small shapes.

Bound: the kernel decodes each weight as the spec does (the C entries summed in fp32 in order),
so before the dot its unscaled weights equal the spec's; with fp16/bf16 x the tensor-core operand
is x's dtype, which rounds each weight once (relative error <= eps_x / 2); the scale multiplies
the row's sum once. Against the exact (float64) product of x and the spec's weight the error is
at most (K + 4) * eps32 * sum|x||w| + eps_x / 2 * sum|x||w| + eps_out * |exact| + tiny_out.
codebook_dequant is bit-exact. A bit-stream, group-index or codebook-index bug is far outside.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from lowbit.backends.reference import codebook as ref  # noqa: E402
from lowbit.backends.triton import codebook as tk  # noqa: E402
from lowbit.formats import codebook as fmt  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
EPS32 = torch.finfo(torch.float32).eps


def make_weight(N, K, d, C, bits, R=1, G=1, scale=True, cb_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (N, K // d, C), generator=g)
    cb = torch.randn(R, G, C, 2**bits, d, generator=g).to(cb_dtype)
    s = (torch.rand(N, generator=g) + 0.5) if scale else None
    w = fmt.from_codes(codes, cb, s)
    return w.packed.to(DEVICE), w.codebooks.to(DEVICE), None if s is None else w.scale.to(DEVICE)


def run(x, codes, cb, scale, bias=None):
    out = tk.codebook_mm(x, codes, cb, scale, bias)
    M, K = x.shape
    assert out.dtype == x.dtype and out.shape == (M, codes.shape[0])
    w = ref.codebook_dequant(codes, cb, scale, K).double()
    x64 = x.double()
    exact = x64 @ w.T
    mag = x64.abs() @ w.abs().T
    bias_mag = 0.0
    if bias is not None:
        exact = exact + bias.double()
        bias_mag = bias.double().abs()
    out_info = torch.finfo(out.dtype)
    weight_rounding = 0.0 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps / 2
    bound = (K + 4) * EPS32 * (mag + bias_mag) + weight_rounding * mag + out_info.eps * exact.abs() + out_info.tiny
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()} (max err {err.max().item()})"
    return out


# (d, C, bits, R, G): scalar, grouped, PQ, RQ/AQ, 16-bit codes, odd widths that straddle bytes.
LAYOUTS = [(1, 1, 4, 1, 1), (1, 1, 3, 3, 2), (2, 1, 5, 1, 4), (4, 1, 8, 1, 2), (8, 2, 8, 1, 1), (4, 3, 11, 1, 1),
           (8, 1, 16, 1, 1)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "d{}C{}b{}R{}G{}".format(*v))
@pytest.mark.parametrize("M,N,K", [(1, 33, 64), (17, 9, 136)])
def test_codebook_mm(layout, M, N, K):
    d, C, bits, R, G = layout
    if K % d or (K // d) % G or N % R:
        pytest.skip("shape not divisible for this layout")
    codes, cb, scale = make_weight(N, K, d, C, bits, R, G, seed=M + N)
    x = torch.randn(M, K).to(DEVICE)
    run(x, codes, cb, scale)
    dq = tk.codebook_dequant(codes, cb, scale, K)
    assert torch.equal(dq, ref.codebook_dequant(codes, cb, scale, K))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("cb_dtype", FLOATS)
@pytest.mark.parametrize("bias", [False, True])
def test_codebook_mm_dtypes_and_bias(dtype, cb_dtype, bias):
    codes, cb, scale = make_weight(24, 96, 4, 2, 6, cb_dtype=cb_dtype, seed=3)
    x = torch.randn(5, 96).to(dtype).to(DEVICE)
    b = torch.randn(24).to(dtype).to(DEVICE) if bias else None
    run(x, codes, cb, scale, b)


@pytest.mark.parametrize("out_dtype", FLOATS)
def test_codebook_dequant_out_dtype(out_dtype):
    codes, cb, scale = make_weight(7, 48, 2, 1, 4, seed=5)
    got = tk.codebook_dequant(codes, cb, scale, 48, out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, ref.codebook_dequant(codes, cb, scale, 48).to(out_dtype))


def test_bad_inputs_name_the_argument():
    codes, cb, scale = make_weight(6, 32, 4, 1, 4)
    x = torch.randn(2, 32).to(DEVICE)
    with pytest.raises(ValueError, match=r"lowbit\.codebook_mm: codebooks\b"):
        tk.codebook_mm(x, codes, cb[:, :, :, :15], scale)
    with pytest.raises(ValueError, match=r"lowbit\.codebook_mm: codes\b"):
        tk.codebook_mm(x, codes[:, :-1], cb, scale)
