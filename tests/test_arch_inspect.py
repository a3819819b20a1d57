"""Architecture knowledge and `surgery inspect`, checked against transformers' own models."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from safetensors import safe_open

from conftest import TINY_CONFIGS, make_tiny_model, run_surgery
from surgery.arch import Architecture

ATTENTION_KINDS = {"attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv"}
MLP_KINDS = {"mlp_gate", "mlp_up", "mlp_down", "mlp_gate_up"}


def saved_names(directory):
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_tensor_of_known_families_has_a_role(model_type, tiny_checkpoints):
    model = make_tiny_model(model_type)
    arch = Architecture.from_config(json.loads((tiny_checkpoints[model_type] / "config.json").read_text()))
    assert arch.known
    roles = {name: arch.role(name) for name in saved_names(tiny_checkpoints[model_type])}
    assert not [name for name, role in roles.items() if role.kind == "other"]
    # each projection's role matches the module transformers built for it
    modules = dict(model.named_modules())
    for name, role in roles.items():
        module_name = name.rsplit(".", 1)[0]
        leaf = module_name.rsplit(".", 1)[-1]
        if role.kind in ATTENTION_KINDS | MLP_KINDS:
            assert type(modules[module_name]).__name__ == "Linear"
            assert leaf.startswith(role.kind.split("_", 1)[1]), (name, role)
        if role.kind == "norm":
            assert "norm" in type(modules[module_name]).__name__.lower(), name
        if role.layer is not None:
            assert modules[module_name] in list(model.model.layers[role.layer].modules())
    kinds = Counter(role.kind for role in roles.values())
    assert kinds["embedding"] == 1
    assert kinds["lm_head"] == (0 if model.config.tie_word_embeddings else 1)
    assert arch.tie_word_embeddings == model.config.tie_word_embeddings
    attention = model.model.layers[0].self_attn
    assert arch.head_dim == attention.head_dim
    assert arch.num_key_value_heads == model.config.num_key_value_heads
    assert arch.num_layers == len(model.model.layers)


def test_multimodal_gemma3_reads_text_config_and_separates_vision():
    from transformers import Gemma3Config

    config = Gemma3Config(text_config={"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                                       "head_dim": 32, "num_hidden_layers": 3}).to_dict()
    arch = Architecture.from_config(config)
    assert (arch.num_layers, arch.head_dim, arch.num_key_value_heads) == (3, 32, 1)
    assert arch.role("model.language_model.layers.2.self_attn.k_proj.weight").kind == "attn_k"
    assert arch.role("model.language_model.layers.2.self_attn.k_proj.weight").layer == 2
    vision = arch.role("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight")
    assert (vision.kind, vision.part, vision.layer) == ("attn_q", "vision", None)


def test_gpt2_conv1d_roles_are_known(tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=64))
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        arch = Architecture.from_config(json.loads((tmp_path / "config.json").read_text()))
    assert arch.known and caplog.text == ""
    roles = {name: arch.role(name) for name in saved_names(tmp_path)}
    assert roles["transformer.wte.weight"].kind == "embedding"
    assert roles["transformer.wpe.weight"].kind == "position_embedding"
    qkv = roles["transformer.h.1.attn.c_attn.weight"]
    assert (qkv.kind, qkv.layer, qkv.linear) == ("attn_qkv", 1, False)  # a Conv1D, which loaders do not replace
    assert roles["transformer.h.0.attn.c_proj.weight"].kind == "attn_o"
    assert roles["transformer.h.0.mlp.c_proj.weight"].kind == "mlp_down"
    assert roles["transformer.h.0.mlp.c_fc.weight"].kind == "mlp_up"
    assert roles["transformer.h.0.ln_1.weight"].kind == "norm" and roles["transformer.ln_f.bias"].kind == "norm"
    result = run_surgery("inspect", tmp_path)
    assert result.returncode == 0 and "unknown" not in result.stdout + result.stderr and "gpt2" in result.stdout


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_inspect_reports_what_transformers_sees(model_type, tiny_checkpoints):
    model = make_tiny_model(model_type)
    result = run_surgery("inspect", tiny_checkpoints[model_type], "--json", "--tensors")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert report["tied_embeddings"] == model.config.tie_word_embeddings
    assert report["architecture"]["rope"]["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert report["architecture"]["num_key_value_heads"] == model.config.num_key_value_heads
    assert report["dtypes"] == {"float32": {"tensors": len(report["tensors"]), "parameters": report["parameters"]}}
    listed = {row["name"]: row for row in report["tensors"]}
    state = model.state_dict()
    for name, row in listed.items():
        assert row["shape"] == list(state[name].shape)


def test_inspect_text_output(tiny_checkpoints):
    result = run_surgery("inspect", tiny_checkpoints["qwen2"])
    assert result.returncode == 0, result.stderr
    assert "Qwen2ForCausalLM" in result.stdout and "tied (no lm_head tensor)" in result.stdout
    assert result.stderr == ""
