"""lowbit.compress.compressed_size: every tensor counted once, in the form it is stored."""

import torch
from torch import nn

import lowbit
from lowbit.compress import compressed_size, magnitude_prune, remove
from lowbit.compress.decompose import decompose_convs


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 64),
                         nn.Linear(64, 10))


def test_float_model_counts_every_tensor_once():
    m = _net()
    rep = compressed_size(m)
    every = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    assert rep.total_bytes == every
    assert [r["name"] for r in rep.rows] == ["0", "3", "4"]


def test_pruned_weights_stored_as_bitmap_plus_nonzeros():
    m = _net()
    magnitude_prune(m, 0.9, scope="layer")
    rep = compressed_size(m)
    row = next(r for r in rep.rows if r["name"] == "3")
    assert row["nonzero"] == 64 * 128 - round(0.9 * 64 * 128)
    assert row["bytes"] == (64 * 128) // 8 + 4 * row["nonzero"]
    assert rep.total_bytes == compressed_size(remove(m)).total_bytes  # the mask itself is not extra


def test_quantized_and_decomposed_layers():
    m = _net()
    decompose_convs(m, "tucker", ranks=(4, 2))
    lowbit.quantize(m, "int8")
    rep = compressed_size(m)
    kinds = {r["name"]: r["kind"] for r in rep.rows}
    # lowbit.quantize lowers the Tucker core (a k x k conv) to the int8 GEMM as well.
    assert kinds["0.first.linear"] == kinds["0.core.linear"] == kinds["0.last.linear"] == kinds["3"] == "int8"
    lin = m[3]
    assert next(r for r in rep.rows if r["name"] == "3")["bytes"] == lin.weight_nbytes()
    every = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    assert rep.total_bytes == every  # dense int8 + scales + float rest: nothing double counted
