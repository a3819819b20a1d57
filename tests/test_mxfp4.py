"""MXFP4: the E2M1 / E8M0 math against a brute-force reference, gpt-oss's layout against transformers' own decoder
and loader, ``--format mxfp4`` outputs, and MXFP4 checkpoints as inputs of the other commands."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import make_family_model, make_tiny_model, run_surgery, save_tokenizer
from surgery.quantize.microscaling import decode_experts, e2m1_codes, mxfp4_dequantize, mxfp4_quantize, pack_fp4
from test_families import decoded_reference, logits_of, tensors_of

MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def reference_code(value: float) -> int:
    """Nearest E2M1 magnitude by exhaustive search, a tie going to the even code; the sign in bit 3."""
    distances = [abs(abs(value) - magnitude) for magnitude in MAGNITUDES]
    best = min(distances)
    candidates = [code for code, distance in enumerate(distances) if distance == best]
    code = next((c for c in candidates if c % 2 == 0), candidates[0])
    return code | (8 if value < 0 else 0)


def reference_exponent(block: list[float]) -> int:
    peak = max(abs(v) for v in block)
    if peak == 0:
        return -127
    mantissa, exponent = math.frexp(peak)  # peak = mantissa · 2^exponent, mantissa in [0.5, 1)
    return exponent - 1 - 2


def test_e2m1_codes_are_the_nearest_value_ties_to_even():
    edges = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 6.5, 100.0, 0.0, 1e-9]
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor(edges), -torch.tensor(edges), torch.randn(2000, generator=generator) * 3])
    expected = torch.tensor([reference_code(float(v)) for v in values], dtype=torch.uint8)
    assert torch.equal(e2m1_codes(values), expected)


def test_blocks_share_the_spec_exponent_and_decode_to_the_grid():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 5, 64, generator=generator) * torch.logspace(-3, 2, 5).view(1, 5, 1)
    weight[0, 0, :32] = 0.0  # an all-zero block
    codes, exponents = mxfp4_quantize(weight)
    blocks = weight.reshape(3, 5, 2, 32)
    expected_exponents = torch.tensor([[[reference_exponent(blocks[a, b, c].tolist()) for c in range(2)]
                                        for b in range(5)] for a in range(3)], dtype=torch.int32)
    assert torch.equal(exponents, expected_exponents)
    scale = torch.exp2(expected_exponents.double()).unsqueeze(-1)
    expected_codes = torch.tensor([reference_code(float(v)) for v in (blocks.double() / scale).flatten()],
                                  dtype=torch.uint8).reshape(weight.shape)
    assert torch.equal(codes, expected_codes)
    table = torch.tensor(MAGNITUDES + [-m for m in MAGNITUDES], dtype=torch.float64)
    approx = (table[expected_codes.long()].reshape(3, 5, 2, 32) * scale).reshape(weight.shape).float()
    assert torch.equal(mxfp4_dequantize(codes, exponents), approx)


def test_packed_layout_is_what_transformers_decodes():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(2)
    parameter = torch.randn(4, 64, 96, generator=generator)  # (experts, inputs, outputs) as gpt-oss holds it
    codes, exponents = mxfp4_quantize(parameter.transpose(1, 2))
    blocks, scales = pack_fp4(codes), (exponents + 127).to(torch.uint8)
    assert blocks.shape == (4, 96, 2, 16) and scales.shape == (4, 96, 2)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert theirs.shape == parameter.shape
    assert torch.equal(decode_experts(blocks, scales), theirs)
    assert (theirs - parameter).norm() / parameter.norm() < 0.15  # FP4 of Gaussian weights: about 0.11


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    for seed, name in ((0, "base"), (1, "ft")):
        make_family_model("gpt_oss", seed).save_pretrained(root / name)
        save_tokenizer(root / name)
    done = run_surgery("quantize", root / "base", "-o", root / "mx", "--format", "mxfp4")
    assert done.returncode == 0, done.stderr
    return root


def test_gpt_oss_experts_load_in_transformers_with_the_logits_of_their_decoded_weights(gpt_oss, tmp_path):
    out = gpt_oss / "mx"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    stored = tensors_of(out)
    quantized = sorted(name for name in stored if name.endswith(("_blocks", "_scales")))
    assert quantized == sorted(f"model.layers.{layer}.mlp.experts.{proj}_{part}" for layer in (0, 1)
                               for proj in ("gate_up_proj", "down_proj") for part in ("blocks", "scales"))
    source = tensors_of(gpt_oss / "base")
    for name in source:  # attention, router, norms, embeddings and biases as they were
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert torch.equal(stored[name], source[name]), name
    reference, decoded = decoded_reference(gpt_oss / "base", out, tmp_path / "decoded")
    assert len(decoded) == 4
    quantized = logits_of(out)
    torch.testing.assert_close(quantized, logits_of(reference), atol=1e-6, rtol=1e-6)
    assert (quantized - logits_of(gpt_oss / "base")).abs().max() > 1e-4  # the experts did change

    report = run_surgery("verify", out, "--reference", gpt_oss / "base", "--json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["format"] == "mxfp4" and len(summary["layers"]) == 16  # 2 layers × 2 tensors × 4 experts
    assert summary["min_output_cosine"] > 0.98

    from surgery.quantize.verify import VerifyConfig, verify
    gaussian = verify(VerifyConfig(str(out), reference=str(gpt_oss / "base"), end_to_end=False)).summary()
    by_module = {layer["module"]: layer["weight_rel_error"] for layer in summary["layers"]}
    assert {layer["module"]: layer["weight_rel_error"] for layer in gaussian["layers"]} == by_module


@pytest.mark.parametrize("options", [("--method", "hqq"), ("--group-size", "64"), ("--scheme", "asym"),
                                     ("--bits", "8")])
def test_options_mxfp4_does_not_have_are_refused(options, gpt_oss, tmp_path):
    result = run_surgery("quantize", gpt_oss / "base", "-o", tmp_path / "out", "--format", "mxfp4", *options)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert options[0] in result.stderr and not (tmp_path / "out").exists()


def test_models_without_3d_experts_are_refused(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path / "llama")
    result = run_surgery("quantize", tmp_path / "llama", "-o", tmp_path / "out", "--format", "mxfp4")
    assert result.returncode == 2 and "model_type gpt_oss" in result.stderr and not (tmp_path / "out").exists()


def test_mxfp4_checkpoints_are_read_decoded_by_merge_and_quantize(gpt_oss, tmp_path):
    """gpt-oss as OpenAI publishes it (MXFP4 experts) merges with a bf16 fine-tune: the experts enter decoded."""
    mx, ft = gpt_oss / "mx", gpt_oss / "ft"
    result = run_surgery("merge", mx, ft, "--method", "linear", "-o", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    merged, finetuned, stored = tensors_of(tmp_path / "merged"), tensors_of(ft), tensors_of(mx)
    name = "model.layers.1.mlp.experts.down_proj"
    # decoded in the config's dtype (float32 here; bfloat16 when it names none, as transformers does)
    assert merged[name].dtype == torch.float32 and not any(key.endswith("_blocks") for key in merged)
    decoded = decode_experts(stored[name + "_blocks"], stored[name + "_scales"])
    torch.testing.assert_close(merged[name], 0.5 * decoded + 0.5 * finetuned[name], atol=1e-7, rtol=1e-6)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())

    again = run_surgery("quantize", mx, "-o", tmp_path / "again", "--format", "mxfp4", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["weight_relative_error"] == 0.0  # MXFP4 values are exact in bf16
    requantized = tensors_of(tmp_path / "again")
    for key in requantized:
        if key.endswith("_blocks"):
            base = key.removesuffix("_blocks")
            assert torch.equal(decode_experts(requantized[key], requantized[base + "_scales"]),
                               decode_experts(stored[key], stored[base + "_scales"])), key


def test_extend_keeps_an_mxfp4_model_quantized(gpt_oss, tmp_path):
    result = run_surgery("extend", gpt_oss / "mx", "--rope", "yarn", "--factor", "2", "-o", tmp_path / "long")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "long" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "mxfp4"
    before, after = tensors_of(gpt_oss / "mx"), tensors_of(tmp_path / "long")
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_a_broken_mxfp4_pair_is_named(gpt_oss, tmp_path):
    from safetensors.torch import save_file

    broken = shutil.copytree(gpt_oss / "mx", tmp_path / "broken")
    tensors = tensors_of(broken)
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    result = run_surgery("quantize", broken, "-o", tmp_path / "out")
    assert result.returncode == 2 and "down_proj_scales" in result.stderr and not (tmp_path / "out").exists()
