"""Slices: layer ranges stacked or cut (frankenmerges) and merged slice by slice, as mergekit's ``slices``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_surgery
from merge_helpers import assert_same_as_mergekit, read_numpy, save_family

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> dict[str, list[Path]]:
    """Four-layer families: llama (base + 2 fine-tunes) and gemma3_text (base + 1) with explicit layer types."""
    root = tmp_path_factory.mktemp("deep")
    return {"llama": save_family(root, "llama", 2, num_hidden_layers=4),
            "gemma3_text": save_family(root, "gemma3_text", 1, num_hidden_layers=4, layer_types=LAYER_TYPES)}


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def layer_name(name: str, layer: int) -> str:
    parts = name.split(".")
    parts[2] = str(layer)  # model.layers.N.…
    return ".".join(parts)


def test_passthrough_stacks_layer_ranges_into_a_loadable_model(deep, tmp_path):
    a, b, _ = deep["llama"]
    recipe = write_yaml(tmp_path / "stack.yml", {"method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
    ]})
    result = run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours, first, second = read_numpy(tmp_path / "out"), read_numpy(a), read_numpy(b)
    # output layers 0-2 are a's layers 0-2, output layers 3-5 are b's layers 1-3; embeddings from the first
    # slice's model, the final norm and lm_head from the last's
    expected = {}
    for name, value in first.items():
        if ".layers." not in name:
            expected[name] = value if "embed_tokens" in name else second[name]
    for out_layer, (source, layer) in enumerate([(first, 0), (first, 1), (first, 2), (second, 1), (second, 2),
                                                 (second, 3)]):
        for name in first:
            if name.startswith("model.layers.0."):
                expected[layer_name(name, out_layer)] = source[layer_name(name, layer)]
    assert ours.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(ours[name], expected[name], err_msg=name)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_layer_types_follow_their_layers(deep, tmp_path):
    a, b = deep["gemma3_text"]
    recipe = write_yaml(tmp_path / "cut.yml", {"method": "slerp", "base": str(a), "parameters": {"t": 0.3},
                                               "slices": [
        {"sources": [{"model": str(a), "layer_range": [1, 3]}, {"model": str(b), "layer_range": [1, 3]}]},
        {"sources": [{"model": str(a), "layer_range": [0, 1]}, {"model": str(b), "layer_range": [2, 3]}]},
    ]})
    result = run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["layer_types"] == [LAYER_TYPES[1], LAYER_TYPES[2], LAYER_TYPES[0]]
    # output layer 2 is the slerp of a's layer 0 and b's layer 2
    ours, first, second = read_numpy(tmp_path / "out"), read_numpy(a), read_numpy(b)
    name = "model.layers.2.mlp.up_proj.weight"
    v0, v1 = first["model.layers.0.mlp.up_proj.weight"], second["model.layers.2.mlp.up_proj.weight"]
    cos = float((v0 * v1).sum() / np.linalg.norm(v0) / np.linalg.norm(v1))
    theta = np.arccos(cos)
    expected = (np.sin(0.7 * theta) * v0 + np.sin(0.3 * theta) * v1) / np.sin(theta)
    np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-5)
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def mergekit_slices(base: Path, ft: list[Path]) -> dict[str, dict]:
    b, m1, m2 = str(base), str(ft[0]), str(ft[1])
    return {
        "passthrough": {"slices": [{"sources": [{"model": b, "layer_range": [0, 3]}]},
                                   {"sources": [{"model": m1, "layer_range": [2, 4]}]},
                                   {"sources": [{"model": m2, "layer_range": [0, 1]}]}]},
        "ties": {"base_model": b, "parameters": {"density": 0.3, "weight": [0.2, 1.0]}, "slices": [
            {"sources": [{"model": b, "layer_range": [0, 2]}, {"model": m1, "layer_range": [0, 2]},
                         {"model": m2, "layer_range": [2, 4], "parameters": {"density": 0.6}}],
             "parameters": {"lambda": 0.8}},
            {"sources": [{"model": b, "layer_range": [1, 4]}, {"model": m1, "layer_range": [1, 4]},
                         {"model": m2, "layer_range": [0, 3]}]}]},
    }


@pytest.mark.parametrize("method", ["passthrough", "ties"])
def test_slices_match_mergekit(method, deep, tmp_path):
    base, *fine_tunes = deep["llama"]
    config = {"merge_method": method, "dtype": "float32", **mergekit_slices(base, fine_tunes)[method]}
    assert_same_as_mergekit(config, tmp_path, method)
    layers = json.loads((tmp_path / "surgery" / "config.json").read_text())["num_hidden_layers"]
    assert layers == json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"]


@pytest.mark.parametrize("slices,message", [
    ([{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 3]}]}],
     "slice 0: every source needs the same number of layers"),
    ([{"sources": [{"model": "A", "layer_range": [2, 5]}, {"model": "B", "layer_range": [0, 3]}]}],
     "slice 0: layer_range [2, 5] of {A} goes past its 4 layers"),
    ([{"sources": [{"model": "B", "layer_range": [0, 2]}, {"model": "C", "layer_range": [0, 2]}]}],
     "slice 0: the base {A} is not among its sources"),
    ([{"sources": [{"model": "A", "layer_range": [2, 1]}]}], "layer_range [2, 1] of {A}: expected [start, end)"),
])
def test_bad_slices_are_one_line_errors(deep, tmp_path, slices, message):
    a, b, c = deep["llama"]
    names = {"A": str(a), "B": str(b), "C": str(c)}
    for part in slices:
        for source in part["sources"]:
            source["model"] = names[source["model"]]
    recipe = write_yaml(tmp_path / "bad.yml", {"method": "ties", "base": str(a), "slices": slices})
    result = run_surgery("merge", "--recipe", recipe, "-o", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    message = message.replace("{A}", names["A"])
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
