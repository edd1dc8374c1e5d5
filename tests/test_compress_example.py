"""examples/compress_digits.py, reduced (few epochs): every technique runs end to end on real
data and lands where a working implementation must."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_compress_digits_quick():
    path = Path(__file__).resolve().parents[1] / "examples" / "compress_digits.py"
    spec = importlib.util.spec_from_file_location("compress_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = {r["name"].strip(" ."): r for r in mod.run(quick=True, log=lambda *a: None)}
    base = rows["fp32 baseline"]
    assert base["acc"] > 0.9  # 10 classes: chance is 0.1
    for name, r in rows.items():
        assert r["bytes"] <= base["bytes"] * 1.01, name
        # a few epochs of training: every compressed model still classifies far above chance
        assert r["acc"] > 0.6 or "width 0.25" in name, (name, r["acc"])
    assert rows["int8 (lowbit.quantize, Linear layers)"]["acc"] >= base["acc"] - 0.02
    assert rows["magnitude-pruned 80 % + fine-tune"]["ratio"] > 3
    assert rows["+ int8 + Huffman"]["bytes"] < rows["magnitude-pruned 80 % + fine-tune"]["bytes"] / 2
    assert "|" in mod.markdown(list(rows.values()))
