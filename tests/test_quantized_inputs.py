"""Quantized checkpoints as inputs: every command that reads a model sees the weights they stand for.

compressed-tensors outputs (each preset), GPTQ (v1, act-order ``g_idx``, v2) and DeepSeek-V3's FP8 layout (written
here from its formula) go through ``surgery convert`` to a plain model, whose logits must equal those transformers
computes loading the quantized checkpoint itself (its own decoders: compressed-tensors', FineGrainedFP8's); GPTQ's
act-order and v2 variants, and AutoAWQ's GEMM layout (packed here in its interleaved order), are checked against a
decode written here. ``quantize`` and ``merge`` read them decoded.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import awq_words, make_tiny_model, run_surgery, save_awq, save_deepseek_fp8, save_tokenizer
from test_quantize import unpack_lsb_first

TOKENS = torch.tensor([[1, 5, 9, 13, 40, 77, 3, 99]])
A16_PRESETS = ["W4A16", "W4A16_ASYM", "W8A16", "NVFP4A16", "MXFP4A16"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "llama"
    make_tiny_model("llama", hidden_size=128, intermediate_size=256).to(torch.bfloat16).save_pretrained(path)
    save_tokenizer(path)
    return path


def tensors_in(directory) -> dict[str, torch.Tensor]:
    return {name: tensor for path in sorted(directory.glob("*.safetensors"))
            for name, tensor in load_file(str(path)).items()}


def transformers_logits(directory, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(TOKENS).logits.float()


def converted(quantized, destination):
    """``surgery convert`` of a quantized checkpoint: a plain model, checked to hold the source's names only."""
    done = run_surgery("convert", quantized, "-o", destination)
    assert done.returncode == 0, done.stderr
    assert "quantization_config" not in json.loads((destination / "config.json").read_text())
    return destination


@pytest.mark.parametrize("preset", A16_PRESETS)
def test_a_compressed_tensors_input_is_the_model_transformers_loads(preset, source, tmp_path):
    from transformers import CompressedTensorsConfig

    quantized = tmp_path / preset
    assert run_surgery("quantize", source, "-o", quantized, "--preset", preset).returncode == 0
    plain = converted(quantized, tmp_path / "plain")
    assert tensors_in(plain).keys() == tensors_in(source).keys()
    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if preset == "W4A16_ASYM" else {}
    torch.testing.assert_close(transformers_logits(plain), transformers_logits(quantized, **options), atol=0, rtol=0)
    assert not torch.equal(transformers_logits(plain), transformers_logits(source))  # it is the quantized model


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8_BLOCK"])
def test_an_fp8_input_decodes_to_fp8_times_its_scales(preset, source, tmp_path):
    quantized = tmp_path / preset
    assert run_surgery("quantize", source, "-o", quantized, "--preset", preset).returncode == 0
    plain, stored = tensors_in(converted(quantized, tmp_path / "plain")), tensors_in(quantized)
    name = "model.layers.1.mlp.down_proj"
    scale = stored[f"{name}.weight_scale"].float()
    if preset == "FP8_BLOCK":
        scale = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
    want = (stored[f"{name}.weight"].float() * scale).to(torch.bfloat16)
    assert torch.equal(plain[f"{name}.weight"], want)


def test_deepseek_fp8_is_read_as_transformers_reads_it(source, tmp_path):
    deepseek = save_deepseek_fp8(source, tmp_path / "deepseek-fp8")
    plain = converted(deepseek, tmp_path / "plain")
    assert tensors_in(plain).keys() == tensors_in(source).keys()
    torch.testing.assert_close(transformers_logits(plain), transformers_logits(deepseek), atol=0, rtol=0)
    # quantize and merge read it decoded: the same bytes as from the plain model
    for target, origin in (("q-from-fp8", deepseek), ("q-from-plain", plain)):
        assert run_surgery("quantize", origin, "-o", tmp_path / target, "--preset", "W4A16").returncode == 0
    from_fp8, from_plain = tensors_in(tmp_path / "q-from-fp8"), tensors_in(tmp_path / "q-from-plain")
    assert from_fp8.keys() == from_plain.keys()
    assert all(torch.equal(from_fp8[name], from_plain[name]) for name in from_fp8)
    done = run_surgery("merge", deepseek, source, "--method", "linear", "-o", tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    merged, decoded, original = tensors_in(tmp_path / "merged"), tensors_in(plain), tensors_in(source)
    name = "model.layers.0.self_attn.q_proj.weight"
    want = ((decoded[name].float() + original[name].float()) / 2).to(torch.bfloat16)
    torch.testing.assert_close(merged[name], want, atol=1e-2, rtol=0)
    # and verify compares it with its bf16 original, as it would DeepSeek-V3 with its bf16 weights
    done = run_surgery("verify", deepseek, "--reference", source, "--tokens", "16", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "fp8-block"


def pack_lsb_first(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of test_quantize's unpack_lsb_first along the last axis: (rows, n) → int32 (rows, n·b/32)."""
    per_word = 32 // bits
    grouped = values.astype(np.uint64).reshape(values.shape[0], -1, per_word)
    words = sum(grouped[..., i] << np.uint64(bits * i) for i in range(per_word))
    return words.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("variant", ["act-order", "v2"])
def test_gptq_act_order_and_v2_inputs_decode_by_their_g_idx_and_zero_points(variant, source, tmp_path):
    quantized = tmp_path / "gptq"
    done = run_surgery("quantize", source, "-o", quantized, "--format", "gptq", "--scheme", "asym",
                       "--group-size", "32")
    assert done.returncode == 0, done.stderr
    tensors = tensors_in(quantized)
    config = json.loads((quantized / "config.json").read_text())
    rng = np.random.default_rng(0)
    for module in [name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")]:
        if variant == "act-order":  # each input column to a random group (the order desc_act quantized them in)
            columns = tensors[f"{module}.g_idx"].shape[0]
            tensors[f"{module}.g_idx"] = torch.from_numpy(rng.permutation(np.arange(columns) // 32).astype(np.int32))
        else:  # v2 stores the zero points themselves, not zero − 1
            zeros = unpack_lsb_first(tensors[f"{module}.qzeros"].numpy(), 4) + 1
            tensors[f"{module}.qzeros"] = torch.from_numpy(pack_lsb_first(zeros & 15, 4))
    if variant == "v2":
        config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (quantized / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    decoded = tensors_in(converted(quantized, tmp_path / "plain"))
    for module in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        q = unpack_lsb_first(tensors[f"{module}.qweight"].numpy().T, 4)  # (out, in), unsigned
        zero = unpack_lsb_first(tensors[f"{module}.qzeros"].numpy(), 4)[:, :q.shape[0]].T + (variant != "v2")
        scale = tensors[f"{module}.scales"].float().numpy().T
        group = tensors[f"{module}.g_idx"].numpy()
        want = (q - zero[:, group]) * scale[:, group]
        got = decoded[f"{module}.weight"].float().numpy()
        np.testing.assert_array_equal(got, torch.from_numpy(want.astype(np.float32)).to(torch.bfloat16).float())


@pytest.mark.parametrize("quantization", [None, {"quant_method": "bitsandbytes", "load_in_4bit": True}])
def test_quantized_tensors_no_reader_decodes_are_refused_not_copied(quantization, source, tmp_path):
    deepseek = save_deepseek_fp8(source, tmp_path / "deepseek-fp8")
    config = json.loads((deepseek / "config.json").read_text())
    config.pop("quantization_config")
    if quantization:
        config["quantization_config"] = quantization
    (deepseek / "config.json").write_text(json.dumps(config))
    for command in (["convert", deepseek, "-o", tmp_path / "out"],
                    ["merge", deepseek, source, "--method", "linear", "-o", tmp_path / "out"]):
        done = run_surgery(*command)
        assert done.returncode == 2 and "is quantized, but its config.json's quantization_config" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def autoawq_unpack(words: np.ndarray) -> np.ndarray:
    """AutoAWQ's unpack_awq + reverse_awq_order (AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]), restated."""
    fields = ((words.view(np.uint32)[:, :, None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 15).reshape(len(words), -1)
    return fields[:, np.arange(fields.shape[1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)]


def test_awq_gemm_inputs_decode_in_its_interleaved_column_order(source, tmp_path):
    values = np.random.default_rng(1).integers(0, 16, (3, 64))
    assert np.array_equal(autoawq_unpack(awq_words(values)), values)  # the packing here is the one AutoAWQ reads
    weights = save_awq(source, tmp_path / "awq")
    plain = tensors_in(converted(tmp_path / "awq", tmp_path / "plain"))
    assert plain.keys() == tensors_in(source).keys()
    for name, want in weights.items():
        assert torch.equal(plain[name], torch.from_numpy(want.astype(np.float32)).to(torch.bfloat16)), name
    # quantize and merge read it decoded, as from the plain model
    for target, origin in (("q-from-awq", tmp_path / "awq"), ("q-from-plain", tmp_path / "plain")):
        assert run_surgery("quantize", origin, "-o", tmp_path / target, "--preset", "W4A16").returncode == 0
    from_awq, from_plain = tensors_in(tmp_path / "q-from-awq"), tensors_in(tmp_path / "q-from-plain")
    assert from_awq.keys() == from_plain.keys() and all(torch.equal(from_awq[n], from_plain[n]) for n in from_awq)


@pytest.mark.parametrize("change, message", [
    ({"version": "gemv"}, "version 'gemv'"), ({"bits": 3}, "bits 3"), ({"zero_point": False}, "zero_point False")])
def test_awq_layouts_not_read_are_refused_in_one_line(change, message, source, tmp_path):
    save_awq(source, tmp_path / "awq")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "awq" / "config.json").write_text(json.dumps(config))
    done = run_surgery("convert", tmp_path / "awq", "-o", tmp_path / "out")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_awq_is_not_an_output_format(source, tmp_path):
    done = run_surgery("quantize", source, "-o", tmp_path / "out", "--format", "awq")
    assert done.returncode == 2 and "--format 'awq'" in done.stderr and "awq" not in done.stderr.split("expected")[1]
