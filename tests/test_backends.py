"""The backend-selection rule (docs/ops.md, "Backend selection"), checked without a GPU by
standing in for the facts it reads: which kernels are built, verified and runnable."""

import pytest
import torch

import lowbit
from lowbit import backends as B
from lowbit.backends import verified


@pytest.fixture
def rule(monkeypatch):
    """Control the inputs of the rule; returns a setter."""
    state = {"cpp": True, "triton_ok": True, "verified": {}}
    monkeypatch.setattr(B, "_cuda_cpp_impl", lambda op: (lambda *a: "cuda") if state["cpp"] else None)
    monkeypatch.setattr(B, "_triton_import_error", lambda: None if state["triton_ok"] else "no triton")
    monkeypatch.setattr(verified, "VERIFIED", state["verified"])
    monkeypatch.delenv("LOWBIT_CUDA_BACKEND", raising=False)
    B._auto_cuda_choice.cache_clear()
    yield state
    B._auto_cuda_choice.cache_clear()


def choose(op="int8_mm", capability=(9, 0)):
    B._auto_cuda_choice.cache_clear()
    return B._auto_cuda_choice(op, capability)


def test_unverified_cuda_kernel_is_never_the_default(rule):
    assert choose() == "triton"


def test_verified_cuda_kernel_is_chosen_only_on_its_architecture(rule):
    rule["verified"][("cuda", "int8_mm")] = [{"capability": (9, 0), "device": "H100", "date": "2026-01-01"}]
    assert choose(capability=(9, 0)) == "cuda"
    assert choose(capability=(8, 0)) == "triton"


def test_without_triton_the_reference_serves(rule):
    rule["triton_ok"] = False
    assert choose() == "reference"


def test_forcing_overrides_the_rule(rule, monkeypatch):
    monkeypatch.setattr(B, "_capability", lambda device: (9, 0))
    dev = torch.device("cuda", 0)
    assert B.cuda_backend_for("int8_mm", dev) == "triton"
    with lowbit.backends.use("reference"):
        assert B.cuda_backend_for("int8_mm", dev) == "reference"
        with lowbit.backends.use("cuda"):
            assert B.cuda_backend_for("int8_mm", dev) == "cuda"
        assert B.cuda_backend_for("int8_mm", dev) == "reference"
    monkeypatch.setenv("LOWBIT_CUDA_BACKEND", "cuda")
    assert B.cuda_backend_for("int8_mm", dev) == "cuda"


def test_use_rejects_unknown_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        with lowbit.backends.use("cpu"):
            pass


def test_forced_cuda_without_a_built_kernel_says_why(rule, monkeypatch):
    rule["cpp"] = False
    with lowbit.backends.use("cuda"), pytest.raises(RuntimeError, match="has no CUDA kernel"):
        B._resolve_cuda("int8_mm", torch.device("cuda", 0))


def test_triton_kernel_below_its_minimum_capability_falls_through(rule, monkeypatch):
    """A Triton kernel a chip cannot run (e.g. fp8 on sm_80) is never picked there."""
    tk = B.triton_kernels()
    monkeypatch.setitem(tk.MIN_CAPABILITY, "int8_mm", (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert tk.kernel_for("int8_mm", torch.device("cuda", 0)) is None
    impl = B._resolve_cuda("int8_mm", torch.device("cuda", 0))
    assert impl is B.checked_reference("int8_mm")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert tk.kernel_for("int8_mm", torch.device("cuda", 0)) is tk.KERNELS["int8_mm"]


def test_every_op_has_a_kernel_on_cpu_and_cuda_and_a_fake():
    for op in lowbit._ops.op_names():
        qualified = f"lowbit::{op}"
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key), (op, key)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lowbit::_cuda_{op}", "Meta")


def test_backends_lists_every_backend_with_a_reason():
    status = lowbit.backends()
    assert set(status) == {"cpu", "cuda", "triton", "reference"}
    for s in status.values():
        assert s.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].available


def test_kernel_table_covers_every_op():
    rows = lowbit.backends.kernel_table()
    assert [r["op"] for r in rows] == lowbit._ops.op_names()
    for r in rows:
        assert r["cuda"] in ("not built", "built, unverified", "built, verified")


def test_router_leaves_checks_to_the_backend_it_picks():
    """Every backend the CUDA router can pick validates its own arguments, exactly once."""
    route = B._make_cuda_router("int8_mm")
    bad = (torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.int8))
    with lowbit.backends.use("reference"), pytest.raises(ValueError, match="lowbit.int8_mm: a must have dtype int8"):
        route(*bad)
    tk = B.triton_kernels()
    with pytest.raises(ValueError, match="lowbit.int8_mm: a must have dtype int8"):
        tk.KERNELS["int8_mm"](*bad)


def test_ci_builds_and_loads_the_extension():
    """On CI the extension must load (and carry CUDA kernels where it can): a build or load
    failure would otherwise pass silently with every op on the reference fallback."""
    import os
    import shutil

    if not os.environ.get("CI"):
        pytest.skip("checked on CI, where scripts/install.sh has just built the extension")
    assert lowbit._extension.LOADED, lowbit._extension.LOAD_ERROR
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    wants_cuda = os.environ.get("LOWBIT_BUILD_CUDA", "1") != "0"
    if wants_cuda and torch.version.cuda and (shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))):
        assert lowbit._extension.built_with_cuda(), lowbit._extension.build_description()
