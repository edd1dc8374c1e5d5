"""The ValidationCache (csrc/include/lowbit/validated_once.h), through the CPU sparse24 ops that use it.

The CPU kernels check 2:4 metadata once per tensor and content version, as the CUDA kernels do
(where the check is a device sync); these tests pin the guarantee documented in docs/ops.md:
a hit needs the same tensor object, version counter, data pointer, offset, sizes, strides and
dtype; any in-place write through torch re-validates; writes that bypass the version counter are
not seen until lowbit.clear_validation_cache(); the cache is bounded and thread-safe.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import lowbit
from lowbit import _extension
from lowbit.backends.reference import sparse24 as ref
from lowbit.formats import sparse24 as fmt
from lowbit.quant.nm_prune import nm_prune
from lowbit.validation_cache import (clear_validation_cache, set_validation_cache_enabled,
                                     validation_cache_stats)

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="lowbit._C is not built: no validation cache")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = r"lowbit\.sparse24_mm: meta\[1, 2\]=0x47"
CAPACITY = 4096  # ValidationCache::kCapacity


def make(N=24, K=80, values_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return fmt.from_dense(nm_prune(torch.randn(N, K, generator=g)), values_dtype=values_dtype)


def corrupt(t):
    """Writes one invalid byte (low nibble 0x7 = indices (3, 1), not increasing) at [1, 2]."""
    t[1, 2] = 0x47


@pytest.fixture(autouse=True)
def fresh_cache():
    set_validation_cache_enabled(True)
    clear_validation_cache()
    validation_cache_stats(reset=True)
    yield
    set_validation_cache_enabled(True)
    clear_validation_cache()


def mm(x, W, meta):
    return torch.ops.lowbit.sparse24_mm(x, W.values, meta, W.scale, None)


def test_valid_meta_is_validated_once_then_hits():
    W = make()
    x = torch.randn(3, 80)
    for _ in range(4):
        mm(x, W, W.meta)
    s = validation_cache_stats()
    assert (s.misses, s.hits, s.entries) == (1, 3, 1)
    # The int8 op checks the same property of the same tensor: a hit too.
    W8 = make(values_dtype=torch.int8)
    a = torch.randint(-127, 128, (2, 80), dtype=torch.int8)
    mm(torch.randn(1, 80), W8, W8.meta)
    torch.ops.lowbit.sparse24_int8_scaled_mm(a, W8.values, W8.meta, torch.ones(2), W8.scale, None, None)
    s = validation_cache_stats()
    assert (s.misses, s.hits, s.entries) == (2, 4, 2)


@pytest.mark.parametrize("M", [1, 20, 64])  # one pass over K, K chunks, dense panels
@pytest.mark.parametrize("values_dtype", [torch.float16, torch.int8], ids=str)
def test_hit_and_miss_give_identical_results(M, values_dtype):
    W = make(40, 2048 + 16, values_dtype)
    x = torch.randn(M, 2048 + 16, dtype=torch.bfloat16)
    first = mm(x, W, W.meta)                      # checks every row block
    assert validation_cache_stats().misses == 1
    second = mm(x, W, W.meta)                     # skips the checks
    assert validation_cache_stats().hits == 1
    assert torch.equal(first, second)  # (accuracy against the spec: tests/test_sparse24.py)
    if values_dtype == torch.int8:
        a = torch.randint(-128, 128, (M, 2048 + 16), dtype=torch.int8)  # -128: the other product form
        scale_a = torch.rand(M) + 0.5

        def w8a8():
            return torch.ops.lowbit.sparse24_int8_scaled_mm(a, W.values, W.meta, scale_a, W.scale, None, None)

        clear_validation_cache()
        checked, skipped = w8a8(), w8a8()
        assert torch.equal(checked, skipped)
        assert torch.equal(checked, ref.sparse24_int8_scaled_mm(a, W.values, W.meta, scale_a, W.scale))  # exact


@pytest.mark.parametrize("write", [
    "setitem", "view_fill", "detach_copy", "no_grad_copy", "inference_mode_write", "reshape_view",
])
def test_in_place_write_is_revalidated(write):
    W = make()
    x = torch.randn(2, 80)
    meta = W.meta.clone()
    mm(x, W, meta)
    mm(x, W, meta)
    assert validation_cache_stats().hits == 1
    if write == "setitem":
        corrupt(meta)
    elif write == "view_fill":
        meta[1, 2:3].fill_(0x47)
    elif write == "detach_copy":
        meta.detach()[1, 2:3].copy_(torch.tensor([0x47], dtype=torch.uint8))
    elif write == "no_grad_copy":
        with torch.no_grad():
            corrupt(meta)
    elif write == "inference_mode_write":  # a normal tensor written under inference mode still bumps
        with torch.inference_mode():
            corrupt(meta)
    else:
        meta.view(-1)[1 * meta.shape[1] + 2] = 0x47
    with pytest.raises(ValueError, match=BAD):
        mm(x, W, meta)
    # Writing the good byte back is a new version: checked again, and valid.
    meta[1, 2] = W.meta[1, 2]
    misses = validation_cache_stats().misses
    torch.testing.assert_close(mm(x, W, meta), mm(x, W, W.meta), rtol=0, atol=0)
    assert validation_cache_stats().misses == misses + 2  # meta and W.meta (new to this test)


def test_a_new_tensor_on_the_same_memory_is_revalidated():
    """Same storage, data_ptr, offset, sizes, strides and version as a validated tensor, but another
    tensor object: a miss. (The cache keys on the TensorImpl, not on the data pointer.)"""
    W = make()
    x = torch.randn(2, 80)
    storage = W.meta.clone().untyped_storage()

    def over_storage():
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, W.meta.shape, W.meta.stride())

    first = over_storage()
    mm(x, W, first)
    ptr, version = first.data_ptr(), first._version
    del first
    corrupt(over_storage())  # a third tensor writes the shared storage: no version of `second` moves
    second = over_storage()
    assert (second.data_ptr(), second._version) == (ptr, version)
    with pytest.raises(ValueError, match=BAD):
        mm(x, W, second)


def test_a_freed_tensor_address_is_not_reused_while_cached():
    """The entry's weak reference keeps the TensorImpl's memory, so no new tensor can be created at
    the address of a cached one (which a raw-pointer key would confuse with it)."""
    W = make()
    x = torch.randn(1, 80)

    def reused_addresses():
        reused = 0
        for _ in range(20):
            t = W.meta.clone()
            addr = t._cdata  # the TensorImpl's address
            mm(x, W, t)
            del t
            bad = W.meta.clone()
            corrupt(bad)
            reused += bad._cdata == addr
            with pytest.raises(ValueError, match=BAD):
                mm(x, W, bad)
            del bad
        return reused

    set_validation_cache_enabled(False)
    try:
        reused_without_cache = reused_addresses()
    finally:
        set_validation_cache_enabled(True)  # never leak a disabled cache into the tests that follow
    if reused_without_cache == 0:
        pytest.skip("this allocator does not reuse a freed TensorImpl's address at once: nothing to show")
    assert reused_addresses() == 0


def test_writes_that_bypass_the_version_counter_need_clear():
    """The documented limit: `.data` (and numpy, untyped_storage, raw pointers) write without a
    version bump, so a cached tensor is not re-checked until clear_validation_cache(). On the CPU
    such metadata stays memory-safe (2-bit indices cannot leave their group); on CUDA it would
    reach mma.sp, hence the escape hatches."""
    W = make()
    x = torch.randn(2, 80)
    meta = W.meta.clone()
    mm(x, W, meta)
    corrupt(meta.data)
    meta.numpy()[1, 3] = 0x00
    assert meta._version == 0
    mm(x, W, meta)  # a hit: not re-checked
    clear_validation_cache()
    assert validation_cache_stats().entries == 0
    with pytest.raises(ValueError, match=BAD):
        mm(x, W, meta)


def test_disabled_cache_checks_every_call():
    W = make()
    x = torch.randn(2, 80)
    meta = W.meta.clone()
    set_validation_cache_enabled(False)
    mm(x, W, meta)
    corrupt(meta.data)
    with pytest.raises(ValueError, match=BAD):
        mm(x, W, meta)
    s = validation_cache_stats()
    assert (s.enabled, s.entries, s.hits) == (False, 0, 0)


def test_inference_tensors_are_never_cached():
    """They have no version counter: writes in inference mode would be invisible."""
    W = make()
    x = torch.randn(2, 80)
    with torch.inference_mode():
        meta = W.meta.clone()
    mm(x, W, meta)
    mm(x, W, meta)
    assert validation_cache_stats().entries == 0
    with torch.inference_mode():
        corrupt(meta)
    with pytest.raises(ValueError, match=BAD):
        mm(x, W, meta)


def test_size_is_bounded_and_dead_entries_are_dropped():
    W = make(8, 16)
    x = torch.randn(1, 16)
    keep = [W.meta.clone() for _ in range(CAPACITY)]
    for m in keep:
        mm(x, W, m)
    assert validation_cache_stats().entries == CAPACITY
    del keep[: CAPACITY // 2]        # dead now: the next insertion drops their entries
    mm(x, W, W.meta)
    assert validation_cache_stats().entries == CAPACITY // 2 + 1
    more = [W.meta.clone() for _ in range(CAPACITY)]
    for m in more:                   # all alive: once full, the cache empties and refills
        mm(x, W, m)
    assert validation_cache_stats().entries <= CAPACITY
    validation_cache_stats(reset=True)
    mm(x, W, more[-1])
    assert validation_cache_stats().hits == 1


def test_threads_share_the_cache_safely():
    """Each thread flips its own meta between valid and invalid by in-place writes, and must see
    exactly the right outcome every call, while another thread keeps clearing the cache and
    every thread also uses one shared weight."""
    W = make(32, 160)
    shared = W.meta.clone()
    errors = []
    stop = threading.Event()

    def worker(seed):
        try:
            x = torch.randn(2, 160, generator=torch.Generator().manual_seed(seed))
            want = mm(x, W, W.meta)  # the kernel's own answer (its summation order is fixed)
            meta = W.meta.clone()
            for i in range(60):
                if i % 3 == 1:
                    corrupt(meta)
                    try:
                        mm(x, W, meta)
                        errors.append(f"thread {seed}: invalid meta accepted at step {i}")
                    except ValueError:
                        pass
                    meta[1, 2] = W.meta[1, 2]
                else:
                    for m in (meta, shared):
                        if not torch.equal(mm(x, W, m), want):
                            errors.append(f"thread {seed}: wrong result at step {i}")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"thread {seed}: {type(e).__name__}: {e}")

    def clearer():
        while not stop.is_set():
            clear_validation_cache()
            validation_cache_stats()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    c = threading.Thread(target=clearer)
    c.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    c.join()
    assert not errors, errors[:5]


def test_env_var_and_portable_path():
    """LOWBIT_VALIDATION_CACHE=0 starts with the cache off; on the portable (no AVX2) kernels the
    cache behaves as on the AVX2 ones. One subprocess: both are read at startup."""
    script = textwrap.dedent(r"""
        import pytest, torch
        from lowbit.formats import sparse24 as fmt
        from lowbit.quant.nm_prune import nm_prune
        from lowbit.validation_cache import (clear_validation_cache, set_validation_cache_enabled,
                                             validation_cache_stats)
        W = fmt.from_dense(nm_prune(torch.randn(8, 64)), values_dtype=torch.float16)
        x = torch.randn(2, 64)
        mm = lambda m: torch.ops.lowbit.sparse24_mm(x, W.values, m, W.scale, None)
        assert not validation_cache_stats().enabled
        meta = W.meta.clone()
        mm(meta)
        meta.data[1, 2] = 0x47
        with pytest.raises(ValueError, match=r"meta\[1, 2\]=0x47"):
            mm(meta)
        set_validation_cache_enabled(True)
        meta = W.meta.clone()
        good = mm(meta)
        assert torch.equal(mm(meta), good)
        s = validation_cache_stats()
        assert (s.misses, s.hits) == (1, 1), s
        meta[1, 2] = 0x47
        with pytest.raises(ValueError, match=r"meta\[1, 2\]=0x47"):
            mm(meta)
        meta[1, 2] = W.meta[1, 2]
        mm(meta)
        meta.data[1, 2] = 0x47
        mm(meta)
        clear_validation_cache()
        with pytest.raises(ValueError, match=r"meta\[1, 2\]=0x47"):
            mm(meta)
        print("ok")
    """)
    env = dict(os.environ, LOWBIT_VALIDATION_CACHE="0", LOWBIT_CPU_ISA="scalar")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_public_names():
    assert lowbit.clear_validation_cache is clear_validation_cache


def test_python_backends_share_the_cache():
    """The Triton / reference backends check meta in Python (lowbit/_checks.py) through the same
    cache: a tensor validated there is a hit for the C++ op, and an in-place write is seen by both."""
    from lowbit.backends import checked_reference

    W = make()
    x = torch.randn(2, 80)
    meta = W.meta.clone()
    reference = checked_reference("sparse24_mm")
    reference(x, W.values, meta, W.scale, None)
    mm(x, W, meta)
    reference(x, W.values, meta, W.scale, None)
    s = validation_cache_stats()
    assert (s.misses, s.hits) == (1, 2)
    corrupt(meta)
    with pytest.raises(ValueError, match=BAD):
        reference(x, W.values, meta, W.scale, None)
    with pytest.raises(ValueError, match=BAD):
        mm(x, W, meta)


def test_check_once_refuses_unknown_tags():
    from lowbit.validation_cache import check_once

    with pytest.raises(ValueError, match="unknown tag"):
        check_once(torch.zeros(2, dtype=torch.uint8), "no.such.check", lambda: None)
    calls = []
    t = torch.zeros(2, 2, dtype=torch.uint8)
    assert [check_once(t, "sparse24.meta", lambda: calls.append(1)) for _ in range(3)] == [False, True, True]
    assert calls == [1]
