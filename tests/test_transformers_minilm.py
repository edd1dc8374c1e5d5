"""The real all-MiniLM-L6-v2 (the report's default model, real weights) quantized by lowbit keeps
working through torch.compile (inductor, fullgraph) and through lowbit.save / lowbit.load into a
fresh instance. The tiny Llama tests (test_transformers_generate.py) cover generate(); this file
covers the real pretrained encoder that `lowbit report` measures."""

import copy

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import report


@pytest.fixture(scope="module")
def minilm_and_inputs(minilm):
    """The session's float MiniLM (conftest; never modified here: every test quantizes a deep
    copy) and four of its sentences."""
    model, halves = minilm
    return model, {k: v[:4] for k, v in halves[0].items()}


def _embed(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _compile_error_scale(model, inputs):
    """How far inductor's fused float kernels move this model's output (its rounding, not ours)."""
    eager = _embed(model, inputs)
    compiled = _embed(torch.compile(copy.deepcopy(model), fullgraph=True), inputs)
    return (compiled - eager).abs().max().item(), eager


def test_weight_only_int4_compiles_with_inductor_to_the_eager_result(minilm_and_inputs):
    model, inputs = minilm_and_inputs
    float_drift, _ = _compile_error_scale(model, inputs)
    quantized = lowbit.quantize(copy.deepcopy(model), "int4")
    eager = _embed(quantized, inputs)
    compiled = _embed(torch.compile(quantized, fullgraph=True), inputs)
    # Weight-only layers are deterministic functions of their input, so compiled and eager differ
    # only by inductor's float rounding in the surrounding ops: the float model's own drift, which
    # the quantized weights can amplify by at most a small factor (their norms match the float ones).
    assert (compiled - eager).abs().max().item() <= 8 * float_drift + 1e-6


def test_w8a8_compiles_exactly_without_fusion_and_keeps_its_quality_with_inductor(minilm_and_inputs):
    model, inputs = minilm_and_inputs
    _, float_out = _compile_error_scale(model, inputs)
    quantized = lowbit.quantize(copy.deepcopy(model), "int8")
    eager = _embed(quantized, inputs)
    # Without fusion the graph runs the same ops in the same order: bit-exact.
    assert torch.equal(_embed(torch.compile(quantized, fullgraph=True, backend="aot_eager"), inputs), eager)
    # Inductor fuses LayerNorm/GELU/softmax, moving activations by ~1e-6; dynamic per-token int8
    # quantization turns a value that sits on a rounding boundary into a one-step code change, so
    # the output is not bit-exact, but it must be as close to the float model as eager is.
    compiled = _embed(torch.compile(quantized, fullgraph=True), inputs)

    def cosine_to_float(out):
        return F.cosine_similarity(out.flatten(1), float_out.flatten(1)).min().item()

    assert cosine_to_float(compiled) >= cosine_to_float(eager) - 2e-3
    one_layer = quantized.encoder.layer[0].attention.self.query
    x = torch.randn(4, 9, one_layer.in_features)
    with torch.no_grad():
        assert torch.equal(torch.compile(one_layer, fullgraph=True)(x), one_layer(x))


@pytest.mark.parametrize("preset", ["int8", "int4"])
def test_save_and_load_into_a_fresh_minilm_is_bit_exact(tmp_path, minilm_and_inputs, preset):
    model, inputs = minilm_and_inputs
    quantized = lowbit.quantize(copy.deepcopy(model), preset)
    lowbit.save(quantized, tmp_path / preset)
    fresh = report.load_subject(None).model
    restored = lowbit.load(tmp_path / preset, fresh)
    assert torch.equal(_embed(restored, inputs), _embed(quantized, inputs))
