"""Triton sparse24 kernels against the spec (lowbit.backends.reference.sparse24).

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the kernels run in the interpreter
on CPU tensors (small shapes); with a GPU they run natively. The host functions are called
directly (no backend routing).

Bound (float): the kernel decompresses the same values the spec does; with fp16/bf16 x the
tensor-core operand is x's dtype, which rounds each value once (relative error <= eps_x / 2).
So |out - exact| <= (Kp/2 + 3) * eps32 * sum|x||w| + eps_x / 2 * sum|x||w| + eps_out * |exact|
+ tiny. int8: bit-exact (exact int32 accumulation, the same epilogue roundings).
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from lowbit.backends.reference import sparse24 as ref  # noqa: E402
from lowbit.backends.triton import sparse24 as tk  # noqa: E402
from lowbit.formats import sparse24 as fmt  # noqa: E402
from lowbit.quant.nm_prune import nm_prune  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
EPS32 = torch.finfo(torch.float32).eps


def make(N, K, values_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = fmt.from_dense(nm_prune(torch.randn(N, K, generator=g)), values_dtype=values_dtype)
    scale = None if W.scale is None else W.scale.to(DEVICE)
    return W.values.to(DEVICE), W.meta.to(DEVICE), scale


SHAPES = [(1, 8, 16), (3, 33, 37), (17, 70, 100), (5, 16, 160)]


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("x_dtype,values_dtype", [
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.int8), (torch.float16, torch.float32),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse24_mm(M, N, K, x_dtype, values_dtype, with_bias):
    values, meta, scale = make(N, K, values_dtype)
    x = torch.randn(M, K).to(x_dtype).to(DEVICE)
    bias = torch.randn(N).to(DEVICE) if with_bias else None
    out = tk.sparse24_mm(x, values, meta, scale, bias)
    assert out.dtype == x_dtype and out.shape == (M, N)
    w = fmt.decompress(values, meta, K, torch.float64)
    if scale is not None:
        w = w * scale.double().unsqueeze(1)
    xd = x.double()
    exact = xd @ w.T + (bias.double() if bias is not None else 0)
    mag = xd.abs() @ w.abs().T + (bias.double().abs() if bias is not None else 0)
    eps_x = 0.0 if x_dtype == torch.float32 else torch.finfo(x_dtype).eps / 2
    bound = ((fmt.padded_k(K) // 2 + 3) * EPS32 + eps_x) * mag + torch.finfo(x_dtype).eps * exact.abs() \
        + torch.finfo(x_dtype).tiny
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), float(err.max())


@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_sparse24_int8_scaled_mm_bit_exact(M, N, K, out_dtype):
    values, meta, scale_b = make(N, K, torch.int8)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8).to(DEVICE)
    scale_a = (torch.rand(M) + 0.1).to(DEVICE)
    bias = torch.randn(N).to(DEVICE)
    got = tk.sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias, out_dtype)
    want = ref.sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias, out_dtype)
    assert torch.equal(got, want)


def test_bad_metadata_is_refused_like_the_reference():
    values, meta, _ = make(4, 32, torch.float32)
    meta = meta.clone()
    meta[2, 1] = 0x5E  # low nibble 0xE is fine, high nibble 0x5 = (1, 1)
    with pytest.raises(ValueError, match=r"lowbit\.sparse24_mm: meta\[2, 1\]=0x5e"):
        tk.sparse24_mm(torch.randn(2, 32).to(DEVICE), values, meta)


# ============================================================================ configs
def _each_config(kernel, monkeypatch):
    """Yield each autotune config with the autotuner pinned to it (a one-config autotuner
    launches that config directly, on the GPU as in the interpreter)."""
    for cfg in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [cfg])
        yield cfg


@pytest.mark.parametrize("x_dtype,values_dtype,kernel_name", [
    (torch.float16, torch.float16, "_sparse24_mm_tc"),
    (torch.bfloat16, torch.int8, "_sparse24_mm_tc"),
    (torch.float32, torch.float32, "_sparse24_mm_fp32"),
])
def test_sparse24_mm_every_config(x_dtype, values_dtype, kernel_name, monkeypatch):
    # Ragged for every tile: M and N end in partial tiles, K = 200 pads to 208 (not a multiple
    # of any BLOCK_K), so the last step holds real, padded and out-of-range groups.
    M, N, K = 19, 130, 200
    values, meta, scale = make(N, K, values_dtype, seed=5)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(6)).to(x_dtype).to(DEVICE)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    w = fmt.decompress(values, meta, K, torch.float64)
    if scale is not None:
        w = w * scale.double().unsqueeze(1)
    exact = x.double() @ w.T + bias.double()
    mag = x.double().abs() @ w.abs().T + bias.double().abs()
    eps_x = 0.0 if x_dtype == torch.float32 else torch.finfo(x_dtype).eps / 2
    bound = ((fmt.padded_k(K) // 2 + 3) * EPS32 + eps_x) * mag + torch.finfo(x_dtype).eps * exact.abs() \
        + torch.finfo(x_dtype).tiny
    for cfg in _each_config(getattr(tk, kernel_name), monkeypatch):
        err = (tk.sparse24_mm(x, values, meta, scale, bias).double() - exact).abs()
        assert (err <= bound).all(), (cfg, float(err.max()))


def test_sparse24_int8_scaled_mm_every_config(monkeypatch):
    M, N, K = 19, 130, 200
    values, meta, scale_b = make(N, K, torch.int8, seed=8)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    scale_a = (torch.rand(M, generator=torch.Generator().manual_seed(10)) + 0.1).to(DEVICE)
    want = ref.sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, None, None)
    for cfg in _each_config(tk._sparse24_mm_int8, monkeypatch):
        assert torch.equal(tk.sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, None, None), want), cfg
