"""The binary CUDA C++ kernels (csrc/cuda/binary.cu), forced with lowbit.backends.use("cuda"),
against the reference (lowbit.backends.reference.binary), on a real GPU.

binary_mm is exact: int32 dot products from CUTLASS's b1 tensor-core GEMM (AND-popc with the XNOR
identity in its epilogue, M > 8) or __popc (M <= 8).
binary_scaled_mm rounds per operation with __fmul_rn / __fadd_rn, like the reference, so it is
bit-identical. binary_quantize's bits are exact; its scale (a warp's sum in another order) is held
to the fp32 summation bound. Shapes cover both GEMM kernels, partial tiles (odd M and N), K not a
multiple of 32 or of CUTLASS's 128-bit accesses (the repack path), more than one k-step, and
padding bits set to 1.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.backends.reference import binary as ref
from lowbit.formats import binary as fmt

pytestmark = pytest.mark.cuda

M_SWEEP = [1, 3, 8, 9, 17, 128, 1000]
NK_SWEEP = [(1, 1), (37, 63), (64, 64), (65, 65), (129, 1000), (64, 4096), (33, 4097)]


@pytest.fixture(autouse=True)
def _cuda_backend():
    with lowbit.backends.use("cuda"):
        yield


def words(rows, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (rows, fmt.num_words(K)), generator=g, dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("M", M_SWEEP)
@pytest.mark.parametrize("N,K", NK_SWEEP)
def test_binary_mm_exact(M, N, K):
    a, b = words(M, K, seed=M), words(N, K, seed=K)
    out = lowbit.ops.binary_mm(a.cuda(), b.cuda(), K)
    assert torch.equal(out.cpu(), ref.binary_mm(a, b, K))


@pytest.mark.parametrize("M", [1, 5, 17, 128])
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scalar_a", [False, True])
def test_binary_scaled_mm_bit_identical(M, out_dtype, bias_dtype, scalar_a):
    N, K = 70, 777
    a, b = words(M, K), words(N, K, seed=1)
    sa, sb = torch.rand(1 if scalar_a else M) + 0.01, torch.rand(N) + 0.01
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    out = lowbit.ops.binary_scaled_mm(a.cuda(), b.cuda(), K, sa.cuda(), sb.cuda(),
                                      None if bias is None else bias.cuda(), out_dtype)
    assert torch.equal(out.cpu(), ref.binary_scaled_mm(a, b, K, sa, sb, bias, out_dtype))


@pytest.mark.parametrize("M,K", [(1, 1), (7, 31), (130, 65), (3, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_binary_quantize(M, K, dtype):
    x = torch.randn(M, K).to(dtype)
    x[0, 0] = 0.0
    packed, scale = lowbit.ops.binary_quantize(x.cuda())
    ref_packed, ref_scale = ref.binary_quantize(x)
    assert torch.equal(packed.cpu(), ref_packed)
    assert ((scale.cpu() - ref_scale).abs() <= (K + 1) * torch.finfo(torch.float32).eps * ref_scale).all()


def test_non_contiguous_operands():
    a = words(40, 300).T.contiguous().T.cuda()
    b = torch.cat([words(17, 300, seed=2)] * 2, dim=1)[:, ::2].cuda()
    assert torch.equal(lowbit.ops.binary_mm(a, b, 300).cpu(), ref.binary_mm(a.cpu().contiguous(), b.cpu().contiguous(), 300))


def test_binary_linear_module_on_cuda():
    lin = torch.nn.Linear(300, 50)
    m = lowbit.nn.BinaryLinear.from_float(lin).cuda()
    x = torch.randn(20, 300)
    # alpha (mean |x|) is summed in another order on each device: a few fp32 ulps apart.
    torch.testing.assert_close(m(x.cuda()).cpu(), lowbit.nn.BinaryLinear.from_float(lin)(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the CUTLASS path
# M > 8: CUTLASS (binary_layout.h, gemm_path). K % 128 == 0 with an aligned base goes in as it is;
# any other K is repacked into whole 128-bit accesses with the padding bits cleared.
CUTLASS_NK = [(1, 128), (7, 129), (255, 384), (257, 1000), (33, 4096), (300, 8191)]


@pytest.mark.parametrize("M", [9, 17, 256])
@pytest.mark.parametrize("N,K", CUTLASS_NK)
def test_binary_mm_cutlass_path_exact(M, N, K):
    a, b = words(M, K, seed=M + K), words(N, K, seed=N + K)
    out = lowbit.ops.binary_mm(a.cuda(), b.cuda(), K)
    assert torch.equal(out.cpu(), ref.binary_mm(a, b, K))


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(7, 129), (255, 384)])
@pytest.mark.parametrize("scalars", [False, True])
def test_binary_scaled_mm_cutlass_path_bit_identical(out_dtype, N, K, scalars):
    M = 33
    a, b = words(M, K, seed=3), words(N, K, seed=4)
    sa = torch.rand(1 if scalars else M) + 0.01
    sb = torch.rand(1 if scalars else N) + 0.01
    bias = torch.randn(N)
    for bias_arg in (None, bias):
        out = lowbit.ops.binary_scaled_mm(a.cuda(), b.cuda(), K, sa.cuda(), sb.cuda(),
                                          None if bias_arg is None else bias_arg.cuda(), out_dtype)
        assert torch.equal(out.cpu(), ref.binary_scaled_mm(a, b, K, sa, sb, bias_arg, out_dtype))


def test_binary_mm_cutlass_misaligned_base_is_repacked():
    # K % 128 == 0 but the operands start 4 bytes into their buffers: not 16-byte aligned.
    M, N, K = 40, 24, 256
    W = fmt.num_words(K)
    flat_a, flat_b = words(1, 32 * (M * W + 1), seed=5).reshape(-1), words(1, 32 * (N * W + 1), seed=6).reshape(-1)
    a, b = flat_a[1:].view(M, W), flat_b[1:].view(N, W)
    a_gpu, b_gpu = flat_a.cuda()[1:].view(M, W), flat_b.cuda()[1:].view(N, W)
    assert a_gpu.data_ptr() % 16 != 0
    assert torch.equal(lowbit.ops.binary_mm(a_gpu, b_gpu, K).cpu(), ref.binary_mm(a, b, K))


def test_binary_mm_cutlass_large_k_wraps_exactly():
    # K > 2^29: 4 * and_count and the epilogue terms leave int32, the dot does not. All +1 rows
    # of a against all +1 / all -1 / half-and-half rows of b: dots K, -K and 0 (by construction).
    K = 2**29 + 256
    W = fmt.num_words(K)
    a = torch.full((9, W), -1, dtype=torch.int32, device="cuda")
    b = torch.zeros((3, W), dtype=torch.int32, device="cuda")
    b[0] = -1
    b[2, : W // 2] = -1
    out = lowbit.ops.binary_mm(a, b, K).cpu()
    assert torch.equal(out, torch.tensor([[K, -K, 0]] * 9, dtype=torch.int32))
