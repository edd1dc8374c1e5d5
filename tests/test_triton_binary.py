"""Triton binary kernels against the reference (lowbit.backends.reference.binary).

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run in the interpreter on
CPU tensors (the SWAR popcount); with a GPU they run natively (libdevice popc). The host functions
are called directly, with small shapes. Integer results and packed bits are exact;
binary_scaled_mm is bit-exact in the interpreter (same fp32 operations, same order) and gets one
fp32 rounding of slack on a GPU, whose compiler may fuse the bias add into an FMA.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from lowbit.backends.reference import binary as ref  # noqa: E402
from lowbit.backends.triton import binary as tk  # noqa: E402
from lowbit.formats import binary as fmt  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"


def words(rows, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (rows, fmt.num_words(K)), generator=g, dtype=torch.int64).to(
        torch.int32).to(DEVICE)


@pytest.mark.parametrize("M", [1, 17, 128])
@pytest.mark.parametrize("K", [1, 63, 64, 65, 1000, 4096])
def test_binary_mm_exact(M, K):
    a, b = words(M, K, seed=M), words(9, K, seed=K)
    out = tk.binary_mm(a, b, K)
    expected = fmt.unpack(a.cpu(), K, torch.float64) @ fmt.unpack(b.cpu(), K, torch.float64).T
    assert out.dtype == torch.int32 and torch.equal(out.cpu().double(), expected)


def test_binary_mm_strided_operands():
    a = words(33, 200).T.contiguous().T
    b = torch.cat([words(5, 200, seed=1)] * 2, dim=1)[:, ::2]
    assert torch.equal(tk.binary_mm(a, b, 200).cpu(), ref.binary_mm(a.cpu().contiguous(), b.cpu().contiguous(), 200))


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.float16])
@pytest.mark.parametrize("scalar_a", [False, True])
def test_binary_scaled_mm(out_dtype, bias_dtype, scalar_a):
    M, N, K = 17, 33, 100
    a, b = words(M, K), words(N, K, seed=1)
    sa = torch.rand(1 if scalar_a else M, device=DEVICE) + 0.01
    sb = torch.rand(N, device=DEVICE) + 0.01
    bias = None if bias_dtype is None else torch.randn(N, device=DEVICE).to(bias_dtype)
    out = tk.binary_scaled_mm(a, b, K, sa, sb, bias, out_dtype)
    expected = ref.binary_scaled_mm(a.cpu(), b.cpu(), K, sa.cpu(), sb.cpu(),
                                    None if bias is None else bias.cpu(), out_dtype)
    assert out.dtype == expected.dtype
    if INTERPRET:
        assert torch.equal(out, expected)
    else:
        e = expected.float()
        slack = (torch.finfo(torch.float32).eps + torch.finfo(out.dtype).eps) * e.abs()
        assert ((out.cpu().float() - e).abs() <= slack).all()


@pytest.mark.parametrize("M,K", [(1, 1), (3, 31), (5, 65), (2, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_binary_quantize(M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    x[0, 0] = 0.0
    if K > 1:
        x[0, 1] = -0.0
    packed, scale = tk.binary_quantize(x.to(DEVICE))
    ref_packed, ref_scale = ref.binary_quantize(x)
    assert torch.equal(packed.cpu(), ref_packed)
    bound = (K + 1) * torch.finfo(torch.float32).eps * ref_scale
    assert ((scale.cpu() - ref_scale).abs() <= bound).all()


def test_bad_input_names_the_argument():
    a = words(2, 100)
    with pytest.raises(ValueError, match=r"lowbit.binary_mm: b must have shape \[N, ceil\(K/32\)\]"):
        tk.binary_mm(a, a[:, :3], 100)
