"""A quantized transformers model keeps working through its own generate(), torch.compile and
lowbit.save/load (Llama built from its config: no download)."""

import copy

import pytest
import torch

import lowbit

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=256, vocab_size=300)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("preset", ["int8", "int8-weight", "int4", "fp8"])
def test_generate_save_load(tmp_path, preset):
    model = tiny_llama()
    quantized = lowbit.quantize(copy.deepcopy(model), preset)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        out = quantized.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :7], ids)

    lowbit.save(quantized, tmp_path / "q")
    restored = lowbit.load(tmp_path / "q", tiny_llama())
    with torch.no_grad():
        again = restored.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(again, out)
        assert torch.equal(restored(input_ids=ids).logits, quantized(input_ids=ids).logits)


def test_compiled_forward_matches_eager():
    quantized = lowbit.quantize(tiny_llama(), "int8")
    ids = torch.randint(0, 300, (1, 9))
    compiled = torch.compile(quantized, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids).logits, quantized(input_ids=ids).logits)
