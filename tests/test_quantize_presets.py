"""``--preset``: compressed-tensors' schemes (W4A16, W8A16, FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, MXFP4A16).

Each output is loaded by transformers + compressed-tensors and its logits compared with the model whose weights
are the decoded ones (for the FP8 presets, whose loaders quantize activations at run time, with the activations
fake-quantized here by a formula written in the test). The stored bytes are checked against compressed-tensors' own
quantizers given scales this test computes from the weights; NVFP4's global scale must be shared by q/k/v and by
gate/up (vLLM fuses them); `surgery verify` reads every output; bad combinations exit 2 in one line.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_family_model, make_tiny_model, run_surgery, save_tokenizer
from test_families import decoded_reference, tensors_of as tensors_in

PRESETS = ["W4A16", "W4A16_ASYM", "W8A16", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"]
FP8_ACTIVATIONS = {"FP8_DYNAMIC": None, "FP8_BLOCK": 128}  # activation group (None: the whole token)
TOKENS = torch.tensor([[1, 5, 9, 13, 40, 77, 3, 99]])
FP8_MAX = 448.0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny bfloat16 llama whose every input dimension is a multiple of 128 (FP8_BLOCK's activation groups)."""
    path = tmp_path_factory.mktemp("presets") / "llama"
    make_tiny_model("llama", hidden_size=128, intermediate_size=256).to(torch.bfloat16).save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def outputs(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("preset-outputs")
    paths = {}
    for preset in PRESETS:
        done = run_surgery("quantize", source, "-o", root / preset, "--preset", preset, "--json")
        assert done.returncode == 0, done.stderr
        paths[preset] = root / preset
    return paths


def model_logits(directory, hooks: dict | None = None, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for module, hook in (hooks or {}).items():
        model.get_submodule(module).register_forward_pre_hook(hook)
    with torch.no_grad():
        return model.eval()(TOKENS).logits.float()


def fake_fp8(group: int | None):
    """A forward pre-hook quantizing a Linear's input to FP8 E4M3 per token (or per group of ``group`` values
    within a token): scale = amax / 448, in the activations' dtype."""
    def hook(module, args):
        x = args[0]
        grouped = x.reshape(*x.shape[:-1], -1, group or x.shape[-1])
        scale = grouped.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
        q = (grouped / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)
        return ((q * scale).reshape(x.shape),)
    return hook


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_with_the_logits_of_its_decoded_weights(preset, outputs, source, tmp_path):
    from transformers import CompressedTensorsConfig

    reference, quantized = decoded_reference(source, outputs[preset], tmp_path / "decoded")
    assert len(quantized) == 14  # 7 Linear weights in each of 2 layers; lm_head ignored
    # asymmetric zero points: transformers reads compressed-tensors' packed layout dequantized only (test_quantize)
    options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if preset == "W4A16_ASYM" else {}
    got = model_logits(outputs[preset], **options)
    if preset not in FP8_ACTIVATIONS:
        torch.testing.assert_close(got, model_logits(reference), atol=0, rtol=0)
        return
    modules = {name.removesuffix(".weight") for name in quantized}
    hooks = {module: fake_fp8(FP8_ACTIVATIONS[preset]) for module in modules}
    torch.testing.assert_close(got, model_logits(reference, hooks), atol=2e-2, rtol=0)
    # the activations are quantized: without the hooks the logits are further off than the tolerance above
    assert (got - model_logits(reference)).abs().max() > 2e-2


def test_fp8_weights_are_compressed_tensors_own_quantization(outputs, source):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import quantize

    original = tensors_in(source)
    for preset, block in (("FP8_DYNAMIC", None), ("FP8_BLOCK", 128)):
        stored = tensors_in(outputs[preset])
        config = json.loads((outputs[preset] / "config.json").read_text())["quantization_config"]
        assert config["format"] == "float-quantized"
        scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
        for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            weight = original[f"{name}.weight"].float()
            rows, columns = weight.shape
            if block:
                amax = weight.reshape(rows // block, block, columns // block, block).abs().amax(dim=(1, 3))
            else:
                amax = weight.abs().amax(dim=1, keepdim=True)
            want_scale = (amax / FP8_MAX).to(torch.bfloat16)
            assert torch.equal(stored[f"{name}.weight_scale"], want_scale), (preset, name)
            want = quantize(x=weight, scale=want_scale.float(), zero_point=None, args=scheme.weights,
                            dtype=torch.float8_e4m3fn)
            assert stored[f"{name}.weight"].dtype == torch.float8_e4m3fn
            assert torch.equal(stored[f"{name}.weight"].view(torch.uint8), want.view(torch.uint8)), (preset, name)


def test_nvfp4_global_scale_is_shared_by_fused_projections_and_packing_is_compressed_tensors(outputs, source):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    original, stored = tensors_in(source), tensors_in(outputs["NVFP4A16"])
    config = json.loads((outputs["NVFP4A16"] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
    scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    fused = {"self_attn": ["q_proj", "k_proj", "v_proj"], "mlp": ["gate_proj", "up_proj"]}
    for layer in range(2):
        for parent, members in [*fused.items(), ("self_attn", ["o_proj"]), ("mlp", ["down_proj"])]:
            names = [f"model.layers.{layer}.{parent}.{member}" for member in members]
            peak = max(float(original[f"{name}.weight"].float().abs().max()) for name in names)
            global_scale = torch.tensor([FP8_MAX * 6.0], dtype=torch.float32) / peak
            for name in names:
                weight = original[f"{name}.weight"].float()
                assert torch.equal(stored[f"{name}.weight_global_scale"], global_scale), name
                group_amax = weight.reshape(weight.shape[0], -1, 16).abs().amax(dim=-1)
                scale = (group_amax / 6.0 * global_scale).to(torch.float8_e4m3fn)
                assert torch.equal(stored[f"{name}.weight_scale"].view(torch.uint8), scale.view(torch.uint8)), name
                theirs = NVFP4PackedCompressor.compress(
                    {"weight": weight, "weight_scale": scale.float(), "weight_global_scale": global_scale}, scheme)
                assert torch.equal(stored[f"{name}.weight_packed"], theirs["weight_packed"]), name


def test_mxfp4_scales_and_packing_are_compressed_tensors_own(outputs, source):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    original, stored = tensors_in(source), tensors_in(outputs["MXFP4A16"])
    config = json.loads((outputs["MXFP4A16"] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mxfp4-pack-quantized"
    scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        weight = original[f"{name}.weight"].float()
        exponents = generate_mx_scales(weight.reshape(weight.shape[0], -1, 32).abs().amax(dim=-1))
        assert torch.equal(stored[f"{name}.weight_scale"], exponents.to(torch.uint8)), name
        theirs = MXFP4PackedCompressor.compress({"weight": weight, "weight_scale": torch.exp2(exponents - 127)},
                                                scheme)
        assert torch.equal(stored[f"{name}.weight_packed"], theirs["weight_packed"]), name


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "NVFP4A16", "MXFP4A16"])
def test_verify_reads_each_float_preset(preset, outputs, source):
    done = run_surgery("verify", outputs[preset], "--reference", source, "--tokens", "16", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == preset.lower().replace("_", "-") and len(report["layers"]) == 14
    assert report["passed"] and all(layer["output_cosine"] > 0.95 for layer in report["layers"])


def test_preset_recorded_and_output_deterministic(outputs, source, tmp_path):
    again = tmp_path / "again"
    assert run_surgery("quantize", source, "-o", again, "--preset", "nvfp4a16").returncode == 0
    assert tensors_in(again).keys() == tensors_in(outputs["NVFP4A16"]).keys()
    for name, tensor in tensors_in(again).items():
        assert torch.equal(tensor.view(torch.uint8), tensors_in(outputs["NVFP4A16"])[name].view(torch.uint8)), name
    recipe = json.loads((again / "surgery.json").read_text())["recipe"]
    assert recipe["preset"] == "NVFP4A16" and recipe["format"] == "nvfp4a16" and recipe["bits"] == 4
    assert "NVFP4A16" in (again / "README.md").read_text()
    # the format by name, without --bits, writes what the preset writes
    by_format = tmp_path / "by-format"
    assert run_surgery("quantize", source, "-o", by_format, "--format", "fp8-dynamic").returncode == 0
    for name, tensor in tensors_in(outputs["FP8_DYNAMIC"]).items():
        assert torch.equal(tensor.view(torch.uint8), tensors_in(by_format)[name].view(torch.uint8)), name


@pytest.mark.parametrize("family", ["qwen3_moe", "llava"])
def test_fp4_presets_on_experts_and_a_vision_language_model(family, tmp_path):
    import transformers

    from conftest import MULTIMODAL

    source = tmp_path / family
    make_family_model(family).to(torch.bfloat16).save_pretrained(source)
    auto = transformers.AutoModelForImageTextToText if family in MULTIMODAL else transformers.AutoModelForCausalLM
    for preset in ("NVFP4A16", "MXFP4A16"):
        out = tmp_path / preset
        if family == "qwen3_moe" and preset == "NVFP4A16":
            # transformers fuses the experts' NVFP4 weights without their global scales (logits far off): refused
            done = run_surgery("quantize", source, "-o", out, "--preset", preset)
            assert done.returncode == 2 and "fills without their global scales" in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
            continue
        done = run_surgery("quantize", source, "-o", out, "--preset", preset)
        assert done.returncode == 0, done.stderr
        reference, quantized = decoded_reference(source, out, tmp_path / f"decoded-{preset}")
        if family == "qwen3_moe":
            assert any(".experts." in name for name in quantized)
        with torch.no_grad():
            got, want = (auto.from_pretrained(path).eval()(input_ids=TOKENS).logits for path in (out, reference))
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.fixture(scope="module")
def float32_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("float32") / "llama"
    make_tiny_model("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("options, message", [
    (["--preset", "W4A16", "--bits", "8"], "--preset W4A16 --bits 8: the preset sets 4"),
    (["--preset", "FP8_DYNAMIC", "--format", "gptq"], "--preset FP8_DYNAMIC --format gptq: the preset sets fp8"),
    (["--preset", "FP8"], "--preset FP8: its static activation scales need calibration data"),
    (["--format", "fp8-dynamic", "--bits", "4"], "--format fp8-dynamic --bits 4: it writes 8 bits"),
    (["--preset", "NVFP4"], "use --preset NVFP4A16"),
    (["--preset", "W9A16"], "--preset 'W9A16': expected W4A16, W4A16_ASYM"),
    (["--preset", "FP8_DYNAMIC", "--method", "hqq"], "--format fp8-dynamic --method hqq: it writes rtn only"),
    (["--preset", "FP8_BLOCK", "--group-size", "64"], "--format fp8-block --group-size 64: FP8_BLOCK has"),
    (["--preset", "NVFP4A16", "--group-size", "32"], "NVFP4A16 groups are 16 values"),
    (["--preset", "MXFP4A16"], "needs a bfloat16 model, not float32"),
    (["--preset", "FP8_BLOCK"], "FP8_BLOCK quantizes its inputs in groups of 128, which do not divide"),
])
def test_bad_preset_combinations_exit_2_in_one_line(options, message, float32_llama, tmp_path):
    done = run_surgery("quantize", float32_llama, "-o", tmp_path / "out", *options)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".*"))  # no staging directory left behind



def test_a_pipeline_step_takes_a_preset(tmp_path):
    import yaml

    source = tmp_path / "llama"
    make_tiny_model("llama").save_pretrained(source)
    steps = [{"convert": {"input": str(source), "dtype": "bfloat16", "output": str(tmp_path / "bf16")}},
             {"quantize": {"input": str(tmp_path / "bf16"), "preset": "NVFP4A16", "output": str(tmp_path / "fp4")}}]
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"steps": steps}))
    done = run_surgery("run", tmp_path / "pipeline.yaml")
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized"
