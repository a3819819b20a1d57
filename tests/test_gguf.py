"""The real SmolLM2-135M GGUF from PyPI: streaming import equals transformers' own GGUF loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_surgery

# A plain English paragraph. Measured on it: perplexity 26 when converted correctly, 107 with llama.cpp's Q/K row
# permutation left in place, ~1600 with the words shuffled.
PARAGRAPH = (
    "The river runs through the middle of the old town, and in the summer children swim near the stone bridge. "
    "In the evening, families walk along the water and buy ice cream from a small shop that has been there for "
    "more than fifty years. The owner still makes every flavour by hand, and people come from nearby villages to "
    "taste it."
)


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smollm2"
    result = run_surgery("convert", smollm2_gguf, "-o", out)
    assert result.returncode == 0, result.stderr
    return out


def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_logits_equal_transformers_gguf_loading(smollm2_gguf, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()
    ours = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    reference_tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    assert torch.equal(ids, reference_tokenizer(PARAGRAPH, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    assert perplexity(ours, tokenizer, PARAGRAPH) < 40


def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf row permutation for Q and K (rotary halves → interleaved pairs)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def test_reader_undoes_llama_cpp_permutation(smollm2_gguf):
    import gguf

    from surgery.io import open_checkpoint

    raw = {t.name: t for t in gguf.GGUFReader(smollm2_gguf).tensors}

    def stored(name):
        return torch.from_numpy(gguf.quants.dequantize(raw[name].data, raw[name].tensor_type).copy())

    with open_checkpoint(smollm2_gguf) as ckpt:
        q, k, v = (ckpt.get(f"model.layers.7.self_attn.{p}_proj.weight") for p in "qkv")
        assert torch.equal(llama_cpp_permute(q, 9), stored("blk.7.attn_q.weight"))
        assert torch.equal(llama_cpp_permute(k, 3), stored("blk.7.attn_k.weight"))
        assert not torch.equal(q, stored("blk.7.attn_q.weight"))
        assert torch.equal(v, stored("blk.7.attn_v.weight"))  # V is stored as is
        assert torch.equal(ckpt.get("model.embed_tokens.weight"), stored("token_embd.weight"))


def test_converted_model_answers_sensibly(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system")  # the chat template came over from the GGUF metadata
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs.input_ids.shape[1]:])


def test_config_and_tensor_table(converted):
    config = json.loads((converted / "config.json").read_text())
    expected = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "tie_word_embeddings": True, "rope_theta": 100000.0}
    rope_theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    assert {**{k: config.get(k) for k in expected if k != "rope_theta"}, "rope_theta": rope_theta} == expected
    assert config["architectures"] == ["LlamaForCausalLM"]
    report = json.loads(run_surgery("inspect", converted, "--json").stdout)
    assert report["parameters"] == 134_515_008 and report["tied_embeddings"] is True
    assert report["roles"]["attn_q"] == 30 and report["roles"]["norm"] == 61


@pytest.mark.parametrize("damage", ["garbage", "truncated metadata", "truncated tensors"])
def test_unreadable_gguf_is_bad_input(damage, smollm2_gguf, tmp_path):
    bogus = tmp_path / "model.gguf"
    original = smollm2_gguf.read_bytes()
    bogus.write_bytes({
        "garbage": b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64,
        "truncated metadata": original[:3000],
        "truncated tensors": original[: len(original) // 2],
    }[damage])
    result = run_surgery("convert", bogus, "-o", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(bogus) in result.stderr
    assert not (tmp_path / "out").exists()
