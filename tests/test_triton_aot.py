"""Every Triton kernel compiles for sm_80 / sm_89 / sm_90 with every autotune config, without
spills, within shared memory, and with tensor-core instructions in its GEMMs: with the Triton
installed here, and with the GPU machines' Triton (aot.GPU_MACHINE_TRITON, in the side
environment aot.GPU_TRITON_ENV that scripts/install.sh makes), which compiles differently.

The compile runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it on
machines without a GPU, and interpreter objects cannot be compiled). See
lowbit/backends/triton/aot.py and docs in /work/shared/GPU-CHECKS.md, rung 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from lowbit.backends.triton import aot  # noqa: E402

CUOBJDUMP = aot._cuobjdump()
needs_cuda_backend = pytest.mark.skipif(
    not os.path.exists(CUOBJDUMP), reason="triton's NVIDIA backend (cuobjdump) is not installed")


def _env_without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_machine_python() -> str:
    """The side environment's python, which must hold exactly the GPU machines' Triton."""
    if triton.__version__ == aot.GPU_MACHINE_TRITON:  # e.g. on a GPU machine
        pytest.skip(f"the installed Triton is the GPU machines' ({triton.__version__}): checked as installed-triton")
    python = os.path.join(REPO, aot.GPU_TRITON_ENV, "bin", "python")
    version = None
    if os.path.exists(python):
        probe = subprocess.run([python, "-c", "import triton; print(triton.__version__)"],
                               env=_env_without_interpreter(), capture_output=True, text=True, timeout=120)
        version = probe.stdout.strip() if probe.returncode == 0 else None
    if version != aot.GPU_MACHINE_TRITON:
        why = f"{python} has triton {version}, not {aot.GPU_MACHINE_TRITON}"
        # scripts/install.sh makes it, so in CI its absence is a failed install step.
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return python


@pytest.fixture(scope="module", params=["installed-triton", "gpu-machine-triton"])
def results(request):
    # compile_all itself moves to a subprocess when the interpreter is on; doing it here
    # explicitly keeps the test independent of which mode this process runs in.
    python = sys.executable if request.param == "installed-triton" else _gpu_machine_python()
    env = _env_without_interpreter()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    out = subprocess.run([python, "-m", "lowbit.backends.triton.aot", "--json", "--no-fail"],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-4000:]
    return [aot.AotResult(**r) for r in json.loads(out.stdout)]


@needs_cuda_backend
def test_every_kernel_config_target_compiles_clean(results):
    expected = {(k.name, aot.config_label(c), t) for k in aot.AOT_KERNELS for c in k.configs for t in k.targets}
    assert {(r.kernel, r.config, r.target) for r in results} == expected
    bad = [r for r in results if r.status == "error" or r.problems]
    assert not bad, "\n" + aot.format_table(bad)
    for r in results:
        if r.status == "refused":
            continue
        assert r.stack == 0 and r.local == 0, r
        assert 0 <= r.shared <= aot.SHARED_LIMIT[r.target], r
        assert 0 < r.registers <= 255 and r.registers * r.threads <= aot.REGISTERS_PER_SM, r


@needs_cuda_backend
def test_gemms_use_tensor_cores(results):
    entries = {k.name: k for k in aot.AOT_KERNELS}
    gemms = [r for r in results if entries[r.kernel].gemm and entries[r.kernel].tensor_cores and r.status == "ok"]
    assert gemms
    for r in gemms:
        assert r.tensor_op in (("mma", "wgmma") if r.target >= 90 else ("mma",)), r
    # wgmma needs a warpgroup's 64 rows: the 64- and 128-row int8 tiles must get it on sm_90.
    wide = [r for r in gemms if r.kernel == "int8_mm" and r.target == 90 and r.config.startswith(("M64", "M128"))]
    assert wide and all(r.tensor_op == "wgmma" for r in wide)


@needs_cuda_backend
def test_refused_targets_refuse(results):
    entries = {k.name: k for k in aot.AOT_KERNELS}
    for r in results:
        assert (r.status == "refused") == (r.target in entries[r.kernel].refused), r


_BAD_CONFIGS = r"""
import dataclasses, json
from lowbit.backends.triton import aot
entry = next(k for k in aot.AOT_KERNELS if k.name == "int8_mm")
cfgs = [  # measured: a 128x256 int8 tile with 4 warps spills on sm_80 (Triton 3.6: 688 B, 3.8:
    # 3384 B; with 8 warps only 3.8 spills); 6 stages of 128x128x128 need 192 KB
    (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3), 80),
    (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=6), 89),
]
print(json.dumps([dataclasses.asdict(aot.compile_one(entry, c, t)) for c, t in cfgs]))
"""


@needs_cuda_backend
def test_the_check_catches_spills_and_shared_overflow():
    out = subprocess.run([sys.executable, "-c", _BAD_CONFIGS], env=_env_without_interpreter(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    spill, overflow = (aot.AotResult(**r) for r in json.loads(out.stdout))
    assert spill.status == "error" and any("spills" in p for p in spill.problems), spill
    assert overflow.status == "error" and any("shared memory" in p for p in overflow.problems), overflow


# ============================================================================ completeness
def test_every_jit_function_is_listed():
    found = aot.jit_objects()
    assert any(name.endswith("._int8_mm_kernel") for name in found)  # the scan sees kernels
    assert aot.unlisted() == []


def test_an_unlisted_kernel_is_detected():
    import types

    mod = types.ModuleType("lowbit.backends.triton._probe")

    def _probe_kernel(x_ptr, BLOCK: "tl.constexpr"):  # noqa: F821
        pass

    _probe_kernel.__module__ = mod.__name__
    mod._probe_kernel = triton.jit(_probe_kernel)
    assert aot.unlisted([mod]) == ["lowbit.backends.triton._probe._probe_kernel"]


def test_device_functions_are_called_by_listed_kernels():
    sources = [aot.source_of(k.fn) for k in aot.AOT_KERNELS]
    for fn in aot.DEVICE_FUNCTIONS:
        name = aot.base_jit(fn).fn.__name__
        assert any(f"{name}(" in src for src in sources), name


def test_aot_configs_are_the_autotuner_configs():
    from triton.runtime.autotuner import Autotuner

    listed = {}
    for k in aot.AOT_KERNELS:
        if isinstance(k.fn, Autotuner):
            assert list(k.configs) == [aot.config_dict(c) for c in k.fn.configs], k.name
            listed[id(k.fn)] = k.fn
    autotuners = [o for o in aot.jit_objects().values() if isinstance(o, Autotuner)]
    assert autotuners and {id(o) for o in autotuners} == set(listed)


def test_gemm_configs_meet_tl_dot_minimums():
    # tl.dot needs 16 rows/columns at least; int8 needs BLOCK_K >= 32 (mma k=32).
    for k in aot.AOT_KERNELS:
        for c in k.configs:
            if k.gemm:
                assert c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 and c["BLOCK_K"] >= 16, (k.name, c)
                if k.signature.get("a_ptr") == "*i8":
                    assert c["BLOCK_K"] >= 32, (k.name, c)
