"""surgery quantize / verify: the written bits decoded per the format specifications, against an independent numpy
quantizer written here; loading with transformers + compressed-tensors; compressed-tensors' own compressor;
GPTQ decoding; HQQ (never worse than RTN per group, outliers kept); --device; determinism, provenance and bad
input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import logits, quantize_variants, run_surgery

GROUP = 32


# ------------------------------------------------------------------------------- independent reference (numpy)

def numpy_rtn(weight: np.ndarray, bits: int, group: int, symmetric: bool, scale_dtype=torch.bfloat16):
    """Group RTN per the reference text: sym scale = amax / ((qmax − qmin) / 2), q ∈ [qmin, qmax]; asym scale =
    (max − min) / (qmax − qmin) over a range holding 0, zero = clamp(qmin − round(min / scale)). Scales are rounded
    to the dtype they are stored in before quantizing."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    rows, cols = weight.shape
    g = weight.astype(np.float32).reshape(rows, cols // group, group)
    if symmetric:
        scale = np.abs(g).max(-1) / np.float32((qmax - qmin) / 2)
        zero = np.zeros_like(scale)
    else:
        low, high = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        scale = (high - low) / np.float32(qmax - qmin)
    scale = torch.from_numpy(scale.astype(np.float32)).to(scale_dtype).float().numpy()
    if not symmetric:
        zero = np.clip(qmin - np.round(low / scale), qmin, qmax)
    q = np.clip(np.round(g / scale[..., None]) + zero[..., None], qmin, qmax)
    return q.reshape(rows, cols).astype(np.int64), scale, zero.astype(np.int64)


def unpack_lsb_first(words: np.ndarray, bits: int) -> np.ndarray:
    """int32 words → unsigned fields, the first value in the lowest bits, along the last axis."""
    unsigned = words.astype(np.int64) & 0xFFFFFFFF
    fields = [(unsigned >> (bits * i)) & ((1 << bits) - 1) for i in range(32 // bits)]
    return np.stack(fields, axis=-1).reshape(*words.shape[:-1], -1)


def decode_compressed_tensors(tensors: dict, module: str, bits: int, symmetric: bool) -> tuple:
    packed = tensors[f"{module}.weight_packed"].numpy()
    scale = tensors[f"{module}.weight_scale"].float().numpy()
    out, _ = tensors[f"{module}.weight_shape"].tolist()
    q = unpack_lsb_first(packed, bits) - (1 << (bits - 1))
    zero = np.zeros(scale.shape, dtype=np.int64)
    if not symmetric:
        zero = unpack_lsb_first(tensors[f"{module}.weight_zero_point"].numpy().T, bits).T[:out] - (1 << (bits - 1))
    return q, scale, zero


def dequantized(q, scale, zero, group):
    rows, cols = q.shape
    return ((q.reshape(rows, -1, group) - zero[..., None]) * scale[..., None]).reshape(rows, cols)


LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def outputs(tiny_checkpoints, tmp_path_factory):
    """Quantized tiny llamas: name → directory."""
    root = tmp_path_factory.mktemp("quantized")
    source = tiny_checkpoints["llama"]
    runs = {"sym4": ["--scheme", "sym"], "asym4": ["--scheme", "asym"], "sym8": ["--bits", "8"],
            "gptq4": ["--format", "gptq"], "hqq4": ["--method", "hqq"], "hqq_asym4": ["--method", "hqq", "--scheme", "asym"]}
    return quantize_variants(source, root, runs, GROUP)


@pytest.mark.parametrize("name,bits,symmetric", [("sym4", 4, True), ("asym4", 4, False), ("sym8", 8, True)])
def test_compressed_tensors_bits_match_an_independent_quantizer(outputs, tiny_checkpoints, name, bits, symmetric):
    source = load_file(tiny_checkpoints["llama"] / "model.safetensors")
    written = load_file(outputs[name] / "model.safetensors")
    for module in LINEARS:
        weight = source[f"{module}.weight"].float().numpy()
        q, scale, zero = numpy_rtn(weight, bits, GROUP, symmetric, source[f"{module}.weight"].dtype)
        got_q, got_scale, got_zero = decode_compressed_tensors(written, module, bits, symmetric)
        assert written[f"{module}.weight_packed"].dtype == torch.int32
        assert written[f"{module}.weight_shape"].tolist() == list(weight.shape)
        assert np.array_equal(got_scale, scale), module
        assert np.array_equal(got_zero, zero), module
        assert np.array_equal(got_q, q), module
    assert "lm_head.weight" in written and "model.embed_tokens.weight" in written  # ignored / not Linear: copied
    config = json.loads((outputs[name] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == GROUP


@pytest.mark.parametrize("name,symmetric", [("sym4", True), ("asym4", False), ("sym8", True)])
def test_compressed_tensors_library_writes_the_same_tensors(outputs, name, symmetric):
    """compressed-tensors' own compressor, given our decoded weight, scale and zero point, packs the same bits."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    config = json.loads((outputs[name] / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**config["config_groups"]["group_0"]["weights"])
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    written = load_file(outputs[name] / "model.safetensors")
    for module in LINEARS[:7]:
        q, scale, zero = decode_compressed_tensors(written, module, args.num_bits, symmetric)
        state = {"weight": torch.from_numpy(dequantized(q, scale, zero, GROUP)).float(),
                 "weight_scale": written[f"{module}.weight_scale"].float(),
                 "weight_zero_point": torch.from_numpy(zero).to(torch.int8)}
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        assert torch.equal(theirs["weight_packed"], written[f"{module}.weight_packed"]), module
        if not symmetric:
            assert torch.equal(theirs["weight_zero_point"], written[f"{module}.weight_zero_point"]), module


def dequantized_model_logits(source, quantized_dir, ids):
    from transformers import AutoModelForCausalLM

    from surgery.quantize.verify import load_dequantized

    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        return load_dequantized(str(quantized_dir), reference)(ids).logits


@pytest.mark.parametrize("name", ["sym4", "sym8", "hqq4"])
def test_transformers_loads_compressed_tensors_output_with_the_decoded_logits(outputs, tiny_checkpoints, name):
    ids = torch.tensor([[1, 5, 9, 13, 40, 77, 100, 3]])
    loaded = logits(outputs[name], ids, dtype=torch.float32)
    expected = dequantized_model_logits(tiny_checkpoints["llama"], outputs[name], ids)
    assert torch.allclose(loaded, expected, atol=1e-4, rtol=1e-4)
    original = logits(tiny_checkpoints["llama"], ids, dtype=torch.float32)
    assert not torch.allclose(loaded, original, atol=1e-4)  # it did quantize


def test_asymmetric_output_loads_in_transformers_dequantized_with_the_decoded_logits(outputs, tiny_checkpoints):
    """transformers' compressed path expects unpacked zero points; it reads our (and compressed-tensors' own)
    asymmetric pack-quantized layout with dequantize=True, which the output check falls back to (with a warning)."""
    from transformers import CompressedTensorsConfig

    ids = torch.tensor([[1, 5, 9, 13, 40, 77, 100, 3]])
    loaded = logits(outputs["asym4"], ids, dtype=torch.float32,
                    quantization_config=CompressedTensorsConfig(dequantize=True))
    expected = dequantized_model_logits(tiny_checkpoints["llama"], outputs["asym4"], ids)
    assert torch.allclose(loaded, expected, atol=1e-4, rtol=1e-4)


def test_gptq_output_decodes_to_an_independent_quantizer(outputs, tiny_checkpoints):
    """GPTQ v1 decoded per its spec (qweight packed along the input dim, qzeros = zero − 1, float16 scales) gives
    the independent quantizer's grid with float16 scales, and the same weights as the compressed-tensors output up
    to the scale dtype (one step at most, where the rounding of the scale moves a value across a level)."""
    source = load_file(tiny_checkpoints["llama"] / "model.safetensors")
    gptq = load_file(outputs["gptq4"] / "model.safetensors")
    ct = load_file(outputs["sym4"] / "model.safetensors")
    config = json.loads((outputs["gptq4"] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq" and config["bits"] == 4
    for module in LINEARS:
        qweight = gptq[f"{module}.qweight"].numpy()                   # (in/8, out)
        q = unpack_lsb_first(qweight.T, 4) - 8                          # (out, in)
        zeros = unpack_lsb_first(gptq[f"{module}.qzeros"].numpy(), 4)  # (groups, out)
        assert np.all(zeros == 7)  # symmetric 4-bit: 0x77777777
        scales = gptq[f"{module}.scales"].float().numpy().T
        assert gptq[f"{module}.scales"].dtype == torch.float16
        assert gptq[f"{module}.g_idx"].tolist() == [i // GROUP for i in range(q.shape[1])]
        want_q, want_scale, _ = numpy_rtn(source[f"{module}.weight"].float().numpy(), 4, GROUP, True, torch.float16)
        assert np.array_equal(q, want_q) and np.array_equal(scales, want_scale), module
        weight = dequantized(q, scales, zeros.T + 1 - 8, GROUP)
        ct_weight = dequantized(*decode_compressed_tensors(ct, module, 4, True), GROUP)
        assert np.all(np.abs(weight - ct_weight) <= 1.01 * np.repeat(scales, GROUP, axis=1) + 1e-6), module


def test_hqq_lowers_the_weight_error_and_stays_on_the_grid(outputs):
    for name, rtn_name, symmetric in (("hqq4", "sym4", True), ("hqq_asym4", "asym4", False)):
        hqq_manifest = json.loads((outputs[name] / "surgery.json").read_text())
        rtn_manifest = json.loads((outputs[rtn_name] / "surgery.json").read_text())
        assert hqq_manifest["output"]["weight_relative_error"] < rtn_manifest["output"]["weight_relative_error"]
        written = load_file(outputs[name] / "model.safetensors")
        q, _, zero = decode_compressed_tensors(written, LINEARS[0], 4, symmetric)
        assert q.min() >= -8 and q.max() <= 7 and zero.min() >= -8 and zero.max() <= 7


def heavy_tailed_weight(rows: int = 64, columns: int = 512, seed: int = 0) -> tuple[np.ndarray, list]:
    """Student-t (3 degrees of freedom) weights, as bfloat16 values, with a "super weight" of ±6 (13× the mean
    magnitude, as in SmolLM2-135M's layer-11 down projection) in every fourth row; returns the weight and their
    (row, column) positions."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_t(3, size=(rows, columns)) * 0.3
    supers = [(row, int(rng.integers(columns))) for row in range(0, rows, 4)]
    for row, column in supers:
        weight[row, column] = 6.0 * rng.choice([-1, 1])
    return torch.from_numpy(weight).to(torch.bfloat16).float().numpy(), supers


@pytest.mark.parametrize("symmetric", [True, False])
def test_hqq_is_never_worse_than_rtn_per_group_and_keeps_outliers(symmetric):
    """At group 128 on a heavy-tailed matrix with super weights: per group, HQQ's squared error and largest error
    are at most those of the independent RTN (an lp objective that gives up outliers shrank the scale until they
    clipped: 1.17× RTN's squared error and 2.8× its output error where the outliers meet large activations), and
    overall HQQ still lowers the error."""
    from surgery.quantize.grid import Scheme, hqq

    group = 128
    weight, supers = heavy_tailed_weight()
    grid = hqq(torch.from_numpy(weight), Scheme(4, group, symmetric), torch.bfloat16)
    assert grid.q.min() >= -8 and grid.q.max() <= 7
    ours = grid.dequantize().numpy()
    theirs = dequantized(*numpy_rtn(weight, 4, group, symmetric, torch.bfloat16), group)
    errors = {name: (weight - approx).reshape(weight.shape[0], -1, group) for name, approx in
              (("hqq", ours), ("rtn", theirs))}
    squared = {name: (error ** 2).sum(-1) for name, error in errors.items()}
    largest = {name: np.abs(error).max(-1) for name, error in errors.items()}
    assert np.all(largest["hqq"] <= largest["rtn"])
    assert np.all(squared["hqq"] <= squared["rtn"] * (1 + 1e-5))
    assert squared["hqq"].sum() < 0.99 * squared["rtn"].sum()
    x = np.random.default_rng(1).standard_normal((256, weight.shape[1])).astype(np.float32)
    x[:, sorted({column for _, column in supers})] *= 100  # the massive activations super weights meet
    output_error = {name: np.linalg.norm(x @ (weight - approx).T) for name, approx in (("hqq", ours), ("rtn", theirs))}
    assert output_error["hqq"] <= 1.02 * output_error["rtn"], output_error


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_device_cpu_given_explicitly_writes_the_default_bytes(tiny_checkpoints, tmp_path, method):
    from surgery.quantize import QuantizeConfig, quantize

    source = tiny_checkpoints["llama"]
    quantize(QuantizeConfig(source, tmp_path / "default", group_size=GROUP, method=method))
    quantize(QuantizeConfig(source, tmp_path / "cpu", group_size=GROUP, method=method, device="cpu"))
    files = sorted(p.name for p in (tmp_path / "default").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cpu").iterdir())
    for name in files:
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "default" / name).read_bytes(), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(tiny_checkpoints, tmp_path):
    done = run_surgery("quantize", tiny_checkpoints["llama"], "-o", tmp_path / "out", "--device", "cuda")
    assert done.returncode == 2 and "--device cuda" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_rtn_on_cuda_writes_the_cpu_bytes(tiny_checkpoints, tmp_path, fmt):
    source = tiny_checkpoints["llama"]
    for device in ("cpu", "cuda"):
        done = run_surgery("quantize", source, "-o", tmp_path / device, "--group-size", str(GROUP), "--format", fmt,
                           "--device", device)
        assert done.returncode == 0, done.stderr
    for path in (tmp_path / "cpu").iterdir():
        assert (tmp_path / "cuda" / path.name).read_bytes() == path.read_bytes(), path.name


def test_outputs_are_deterministic_and_carry_provenance(outputs, tiny_checkpoints, tmp_path):
    again = tmp_path / "again"
    assert run_surgery("quantize", tiny_checkpoints["llama"], "-o", again, "--group-size", str(GROUP),
                       "--method", "hqq").returncode == 0
    first = outputs["hqq4"]
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in first.iterdir())
    for path in first.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    assert (first / "tokenizer.json").exists()
    assert "base_model_relation: quantized" in (first / "README.md").read_text()
    title = next(line for line in (first / "README.md").read_text().splitlines() if line.startswith("# "))
    assert title.startswith(f"# {tiny_checkpoints['llama'].name}, ") and "/" not in title  # never an absolute path
    manifest = json.loads((first / "surgery.json").read_text())
    assert manifest["command"] == "quantize" and manifest["recipe"]["method"] == "hqq"
    assert manifest["inputs"][0]["sha256"]


def test_verify_reports_layers_and_end_to_end(outputs, tiny_checkpoints):
    # sym4, not asym4: verify now fails outputs transformers refuses to load, and with the transformers and
    # compressed-tensors installed here that includes asymmetric zero points (tests/test_verify.py).
    done = run_surgery("verify", outputs["sym4"], "--reference", tiny_checkpoints["llama"], "--tokens", "32",
                       "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["layers"]) == len(LINEARS)
    for layer in report["layers"]:
        assert 0 < layer["weight_rel_error"] < 0.2 and 0 < layer["output_rel_error"] < 0.2
        assert layer["output_cosine"] > 0.98
    e2e = report["end_to_end"]
    assert 0 < e2e["kl"] < 1 and 0 < e2e["top1_agreement"] <= 1 and e2e["tokens"] >= 32
    eight = json.loads(run_surgery("verify", outputs["sym8"], "--reference", tiny_checkpoints["llama"],
                                   "--tokens", "32", "--json").stdout)
    assert eight["end_to_end"]["kl"] < e2e["kl"] and eight["worst_output_rel_error"] < 0.02


@pytest.mark.parametrize("args,message", [
    (["--bits", "3"], "--bits 3"),
    (["--group-size", "24"], "does not divide"),
    (["--scheme", "minmax"], "--scheme"),
    (["--method", "gptq"], "--method"),
    (["--format", "gguf", "--scheme", "asym"], "--format gguf"),
    (["--format", "exl2"], "--format"),
    (["--ignore", "re:.*"], "no Linear weights"),
    (["--device", "tpu"], "--device tpu"),
])
def test_bad_input_is_one_line(tiny_checkpoints, tmp_path, args, message):
    done = run_surgery("quantize", tiny_checkpoints["llama"], "-o", tmp_path / "out", *args)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tied_family_keeps_lm_head_ignored(tiny_checkpoints, tmp_path):
    out = tmp_path / "qwen2"
    assert run_surgery("quantize", tiny_checkpoints["qwen2"], "-o", out, "--group-size", "32").returncode == 0
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.allclose(logits(out, ids, dtype=torch.float32),
                          dequantized_model_logits(tiny_checkpoints["qwen2"], out, ids), atol=1e-4, rtol=1e-4)
