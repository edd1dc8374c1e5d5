"""Triton int4_cutlass_sm90_mm (lowbit.backends.triton.int4) against the spec
(lowbit.backends.reference.int4, weights from lowbit.formats.int4.dequantize_cutlass_sm90).

On a machine without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported
and the kernel runs in the interpreter on CPU tensors; with a GPU it runs natively. The host
function is called directly (no routing), with small shapes; the `cuda`-marked tests at the end
go through the op and its CUDA routing on a real GPU.

Bound (as tests/test_int4_sm90.py derives it for the CPU kernel): the kernel's weights are the
spec's T weights bit for bit (test_kernel_dequantizes_bit_exactly proves it), so the only errors
are the fp32 accumulation in any order, at most eps32 per add (round to nearest: eps32 / 2;
truncation inside a tensor-core instruction: < eps32), over K products and the bias add, and the
final rounding to T:
    (K + 2) * eps32 * (sum|x||w_T| + |bias|) + u_T * (|exact| + that) + tiny_T.
Natively, tensor cores align the products of one instruction to the largest exponent before
adding, so the per-add error is taken twice (as tests/test_int4_sm90_cuda.py does for the
CUTLASS kernel). A nibble-order, group-index, sign or masking bug is far outside it.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)
pytest.importorskip("triton")

from lowbit import _checks, ops  # noqa: E402
from lowbit.backends.triton import int4 as tk  # noqa: E402
from lowbit.formats import int4 as fmt  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = (torch.float16, torch.bfloat16)
U = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff of T
EPS32 = torch.finfo(torch.float32).eps
ACC_EPS = EPS32 if INTERPRET else 2 * EPS32


def dtype_id(d):
    return str(d).removeprefix("torch.")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make(N, K, gs, symmetric, dtype, seed=0, scale_dtype=None):
    """(packed, scale_t, zero_t) in the cutlass_sm90 layout for T = dtype, on DEVICE.
    scale_dtype float32 makes scales that round to T (so does zero')."""
    g = _gen(seed)
    w = torch.randn(N, K, generator=g) * (1 + torch.rand(N, 1, generator=g) * 3)
    q = fmt.quantize_weight(w, gs, symmetric, scale_dtype or dtype)
    return tuple(t.to(DEVICE) for t in fmt.to_cutlass_sm90(q.packed, q.scale, q.zero, gs, K, dtype))


def randn(*shape, dtype, seed):
    return torch.randn(shape, generator=_gen(seed)).to(dtype).to(DEVICE)


def assert_within_bound(out, x, packed, scale, zero, gs, bias):
    M, K = x.shape
    dtype = x.dtype
    assert out.dtype == dtype and out.shape == (M, packed.shape[0]) and out.device == x.device
    w = fmt.dequantize_cutlass_sm90(packed, scale, zero, gs).double()
    x64 = x.double()
    exact = x64 @ w.T
    mag = x64.abs() @ w.abs().T
    if bias is not None:
        exact = exact + bias.double()
        mag = mag + bias.double().abs()
    acc = (K + 2) * ACC_EPS * mag
    bound = acc + U[dtype] * (exact.abs() + acc) + torch.finfo(dtype).tiny
    err = (out.double() - exact).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()} (max err {err.max().item()})"


def run(x, packed, scale, zero, gs, bias=None):
    out = tk.int4_cutlass_sm90_mm(x, packed, scale, zero, gs, bias)
    assert_within_bound(out, x, packed, scale, zero, gs, bias)
    return out


# ============================================================================ sweep
# (N, K, group_size) at the layout's limits (fmt.CUTLASS_SM90_*): N = 8 (one 16-byte row, less
# than any BLOCK_N) and N = 136 (N % 16 == 8, a partial N tile); K = 32 (the smallest K, per
# channel), K % 64 == 32 (a half last K step), partial last groups of 64 and 128; every group size
# (64, 128 and per channel).
SHAPES = [(8, 32, 32), (136, 96, 96), (24, 160, 64), (8, 128, 64), (40, 256, 128), (16, 320, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("N,K,gs", SHAPES)
@pytest.mark.parametrize("M,symmetric", [(1, False), (17, False), (17, True)], ids=["M1-asym", "M17-asym", "M17-sym"])
def test_int4_cutlass_sm90_mm(M, N, K, gs, dtype, symmetric):
    packed, scale, zero = make(N, K, gs, symmetric, dtype, seed=N + K + gs)
    x = randn(M, K, dtype=dtype, seed=M)
    bias = randn(N, dtype=dtype, seed=N) if M == 17 else None
    run(x, packed, scale, zero, gs, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias_dtype", [torch.float32, "T"], ids=["fp32", "T"])
def test_bias_dtypes(dtype, bias_dtype):
    N, K, gs = 24, 192, 64
    packed, scale, zero = make(N, K, gs, False, dtype, seed=3)
    x = randn(5, K, dtype=dtype, seed=4)
    bias = randn(N, dtype=dtype if bias_dtype == "T" else bias_dtype, seed=5) * 4
    # the bias is added in fp32 before the one rounding to T (a bias rounded first, or added in
    # T after the output rounding, can miss the bound by half an ulp of T)
    run(x, packed, scale, zero, gs, bias)


# ============================================================================ dequantization
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_dequantizes_bit_exactly(dtype, symmetric):
    # Rows of the identity pick single weights: one nonzero product (exact in fp32), zeros added
    # exactly, and a value already in T, so the output is the kernel's weight itself. Scales come
    # from fp32 so q*s and zero' round to T: the spec rounds twice, round_T(round_T(q s) + z'),
    # and the test checks that it can tell that from one fused rounding round_T(q s + z').
    N, K, gs = 40, 160, 64
    packed, scale, zero = make(N, K, gs, symmetric, dtype, seed=7, scale_dtype=torch.float32)
    want = fmt.dequantize_cutlass_sm90(packed.cpu(), scale.cpu(), zero.cpu(), gs)
    got = tk.int4_cutlass_sm90_mm(torch.eye(K, dtype=dtype, device=DEVICE), packed, scale, zero, gs)
    assert torch.equal(got.cpu(), want.T)
    if not symmetric:
        q = fmt.signed_codes_cutlass_sm90(packed.cpu()).double()
        s = scale.cpu().t().double().repeat_interleave(gs, 1)[:, :K]
        z = zero.cpu().t().double().repeat_interleave(gs, 1)[:, :K]
        fused = (q * s + z).to(dtype)
        assert not torch.equal(fused, want), "no weight where one rounding differs from two: test too weak"


def test_signs_extremes_and_group_scales():
    # Codes -8 and 7 only, scales spanning 2**-10 .. 2**5 and zero' of either sign: a nibble read
    # unsigned, swapped nibbles or a scale row from the wrong group move results by far more than
    # the bound.
    N, K, gs = 24, 256, 64
    G = K // gs
    codes = torch.where(torch.rand(N, K, generator=_gen(8)) < 0.5, 0, 15).to(torch.uint8)
    scale = 2.0 ** torch.randint(-10, 6, (N, G), generator=_gen(9)).float()
    zero = torch.randint(0, 16, (N, G), generator=_gen(10)).float()
    packed, scale_t, zero_t = fmt.to_cutlass_sm90(fmt.pack(codes), scale, zero, gs, K, torch.float16)
    x = randn(3, K, dtype=torch.float16, seed=11)
    run(x, packed.to(DEVICE), scale_t.to(DEVICE), zero_t.to(DEVICE), gs)


# ============================================================================ layouts
def strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t through a non-contiguous (or misaligned) view."""
    if kind == "transposed":
        return t.T.contiguous().T
    if kind == "sliced":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    if kind == "offset":
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat[1:].view(t.shape)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["transposed", "sliced", "offset"])
def test_non_contiguous_inputs(kind):
    N, K, gs = 24, 160, 64
    packed, scale, zero = make(N, K, gs, False, torch.float16, seed=12)
    x = randn(9, K, dtype=torch.float16, seed=13)
    bias = randn(N, dtype=torch.float16, seed=14)
    want = tk.int4_cutlass_sm90_mm(x, packed, scale, zero, gs, bias)
    got = run(strided(x, kind), strided(packed, kind), strided(scale, kind), strided(zero, kind), gs,
              strided(bias[None], kind)[0])
    assert torch.equal(got, want)


# ============================================================================ configs
def _each_config(kernel, monkeypatch):
    """Each autotune config, with the autotuner pinned to it (as tests/test_triton_int4.py)."""
    for cfg in list(kernel.configs):
        monkeypatch.setattr(kernel, "configs", [cfg])
        yield cfg


def test_every_config(monkeypatch):
    # Ragged for every tile: M and N end in partial tiles (N % 16 == 8), K % 64 == 32 ends in a
    # half K step, the last group (64) is partial. bf16: the dtype paths differ only in the
    # rounding helper, which the sweep covers; the configs differ only in tiling.
    dtype = torch.bfloat16
    M, N, K, gs = 17, 136, 160, 64
    packed, scale, zero = make(N, K, gs, False, dtype, seed=15)
    x = randn(M, K, dtype=dtype, seed=16)
    bias = randn(N, dtype=torch.float32, seed=17)
    for cfg in _each_config(tk._int4_cutlass_sm90_mm, monkeypatch):
        assert 64 % cfg.kwargs["BLOCK_K"] == 0, cfg  # one group per K step (the kernel relies on it)
        run(x, packed, scale, zero, gs, bias)


# ============================================================================ boundary
def _bad(**kw):
    packed, scale, zero = make(16, 128, 64, False, torch.float16)
    args = dict(x=randn(2, 128, dtype=torch.float16, seed=0), packed=packed, scale=scale, zero=zero,
                group_size=64, bias=None)
    args.update(kw)
    return lambda: tk.int4_cutlass_sm90_mm(**args)


@pytest.mark.parametrize("call", [
    _bad(x=randn(2, 128, dtype=torch.float32, seed=0)),          # fp32 x: T is fp16 or bf16
    _bad(x=randn(2, 112, dtype=torch.float16, seed=0)),          # K % 32 != 0
    _bad(group_size=32),
    _bad(scale=torch.ones(2, 16, dtype=torch.bfloat16, device=DEVICE)),  # scale not in x's dtype
    _bad(zero=torch.ones(16, 2, dtype=torch.float16, device=DEVICE)),    # zero' not [G, N]
    _bad(bias=randn(9, dtype=torch.float16, seed=0)),
    _bad(x=randn(0, 128, dtype=torch.float16, seed=0)),
])
def test_bad_arguments_raise_before_launch(call):
    with pytest.raises(_checks.LowbitArgumentError, match=r"lowbit\.int4_cutlass_sm90_mm: "):
        call()


def test_routing_picks_triton_on_cuda(monkeypatch):
    """Unverified CUTLASS kernel: on CUDA tensors the default is Triton, from sm_80 (tensor-core
    fp16/bf16 dot) upward; checked without a GPU by standing in for the device facts."""
    from lowbit import backends as B
    from lowbit.backends import triton as triton_backend

    op = "int4_cutlass_sm90_mm"
    assert triton_backend.KERNELS[op] is tk.int4_cutlass_sm90_mm and tk.int4_cutlass_sm90_mm.__name__ == op
    assert triton_backend.MIN_CAPABILITY.get(op, (8, 0)) == (8, 0)
    monkeypatch.delenv("LOWBIT_CUDA_BACKEND", raising=False)
    monkeypatch.setattr(B, "_triton_import_error", lambda: None)
    dev = torch.device("cuda", 0)
    try:
        for cap in ((8, 0), (8, 9), (9, 0)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
            monkeypatch.setattr(B, "_capability", lambda device, cap=cap: cap)
            B._auto_cuda_choice.cache_clear()
            assert B.cuda_backend_for(op, dev) == "triton"
            assert B._resolve_cuda(op, dev) is tk.int4_cutlass_sm90_mm
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
        assert triton_backend.kernel_for(op, dev) is None  # below sm_80: the reference serves
    finally:
        B._auto_cuda_choice.cache_clear()


_PTX_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.backends.triton import aot

def ptx(entry, target, options):
    cfg = entry.configs[0]
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    names = aot.base_jit(entry.fn).arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in entry.aligned if entry.signature[a] != "constexpr"}
    src = ASTSource(fn=aot.base_jit(entry.fn), signature=entry.signature, constexprs={**entry.constexprs, **meta},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", target, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"], **options}).asm["ptx"]

fma = lambda text: len(re.findall(r"\bfma\.rn\.(?:f16|bf16|f32)", text))
entries = {e.name: e for e in aot.AOT_KERNELS if e.name.startswith("int4_cutlass_sm90_mm")}
fp16, bf16 = entries["int4_cutlass_sm90_mm[fp16,bias=fp16]"], entries["int4_cutlass_sm90_mm[bf16,bias=none][odd-N]"]

# The control: a plain fp16 a * b + c, which Triton contracts into fma.rn.f16 by default (the
# dequantize itself is not contracted by every Triton: 3.6 multiplies in fp32) and must not
# under the options the int4 kernel ships with.
@triton.jit
def mul_add(a_ptr, b_ptr, c_ptr, out_ptr):
    offs = triton.language.arange(0, 128)
    a = triton.language.load(a_ptr + offs)
    b = triton.language.load(b_ptr + offs)
    c = triton.language.load(c_ptr + offs)
    triton.language.store(out_ptr + offs, a * b + c)

def control(options):
    src = ASTSource(fn=mul_add, signature={n: "*fp16" for n in mul_add.arg_names}, constexprs={})
    return fma(triton.compile(src, target=GPUTarget("cuda", 80, 32), options=options).asm["ptx"])

out = {"shipped": [fma(ptx(e, t, dict(e.options))) for e, t in ((fp16, 80), (fp16, 90), (bf16, 90))],
       "fusion_on": control({}), "fusion_off": control(dict(fp16.options))}
print(json.dumps(out))
"""


def test_aot_dequantize_is_not_contracted_into_an_fma(tmp_path):
    """What the interpreter cannot show: compiled for a GPU, q*s and + z' stay two roundings.
    With Triton's default FP fusion an fp16 multiply-add becomes fma.rn.f16 (the control)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "ptx_fma.py"  # a file: triton.jit reads its kernel's source
    script.write_text(_PTX_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["fusion_on"] > 0, "the check would not see an FMA"
    assert counts["fusion_off"] == 0, "the shipped options do not turn FP fusion off"
    assert counts["shipped"] == [0, 0, 0], counts


# ============================================================================ native (GPU)
@pytest.mark.cuda
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M", [1, 7, 128, 129, 1000])
@pytest.mark.parametrize("N,K,gs", [(136, 96, 96), (264, 320, 128), (4096, 4096, 128), (1024, 8192, 8192)])
def test_native_through_the_op(M, N, K, gs, dtype, symmetric):
    """On a GPU, with the default routing: Triton serves the op (the CUTLASS kernel is unverified)."""
    if INTERPRET:
        pytest.skip("native run only (TRITON_INTERPRET=1 is set)")
    from lowbit import backends as B

    assert B.cuda_backend_for("int4_cutlass_sm90_mm", torch.device("cuda")) == "triton"
    packed, scale, zero = make(N, K, gs, symmetric, dtype, seed=M + N)
    x = randn(M, K, dtype=dtype, seed=M)
    bias = randn(N, dtype=dtype, seed=1) if M % 2 else None
    out = ops.int4_cutlass_sm90_mm(x, packed, scale, zero, gs, bias)
    assert_within_bound(out, x, packed, scale, zero, gs, bias)  # the bound in float64 on the GPU
