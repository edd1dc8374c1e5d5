"""The SPARSE24 CUDA C++ kernels (csrc/cuda/sparse24.cu), forced with lowbit.backends.use("cuda"),
against the reference (lowbit.backends.reference.sparse24), on a real GPU. Unverified until run.

Shapes cover both paths: CUTLASS SparseGemm (16-bit x and values of one dtype, N % 32 == 0,
padded K % 64 == 0; int8: padded K % 128 == 0) and the SIMT fallback (fp32, mixed dtypes,
int8 values with a scale, odd N, K not a multiple of 16), M = 1 and large M.

Float bound: the tensor cores take x and the values in their own 16-bit dtype (exact products)
and accumulate in fp32 in any order: |out - exact| <= (Kp/2 + 3) eps32 sum|x||w| + eps_out
|exact| + tiny. int8: bit-exact (exact int32 accumulation, the reference's epilogue roundings).
"""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.backends.reference import sparse24 as ref
from lowbit.formats import sparse24 as fmt
from lowbit.quant.nm_prune import nm_prune

pytestmark = pytest.mark.cuda

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def cuda_backend():
    status = lowbit.backends.backends()["cuda"]
    if not status.available:
        pytest.skip(f"CUDA C++ backend unavailable: {status.reason}")
    with lowbit.backends.use("cuda"):
        yield


def make(N, K, values_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = fmt.from_dense(nm_prune(torch.randn(N, K, generator=g)), values_dtype=values_dtype)
    return W.values.cuda(), W.meta.cuda(), None if W.scale is None else W.scale.cuda()


@pytest.mark.parametrize("M", [1, 7, 64, 300])
@pytest.mark.parametrize("N,K", [(64, 128), (96, 4096), (33, 100), (4096, 4096), (32, 70)])
@pytest.mark.parametrize("x_dtype,values_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    (torch.bfloat16, torch.int8), (torch.float16, torch.float32),
])
def test_sparse24_mm(M, N, K, x_dtype, values_dtype):
    values, meta, scale = make(N, K, values_dtype)
    x = torch.randn(M, K, device="cuda").to(x_dtype)
    bias = torch.randn(N, device="cuda")
    out = lowbit.ops.sparse24_mm(x, values, meta, scale, bias)
    assert out.dtype == x_dtype and out.shape == (M, N)
    w = fmt.decompress(values, meta, K, torch.float64)
    if scale is not None:
        w = w * scale.double().unsqueeze(1)
    xd = x.double()
    exact = xd @ w.T + bias.double()
    mag = xd.abs() @ w.abs().T + bias.double().abs()
    bound = (fmt.padded_k(K) // 2 + 3) * EPS32 * mag + torch.finfo(x_dtype).eps * exact.abs() + 1e-30
    assert ((out.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("M", [1, 5, 128])
@pytest.mark.parametrize("N,K", [(64, 256), (4096, 4096), (33, 100), (32, 4096 + 16)])
@pytest.mark.parametrize("out_dtype", [None, torch.float16])
def test_sparse24_int8_scaled_mm_bit_exact(M, N, K, out_dtype):
    values, meta, scale_b = make(N, K, torch.int8)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device="cuda")
    scale_a = torch.rand(M, device="cuda") + 0.1
    bias = torch.randn(N, device="cuda")
    got = lowbit.ops.sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias, out_dtype)
    want = ref.sparse24_int8_scaled_mm(a, values, meta, scale_a, scale_b, bias, out_dtype)
    assert torch.equal(got, want)


def test_bad_metadata_message_matches_cpu():
    values, meta, _ = make(32, 64, torch.float16)
    meta = meta.clone()
    meta[3, 1] = 0x0E
    x = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError) as e_gpu:
        lowbit.ops.sparse24_mm(x, values, meta)
    with pytest.raises(ValueError) as e_cpu:
        lowbit.ops.sparse24_mm(x.cpu(), values.cpu(), meta.cpu())
    assert str(e_gpu.value) == str(e_cpu.value)


def test_torch_semi_structured_agrees():
    ok, why = fmt.semi_structured_available()
    if not ok:
        pytest.skip(why)
    values, meta, _ = make(128, 256, torch.float16)
    W = fmt.Sparse24Weight(values, meta, 256)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    t = fmt.to_torch_semi_structured(W)
    ours = lowbit.ops.sparse24_mm(x, values, meta)
    theirs = torch.nn.functional.linear(x, t)
    torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)


# ---- validation cache: the metadata check (a device sync) runs once per meta tensor version
from lowbit.validation_cache import clear_validation_cache, validation_cache_stats  # noqa: E402


def _call_for(kind, N, K):
    """(call(meta), meta): one op on CUDA tensors; N % 32 == 0 with K % 128 == 0 is the CUTLASS path."""
    if kind == "mm":
        values, meta, scale = make(N, K, torch.float16)
        x = torch.randn(3, K, device="cuda", dtype=torch.float16)
        return (lambda m: lowbit.ops.sparse24_mm(x, values, m, scale)), meta.clone()
    values, meta, scale = make(N, K, torch.int8)
    a = torch.randint(-128, 128, (3, K), dtype=torch.int8, device="cuda")
    scale_a = torch.rand(3, device="cuda") + 0.1
    return (lambda m: lowbit.ops.sparse24_int8_scaled_mm(a, values, m, scale_a, scale)), meta.clone()


@pytest.fixture
def fresh_cache():
    clear_validation_cache()
    validation_cache_stats(reset=True)
    yield
    clear_validation_cache()


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    """The CUDA C++ kernels check meta in C++, Triton in Python (lowbit/_checks.py): one cache."""
    status = lowbit.backends.backends()[request.param]
    if not status.available:
        pytest.skip(f"{request.param} backend unavailable: {status.reason}")
    with lowbit.backends.use(request.param):
        yield request.param


@pytest.mark.parametrize("kind", ["mm", "int8"])
@pytest.mark.parametrize("N,K", [(64, 256), (33, 100)])  # CUTLASS, SIMT
def test_meta_validated_once_then_no_sync_and_graph_capture(kind, N, K, backend, fresh_cache):
    call, meta = _call_for(kind, N, K)
    want = call(meta)  # the one validation: a device sync
    torch.cuda.synchronize()
    assert validation_cache_stats().misses == 1
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        got = call(meta)  # (compared below: torch.equal itself syncs)
        clear_validation_cache()
        with pytest.raises(RuntimeError, match="synchroniz"):  # the detector is live: a miss syncs
            call(meta)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert torch.equal(got, want)
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs documents
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(meta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(meta)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    # The first call, the refused one after clearing (not recorded), the warm-up; capture hit.
    assert validation_cache_stats().misses == 3


@pytest.mark.parametrize("kind", ["mm", "int8"])
def test_in_place_corruption_after_caching_is_caught(kind, backend, fresh_cache):
    call, meta = _call_for(kind, 64, 256)
    call(meta)
    call(meta)
    assert validation_cache_stats().hits == 1
    meta[3, 1] = 0x0E  # high nibble 0x0 is invalid; the write bumps meta._version
    with pytest.raises(ValueError, match=r"lowbit\.sparse24_(int8_scaled_)?mm: meta\[3, 1\]=0x0e"):
        call(meta)


def test_capture_with_an_unvalidated_meta_fails_before_enqueueing(backend, fresh_cache):
    call, meta = _call_for("mm", 64, 256)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"meta has not been validated.*before capturing"):
        with torch.cuda.graph(graph):
            call(meta)
    want = call(meta)  # the stream is usable; this validates
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(meta)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_write_bypassing_the_version_counter_is_caught_after_clear(fresh_cache):
    # (Never run the op on the corrupted meta before clearing: on the GPU that is the undefined
    # behaviour the check exists to prevent.)
    call, meta = _call_for("mm", 64, 256)
    call(meta)
    meta.data[3, 1] = 0x0E
    assert meta._version == 0
    clear_validation_cache()
    with pytest.raises(ValueError, match=r"meta\[3, 1\]=0x0e"):
        call(meta)
