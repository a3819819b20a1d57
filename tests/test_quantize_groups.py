"""surgery quantize with a group size that does not divide every module's input dimension (SmolLM2-135M's 576 at
128): a tiny llama with hidden size 96 and intermediate size 128 at --group-size 64. compressed-tensors: a second
config group at 32 for the modules of input 96, loaded by transformers + compressed-tensors with the decoded
weights' logits; GPTQ: one group size (32) for all, with a warning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import logits, make_tiny_model, run_surgery, save_tokenizer
from test_quantize import decode_compressed_tensors, dequantized_model_logits, numpy_rtn, unpack_lsb_first

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    source = root / "llama96"
    make_tiny_model("llama", hidden_size=96, intermediate_size=128).save_pretrained(source)
    save_tokenizer(source)
    outputs = {}
    for fmt in ("compressed-tensors", "gptq"):
        done = run_surgery("quantize", source, "-o", root / fmt, "--group-size", "64", "--format", fmt, "--json")
        assert done.returncode == 0, done.stderr
        outputs[fmt] = (root / fmt, json.loads(done.stdout), done.stderr)
    return source, outputs


def expected_group(module: str) -> int:
    return 64 if module.endswith("down_proj") else 32  # input 128 vs 96


def test_compressed_tensors_puts_undivided_modules_in_a_second_group(wide):
    source, outputs = wide
    out, summary, stderr = outputs["compressed-tensors"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {tuple(g["targets"]): g["weights"]["group_size"] for g in config["config_groups"].values()}
    assert groups.pop(("Linear",)) == 64
    (targets, size), = groups.items()
    assert size == 32 and len(targets) == len(ATTENTION + MLP_IN)
    assert summary["group_sizes"] == {"64": 2, "32": 12}
    assert summary["group_size_fallbacks"] == {"32": list(targets)}
    manifest = json.loads((out / "surgery.json").read_text())
    assert manifest["output"]["group_sizes"] == {"64": 2, "32": 12}
    assert "does not divide" in stderr
    weights, written = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    for layer in range(2):
        for part in ATTENTION + MLP_IN + ("mlp.down_proj",):
            module = f"model.layers.{layer}.{part}"
            group = expected_group(module)
            weight = weights[f"{module}.weight"]
            q, scale, _ = numpy_rtn(weight.float().numpy(), 4, group, True, weight.dtype)
            got_q, got_scale, _ = decode_compressed_tensors(written, module, 4, True)
            assert got_scale.shape[1] * group == q.shape[1], module
            assert np.array_equal(got_q, q) and np.array_equal(got_scale, scale), module


def test_transformers_loads_the_two_group_output_with_the_decoded_logits(wide):
    source, outputs = wide
    out = outputs["compressed-tensors"][0]
    ids = torch.tensor([[1, 5, 9, 13, 40, 77, 100, 3]])
    loaded = logits(out, ids, dtype=torch.float32)
    assert torch.allclose(loaded, dequantized_model_logits(source, out, ids), atol=1e-4, rtol=1e-4)
    report = json.loads(run_surgery("verify", out, "--reference", source, "--tokens", "16", "--json").stdout)
    assert {layer["module"]: layer["group_size"] for layer in report["layers"]} == {
        layer["module"]: expected_group(layer["module"]) for layer in report["layers"]}
    assert report["worst_output_rel_error"] < 0.2


def test_gptq_lowers_the_one_group_size_with_a_warning(wide):
    source, outputs = wide
    out, summary, stderr = outputs["gptq"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["group_size"] == 32 and summary["group_sizes"] == {"32": 14}
    assert "does not divide" in stderr
    written, weights = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    module = "model.layers.1.mlp.down_proj"
    q = unpack_lsb_first(written[f"{module}.qweight"].numpy().T, 4) - 8
    want, _, _ = numpy_rtn(weights[f"{module}.weight"].float().numpy(), 4, 32, True, torch.float16)
    assert np.array_equal(q, want)
