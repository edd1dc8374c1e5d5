"""Which CPU path a call takes, and a way to test the other ones.

decoded_gemm_route: the rule of csrc/include/lowbit/cpu/decoded_gemm.h, shared by the tests of
the families that take the decoded-GEMM routes (test_int4.py, test_codebook.py); each passes its
own thresholds and checks, with the profiler, that the C++ side took the route this rule names.
rerun_with_env: a test file's tests again in a subprocess, for the switches the extension reads
once per process (LOWBIT_CPU_ISA, LOWBIT_BINARY_LOOP).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from lowbit import bench


def visible_cpu_flags() -> set[str]:
    """The CPU flags lowbit acts on: LOWBIT_CPU_ISA=avx2 hides AVX-512 (cpu::has_avx512f)."""
    flags = bench.cpu_flags()
    if os.environ.get("LOWBIT_CPU_ISA") == "avx2":
        flags = {f for f in flags if not f.startswith("avx512")}
    return flags


def amx_bf16_ready() -> bool:
    """cpu::amx_bf16_ready (csrc/include/lowbit/cpu/amx.h): AMX-BF16 with the AVX-512 F, BW, BF16 and
    VBMI2 its decoders use, visible to lowbit (not under LOWBIT_CPU_ISA=avx2 or scalar)."""
    if os.environ.get("LOWBIT_CPU_ISA") == "scalar":
        return False
    return {"amx_bf16", "amx_tile", "avx512f", "avx512bw", "avx512_bf16", "avx512_vbmi2"} <= visible_cpu_flags()


def set_switch(monkeypatch, name: str, value: str | None) -> None:
    """Sets the environment switch `name` for one test, or removes it (None: the automatic choice)."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def decoded_gemm_route(x_dtype, M, env, *, small_m, min_m_bf16, min_m_fp32):
    """decoded_gemm_route() for M rows of x_dtype and LOWBIT_DECODED_GEMM=env (None: unset);
    "bf16", "fp32", or None (the family's own kernels; also for M <= small_m)."""
    flags = visible_cpu_flags()
    if env == "0" or M <= small_m or "avx2" not in flags or os.environ.get("LOWBIT_CPU_ISA") == "scalar":
        return None
    if x_dtype == torch.bfloat16 and M >= min_m_bf16 and (env == "1" or "amx_bf16" in flags):
        return "bf16"
    if M >= min_m_fp32 and (env == "1" or "avx512f" in flags):
        return "fp32"
    return None


def runs_aten_mm(fn):
    """(fn(), whether it called aten::mm)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == "aten::mm" for e in prof.events())


def rerun_with_env(test_file: str, select: str, **env: str) -> None:
    """Runs `pytest test_file -k select` in a subprocess with env set; fails with its output."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", select],
                       env=dict(os.environ, **env), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
