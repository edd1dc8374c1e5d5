"""lowbit/cpu/amx.h's tile driver (cpu::amx_weight_gemm), shared by the families' AMX kernels.

From 65 rows of x it decodes each tile of 16 weight rows once, whole, into an L2-resident strip
and runs every pass of 64 rows of x from there; LOWBIT_AMX_STRIP=0 decodes per pass instead. Both
loops run the same decode steps and the same tile multiplies in the same order: the same bits.
The families' own tests check each kernel against its bound; this one checks the two loops agree.
"""

from __future__ import annotations

import pytest
import torch

import cpu_routes
import lowbit  # noqa: F401
from lowbit import ops
from lowbit.formats import codebook as cb_fmt
from lowbit.formats import fp8 as fp8_fmt
from lowbit.formats import int4 as int4_fmt
from lowbit.formats import sparse24 as s24_fmt
from lowbit.quant.nm_prune import nm_prune

pytestmark = pytest.mark.skipif(not cpu_routes.amx_bf16_ready(), reason="needs AMX-BF16 (and Linux's permission)")

N, K = 37, 1000  # N: a partial last tile of 16 rows; K: a partial last 32-column block


def _family_calls():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    bias = torch.randn(N, generator=g)
    q4 = int4_fmt.quantize_weight(w, 128, False, torch.bfloat16)
    q8, s8 = ops.int8_quantize_dynamic(w, per_row=True)
    f8 = fp8_fmt.quantize_weight(w, "e4m3", "row")
    # kmeans4-like (the table decoder) and 8-bit additive codes over d = 4 (the whole-row decoder)
    cw = cb_fmt.from_codes(torch.randint(0, 16, (N, K, 1), generator=g), torch.randn(1, 1, 1, 16, 1, generator=g),
                           torch.rand(N, generator=g) + 0.5)
    aq = cb_fmt.from_codes(torch.randint(0, 256, (N, K // 4, 2), generator=g), torch.randn(1, 1, 2, 256, 4, generator=g))
    sw = s24_fmt.from_dense(nm_prune(w), values_dtype=torch.bfloat16)
    return {
        "int4": lambda x: ops.int4_weight_only_mm(x, q4.packed, q4.scale, q4.zero, 128, bias),
        "int8": lambda x: ops.int8_weight_only_mm(x, q8, s8.flatten(), bias),
        "fp8": lambda x: ops.fp8_weight_only_mm(x, f8.qweight, f8.scale, bias),
        "codebook": lambda x: ops.codebook_mm(x, cw.packed, cw.codebooks, cw.scale, bias),
        "codebook-aq": lambda x: ops.codebook_mm(x, aq.packed, aq.codebooks, None, bias),
        "sparse24": lambda x: ops.sparse24_mm(x, sw.values, sw.meta, None, bias),
    }


FAMILIES = ["codebook", "codebook-aq", "fp8", "int4", "int8", "sparse24"]


@pytest.fixture(scope="module")
def calls():
    out = _family_calls()
    assert sorted(out) == FAMILIES
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("M", [65, 130, 200])
def test_strip_loop_gives_the_bits_of_the_per_pass_loop(monkeypatch, calls, family, M):
    for name in ("LOWBIT_INT4_AMX", "LOWBIT_INT8_WO_AMX", "LOWBIT_FP8_AMX", "LOWBIT_CODEBOOK_AMX",
                 "LOWBIT_SPARSE24_AMX"):
        monkeypatch.setenv(name, "1")
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
    monkeypatch.setenv("LOWBIT_AMX_STRIP", "0")
    per_pass = calls[family](x)
    monkeypatch.setenv("LOWBIT_AMX_STRIP", "1")
    strip = calls[family](x)
    assert torch.equal(strip, per_pass)
    assert strip.abs().max() > 0
