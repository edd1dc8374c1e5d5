"""Binarized modules: the STE, training-to-packed conversion, BinaryLinear/BinaryConv2d, presets, save/load."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.formats import binary as fmt
from lowbit.nn import BinarizedConv2d, BinarizedLinear, BinaryConv2d, BinaryLinear
from lowbit.nn import binary as lbin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- STE
def test_sign_ste_forward_and_gradient_match_the_definition():
    x = torch.tensor([-3.0, -1.0, -0.999, -0.0, 0.0, 0.5, 1.0, 1.001, 7.0], requires_grad=True)
    y = lbin.sign_ste(x)
    assert y.tolist() == [-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    upstream = torch.arange(1.0, 10.0)
    y.backward(upstream)
    # d sign / dx := 1 where |x| <= 1 (boundary included), else 0, times the upstream gradient
    expected = upstream * torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0.0])
    assert torch.equal(x.grad, expected)


def test_sign_ste_gradient_on_random_tensor():
    x = (torch.randn(5, 33) * 1.5).requires_grad_()
    g = torch.randn(5, 33)
    lbin.sign_ste(x).backward(g)
    assert torch.equal(x.grad, torch.where(x.detach().abs() <= 1, g, torch.zeros_like(g)))


def test_binarized_linear_weight_gradient_flows_through_ste_and_beta():
    layer = BinarizedLinear(8, 3, bias=False, binary_activations=False)
    x = torch.randn(4, 8)
    layer(x).sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    beta = w.abs().mean(1)
    ref = ((x @ lbin.sign_ste(w).T) * beta).sum()
    ref.backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("binary_activations", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K", [1, 33, 300])
def test_binarized_linear_to_packed_is_identical(binary_activations, bias, K):
    layer = BinarizedLinear(K, 19, bias, binary_activations)
    packed = BinaryLinear.from_float(layer)
    assert packed.binary_activations == binary_activations
    x = torch.randn(2, 5, K)
    with torch.no_grad():
        assert torch.equal(layer(x), packed(x))


@pytest.mark.parametrize("binary_activations", [True, False])
@pytest.mark.parametrize("cfg", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2, bias=False),
                                 dict(kernel_size=3, dilation=2, padding=2, stride=(1, 2))])
def test_binarized_conv_to_packed_is_identical(binary_activations, cfg):
    conv = BinarizedConv2d(5, 7, binary_activations=binary_activations, **cfg)
    packed = BinaryConv2d.from_float(conv)
    x = torch.randn(2, 5, 9, 11)
    with torch.no_grad():
        y = conv(x)
        assert torch.equal(y, packed(x))
    # The binarized conv is a convolution of the binarized input with beta * sign(w) (plus bias) when
    # activations are float, checked against F.conv2d.
    if not binary_activations:
        w = conv.weight.detach()
        wb = fmt.binarize(w) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
        ref = F.conv2d(x, wb, conv.bias, conv.stride, conv.padding, conv.dilation)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_binary_linear_matches_xnor_definition():
    lin = nn.Linear(70, 12)
    m = BinaryLinear.from_float(lin)
    x = torch.randn(6, 70)
    w = lin.weight.detach()
    expected = ((fmt.binarize(x) @ fmt.binarize(w).T) * x.abs().mean(1, keepdim=True) * w.abs().mean(1)
                + lin.bias.detach())
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    assert m.bits_per_weight() == fmt.bits_per_weight(12, 70)
    torch.testing.assert_close(m.dequantize(), fmt.binarize(w) * w.abs().mean(1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_binary_linear_half_dtypes(dtype):
    lin = nn.Linear(40, 8).to(dtype)
    m = BinaryLinear.from_float(lin)
    x = torch.randn(3, 40).to(dtype)
    y = m(x)
    assert y.dtype == dtype and m.bias.dtype == dtype and m.scale.dtype == torch.float32


def test_modules_keep_float32_scales_under_half():
    lin = BinaryLinear.from_float(nn.Linear(40, 8)).half()
    conv = BinaryConv2d.from_float(nn.Conv2d(3, 4, 3)).to(torch.bfloat16)
    assert lin.scale.dtype == conv.scale.dtype == torch.float32
    assert lin.bias.dtype == torch.float16 and conv.bias.dtype == torch.bfloat16
    assert lin(torch.randn(2, 40).half()).dtype == torch.float16
    assert conv(torch.randn(1, 3, 5, 5).to(torch.bfloat16)).dtype == torch.bfloat16


def test_binary_linear_rejects_wrong_width():
    m = BinaryLinear.from_float(nn.Linear(40, 8))
    with pytest.raises(ValueError, match=r"input must have shape \[..., 40\]"):
        m(torch.randn(3, 41))


def test_binarize_for_training_keeps_first_and_last():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 16),
                          nn.Linear(16, 3))
    lbin.binarize_for_training(model)
    assert [type(m).__name__ for m in model] == ["Conv2d", "BinarizedConv2d", "Flatten", "BinarizedLinear", "Linear"]
    every = lbin.binarize_for_training(copy.deepcopy(model), keep_first_last=False)
    assert type(every[0]) is BinarizedConv2d and type(every[4]) is BinarizedLinear


# ----------------------------------------------------------------------------- presets, compile, save
def _mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48),
                         nn.Linear(48, 5))


def test_preset_binary_keeps_first_and_last_layers_float():
    model = lowbit.quantize(_mlp(), "binary")
    assert [type(model[i]).__name__ for i in (0, 2, 4, 5)] == ["Linear", "BinaryLinear", "BinaryLinear", "Linear"]
    assert model[2].binary_activations
    report = lowbit.last_report()
    assert sorted(report.excluded) == ["0", "5"]
    every = lowbit.quantize(_mlp(), lowbit.BinaryConfig(keep_first_last=False, binary_activations=False))
    assert all(type(every[i]) is BinaryLinear and not every[i].binary_activations for i in (0, 2, 4, 5))
    weight_only = lowbit.quantize(_mlp(), "binary-weight")
    assert not weight_only[2].binary_activations


def test_config_round_trips_through_dict():
    cfg = lowbit.BinaryConfig(binary_activations=False, keep_first_last=False)
    assert lowbit.configs.Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("binary_activations", [True, False])
def test_torch_compile_fullgraph(binary_activations):
    lin = BinaryLinear.from_float(nn.Linear(70, 9), binary_activations=binary_activations)
    conv = BinaryConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), binary_activations=binary_activations)
    x, img = torch.randn(5, 70), torch.randn(2, 3, 6, 6)
    for module, inp in ((lin, x), (conv, img)):
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(inp), module(inp), rtol=0, atol=0)


def test_save_load_round_trip(tmp_path):
    model = lowbit.quantize(_mlp(), "binary")
    x = torch.randn(4, 32)
    y = model(x)
    lowbit.save(model, tmp_path)
    fresh = lowbit.load(tmp_path, _mlp())
    assert type(fresh[2]) is BinaryLinear and fresh[2].binary_activations
    assert torch.equal(fresh(x), y)


def test_load_rejects_bad_packed_width(tmp_path):
    from safetensors.torch import load_file, save_file

    model = lowbit.quantize(_mlp(), "binary")
    lowbit.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["2.scale"] = torch.full_like(tensors["2.scale"], float("nan"))
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="inf or NaN"):
        lowbit.load(tmp_path, _mlp())


# ----------------------------------------------------------------------------- the example
def test_digits_example_reduced_run():
    spec = importlib.util.spec_from_file_location("binary_digits", os.path.join(ROOT, "examples", "binary_digits.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = example.main(epochs=6, hidden=128, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert result["identical"]
    assert result["packed_acc"] == result["latent_acc"]
    # Full run (40 epochs, width 256) reaches ~0.97; six epochs at width 128 already clear 0.9.
    assert result["packed_acc"] >= 0.9
    assert any(isinstance(m, BinaryLinear) for m in result["packed"].modules())
