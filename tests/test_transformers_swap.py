"""Swapping the linear layers of real transformers architectures (built from tiny configs, no
download) and checking what the swapped model computes.

Two checks per model and scheme:
* the swap is exact: the quantized model equals the float model with the same quantization
  emulated in float (weights replaced by their dequantized int8 values, and for W8A8 each
  layer input fake-quantized per token with lowbit.quant.affine), to float32 rounding;
* the quantization noise is what int8 should give: SQNR of the logits against the float model.
"""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Int8Linear, Int8WeightOnlyLinear
from lowbit.quant import affine

transformers = pytest.importorskip("transformers")

VOCAB = 1000


def sqnr(reference, out):
    reference, out = reference.double(), out.double()
    return (10 * torch.log10(reference.pow(2).sum() / (reference - out).pow(2).sum())).item()


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=512, vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert():
    config = transformers.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=512, vocab_size=VOCAB)
    return transformers.BertForMaskedLM(config).eval()


def emulate(model, names, activations):
    """`model` with the int8 quantization of the layers `names` done in float."""
    model = copy.deepcopy(model)
    for name in names:
        linear = model.get_submodule(name)
        # A new Parameter, not an in-place copy: BERT's decoder shares its weight with the word
        # embedding, which quantize() leaves float.
        linear.weight = nn.Parameter(affine.fake_quantize(linear.weight.detach(), 8), requires_grad=False)
        if activations:
            linear.register_forward_pre_hook(lambda m, args: (affine.fake_quantize(args[0], 8),))
    return model


# Per-layer int8 noise on these random-init models is ~40 dB (W8A8) / ~43 dB (weight-only);
# 15 quantized layers in series add up. Measured on seeds 0-3: Llama 32.0-33.3 dB (W8A8) and
# 34.6-36.3 dB (weight-only); BERT 35.9-36.1 and 39.4-40.0 dB. The swap itself is checked
# exactly by the emulation test, so these bounds only guard the noise level.
MODELS = {
    "llama": (tiny_llama, {"int8": 30.0, "int8-weight": 33.0}, 15),
    "bert": (tiny_bert, {"int8": 35.0, "int8-weight": 38.0}, 14),
}
SCHEMES = {"int8": Int8Linear, "int8-weight": Int8WeightOnlyLinear}


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    out = {}
    for name, (make, _, _) in MODELS.items():
        model = make()
        ids = torch.randint(0, VOCAB, (2, 16))
        with torch.no_grad():
            out[name] = (model, ids, model(input_ids=ids).logits)
    return out


@pytest.mark.parametrize("preset", list(SCHEMES))
@pytest.mark.parametrize("arch", list(MODELS))
def test_swap(built, arch, preset):
    model, ids, expected = built[arch]
    _, min_db, n_linear = MODELS[arch]
    q = lowbit.quantize(copy.deepcopy(model), preset)
    report = q._lowbit_report
    assert len(report.converted) == n_linear and not report.skipped
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert all(type(q.get_submodule(n)) is SCHEMES[preset] for n, _ in report.converted)
    with torch.no_grad():
        logits = q(input_ids=ids).logits
        emulated = emulate(model, [n for n, _ in report.converted], preset == "int8")(input_ids=ids).logits
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == torch.float32
    # Exactness of the swap: measured 124-132 dB; an activation code that flips on a float32
    # rounding difference would cost far less than 60 dB, while any real slip (one channel's scale,
    # a bias, a missed layer) costs far more.
    assert sqnr(emulated, logits) >= 60
    assert sqnr(expected, logits) >= min_db[preset]
    s = lowbit.summary(q)
    assert len(s.rows) == n_linear and 3.7 < s.compression < 4.0


def test_weight_only_is_closer_than_w8a8(built):
    model, ids, expected = built["llama"]
    with torch.no_grad():
        db = {p: sqnr(expected, lowbit.quantize(copy.deepcopy(model), p)(input_ids=ids).logits) for p in SCHEMES}
    assert db["int8-weight"] > db["int8"] + 1.5


def test_bf16_llama():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        q = lowbit.quantize(copy.deepcopy(model).to(torch.bfloat16), "int8")
        logits = q(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    assert all(m.scale.dtype == torch.float32 for m in q.modules() if isinstance(m, Int8Linear))
    # Against the float32 model: measured 32.8 dB (the bf16 float model alone gives 43 dB).
    assert sqnr(expected, logits) >= 30


@pytest.mark.parametrize("arch", list(MODELS))
def test_compile_fullgraph(built, arch):
    # The whole HF model traces in one graph (aot_eager: this CPU is too slow for inductor on a
    # full model within the suite's time budget; tests/test_nn_int8.py runs inductor on a block).
    model, ids, _ = built[arch]
    q = lowbit.quantize(copy.deepcopy(model), "int8")
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, q(input_ids=ids).logits, rtol=0, atol=0)


# INT4 (group-wise weight-only). The swap must equal the float model with each weight replaced
# by its dequantized int4 value. Noise floors: measured on seeds 0-2, group 128 asymmetric gives
# 11.7-13.1 dB (Llama) and 16.5-16.9 dB (BERT) on these random-init models, group 32 gives
# 13.9-14.3 / 18.3-18.4 dB: below the 20 dB that trained models are expected to reach, which
# is why the bounds here only guard against regressions (see the INT4 issue's notes).
INT4_FLOORS = {("llama", "int4"): 11.0, ("llama", "int4-g32"): 13.0, ("bert", "int4"): 15.5, ("bert", "int4-g32"): 17.5}


@pytest.mark.parametrize("arch,preset", list(INT4_FLOORS))
def test_int4_swap_equals_dequantized_weights(built, arch, preset):
    from lowbit.nn import Int4Linear

    model, ids, expected = built[arch]
    quantized = lowbit.quantize(copy.deepcopy(model), preset)
    swapped = {name: m for name, m in quantized.named_modules() if isinstance(m, Int4Linear)}
    assert len(swapped) == MODELS[arch][2]
    emulated = copy.deepcopy(model)
    for name, m in swapped.items():
        emulated.get_submodule(name).weight = nn.Parameter(m.dequantize(torch.float32), requires_grad=False)
    with torch.no_grad():
        logits = quantized(input_ids=ids).logits
        reference = emulated(input_ids=ids).logits
    assert sqnr(reference, logits) >= 60
    assert sqnr(expected, logits) >= INT4_FLOORS[(arch, preset)]
