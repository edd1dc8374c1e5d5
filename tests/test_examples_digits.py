"""The reduced digits CNN run (examples/digits_cnn.py --fast): every row is produced, and the
numbers are those of a working pipeline (the full run's are in docs/qat.md)."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.py"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny layers: per-op OpenMP synchronisation costs more than a second thread saves.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_digits_cnn_fast():
    spec = importlib.util.spec_from_file_location("digits_cnn", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = mod.run(fast=True, verbose=False)
    one = 1 / 400  # one test image
    assert results["fp32"] > 0.88
    # folding is exact up to rounding: at most one borderline prediction may flip
    assert abs(results["fp32, BN folded"] - results["fp32"]) <= one
    assert results["PTQ int8 (W8A8 dynamic)"] >= results["fp32"] - 4 * one
    for key in ("PTQ int4 (g32, weight-only)", "QAT int4 (g32, LSQ)", "QAT int4 (g128, LSQ)",
                "QAT int8 -> int4 stepped (g128, LSQ)"):
        assert results[key] > 0.8, key
    # the families' QAT rows are all present in this lowbit (binary, 2:4, codebook fake quantizers)
    assert results["fp32 (Hardtanh variant)"] > 0.8
    assert results["QAT binary (W1A1 XNOR, Hardtanh variant)"] > 0.5  # chance is 0.1
    for key in ("QAT binary weights (W1, float activations)", "QAT codebook (k-means 4-bit)"):
        assert results[key] > 0.8, key
    # 2:4 prunes half of every 3x3 kernel; the reduced run fine-tunes only 4 epochs
    for key in ("QAT 2:4 sparse (fp32 values)", "QAT 2:4 sparse + int8 (W8A8)"):
        assert results[key] > 0.7, key
    assert "model" in mod.table(results)
