"""``surgery quantize --imatrix``: the importance matrix is the mean squared input of every quantized Linear over the
self-generated pool (recomputed here with transformers' whole model and forward hooks, float64); the GGUF file, and
the compressed-tensors and GPTQ outputs, load in transformers with the logits of their decoded weights and have a
lower importance-weighted error than without it; the GGUF repeats byte for byte, the manifest / card / GGUF metadata
say how it was made, a pipeline step writes the same bytes, and the options it does not apply to exit 2 in one
line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model, run_surgery, save_bpe_tokenizer

SEQUENCES = 4
TOKENS = torch.tensor([[1, 5, 9, 13, 40, 77, 100, 3, 250]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 4-layer llama: q/k/v/o/gate/up 256 wide (Q4_K), down 288 wide (falls back to Q5_0 / Q8_0). As in trained
    LLMs, a few hidden channels carry much larger activations (their norm weights ×10), so inputs matter unevenly."""
    path = tmp_path_factory.mktemp("imatrix") / "llama"
    model = make_tiny_model("llama", vocab_size=300, hidden_size=256, intermediate_size=288, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(256, generator=generator)[:12]] *= 10
    model.save_pretrained(path)
    save_bpe_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def outputs(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("imatrix-out")
    out = {}
    weighted = ["--imatrix", "--calibration-sequences", str(SEQUENCES)]
    for name, options in {"plain": [], "imatrix": weighted, "again": weighted,
                          "seed1": [*weighted, "--seed", "1"]}.items():
        done = run_surgery("quantize", source, "-o", root / name, "--gguf-type", "Q4_K_M", *options, "--json")
        assert done.returncode == 0, done.stderr
        out[name] = root / name
    return out


def hooked_importance(source, ids: torch.Tensor, head: bool = False) -> dict[str, torch.Tensor]:
    """Mean x² per input column of every decoder Linear (and the lm_head's), from transformers' whole model in
    float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float64).eval()
    sums, counts, handles = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".layers." in name or (head and name == "lm_head")):
            def record(module, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            handles.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


def test_importance_is_the_mean_squared_input_of_each_linear(source):
    from surgery.io import open_checkpoint
    from surgery.quantize.imatrix import importance_matrix, resolve
    from surgery.quantize.selfcal import generate_pool

    params = resolve({"sequences": SEQUENCES, "length": 32})
    with open_checkpoint(source) as ckpt:
        names = [name.removesuffix(".weight") for name in ckpt.tensors
                 if ".layers." in name and name.endswith("_proj.weight")]
        importance, report = importance_matrix(ckpt, names, params, seed=3)
        pool = generate_pool(ckpt, {"candidates": SEQUENCES, "length": 32, "greedy_tokens": 4}, 3)
    expected = hooked_importance(source, pool)
    assert sorted(importance) == sorted(expected) == sorted(names) and len(names) == 4 * 7
    for name, values in importance.items():
        assert values.dtype == torch.float32 and values.shape == expected[name].shape
        torch.testing.assert_close(values.double(), expected[name], rtol=1e-4, atol=1e-9)
    assert report == {"sequences": SEQUENCES, "tokens": SEQUENCES * 32, "modules": 28}
    # a different seed is different text, so different statistics
    with open_checkpoint(source) as ckpt:
        other, _ = importance_matrix(ckpt, names[:1], params, seed=4)
    assert not torch.allclose(other[names[0]], importance[names[0]])


def decoded_weights(directory) -> dict[str, torch.Tensor]:
    from surgery.io import open_checkpoint

    (path,) = directory.glob("*.gguf")
    with open_checkpoint(path) as ckpt:
        return {name.removesuffix(".weight"): ckpt.get(name).float() for name in ckpt.tensors
                if ".layers." in name and name.endswith("_proj.weight")}


def test_imatrix_lowers_the_importance_weighted_error_and_loads_in_transformers(outputs, source):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from surgery.io import open_checkpoint
    from surgery.quantize.selfcal import generate_pool

    with open_checkpoint(source) as ckpt:  # the pool --imatrix measured on (seed 0, 256 tokens)
        pool = generate_pool(ckpt, {"candidates": SEQUENCES, "length": 256, "greedy_tokens": 4}, 0)
    importance = hooked_importance(source, pool)
    original = load_file(source / "model.safetensors")
    plain, weighted = decoded_weights(outputs["plain"]), decoded_weights(outputs["imatrix"])

    def error(decoded: dict) -> float:  # Σ_modules Σ_ij importance_j (W − Ŵ)²_ij: the output error's diagonal part
        return sum(float((importance[name] * (original[f"{name}.weight"].double() - decoded[name].double()) ** 2)
                         .sum()) for name in importance)

    assert error(weighted) < 0.9 * error(plain), error(weighted) / error(plain)
    # but not a different model: the plain weight error stays close
    plain_error = sum(float((original[f"{n}.weight"] - plain[n]).pow(2).sum()) for n in plain)
    weighted_error = sum(float((original[f"{n}.weight"] - weighted[n]).pow(2).sum()) for n in weighted)
    assert weighted_error < 1.3 * plain_error

    (path,) = outputs["imatrix"].glob("*.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference.load_state_dict({f"{name}.weight": value for name, value in weighted.items()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, reference(TOKENS).logits, atol=1e-4, rtol=1e-4)


def test_imatrix_output_repeats_and_says_how_it_was_made(outputs):
    import gguf

    files = {name: next(outputs[name].glob("*.gguf")).read_bytes() for name in ("imatrix", "again", "seed1")}
    assert files["imatrix"] == files["again"] and files["imatrix"] != files["seed1"]
    manifest = json.loads((outputs["imatrix"] / "surgery.json").read_text())
    assert manifest["recipe"]["imatrix"] == {"sequences": SEQUENCES, "length": 256, "greedy_tokens": 4, "chunk": 8}
    assert manifest["output"]["importance_matrix"] == {"sequences": SEQUENCES, "tokens": SEQUENCES * 256,
                                                       "modules": 28, "without_importance": 0}
    assert "imatrix" not in json.loads((outputs["plain"] / "surgery.json").read_text())["recipe"]
    card = (outputs["imatrix"] / "README.md").read_text()
    assert f"measured on {SEQUENCES * 256} tokens the model wrote itself" in card
    reader = gguf.GGUFReader(next(outputs["imatrix"].glob("*.gguf")))
    assert reader.fields["quantize.imatrix.chunks_count"].contents() == SEQUENCES
    assert reader.fields["quantize.imatrix.entries_count"].contents() == 28
    assert "self-generated" in reader.fields["quantize.imatrix.dataset"].contents()
    assert "quantize.imatrix.dataset" not in gguf.GGUFReader(next(outputs["plain"].glob("*.gguf"))).fields


@pytest.mark.parametrize("options, message", [
    (["--preset", "FP8_DYNAMIC", "--imatrix"],
     "--imatrix: applies only to --format compressed-tensors, gptq, gguf (the format is fp8-dynamic)"),
    (["--format", "gguf", "--method", "hqq", "--imatrix"], "--imatrix --method hqq: the importance matrix weighs round"),
    (["--method", "selfcal", "--imatrix"], "--imatrix --method selfcal: the importance matrix weighs round"),
    (["--format", "gguf", "--bits", "8", "--imatrix"], "--imatrix: Q8_0 blocks are rounded to nearest"),
    (["--gguf-type", "Q8_0", "--imatrix"], "--imatrix: Q8_0 blocks are rounded to nearest"),
    (["--gguf-type", "Q4_K_M", "--imatrix", "--calibration-sequences", "0"],
     "--imatrix: sequences 0 must be a positive integer"),
    (["--gguf-type", "Q4_K_M", "--calibration-sequences", "4"],
     "--calibration-sequences: applies only to --method selfcal or --imatrix"),
    (["--gguf-type", "Q4_K_M", "--imatrix", "--rounds", "2"], "--rounds: applies only to --method selfcal (the"),
])
def test_imatrix_where_it_does_not_apply_exits_2_in_one_line(options, message, source, tmp_path):
    done = run_surgery("quantize", source, "-o", tmp_path / "out", *options)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_pipeline_quantize_step_takes_imatrix_with_the_commands_bytes(outputs, source, tmp_path):
    import yaml

    step = {"input": str(source), "gguf_type": "Q4_K_M", "imatrix": True, "calibration_sequences": SEQUENCES,
            "output": str(tmp_path / "q4")}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"steps": [{"quantize": step}]}))
    done = run_surgery("run", tmp_path / "pipeline.yaml")
    assert done.returncode == 0, done.stderr
    assert next((tmp_path / "q4").glob("*.gguf")).read_bytes() == next(outputs["imatrix"].glob("*.gguf")).read_bytes()


@pytest.mark.parametrize("options, loads", [(["--scheme", "sym", "--group-size", "64"], True),
                                            (["--scheme", "asym", "--group-size", "32"], True),
                                            (["--format", "gptq", "--scheme", "asym", "--group-size", "32"], False)])
def test_integer_grids_under_imatrix_lower_the_weighted_error_and_load(options, loads, source, tmp_path):
    """compressed-tensors and GPTQ: each group's scale (and integer zero point) searched under the importance
    (weighted_grid.py); decoded by surgery's reader, the importance-weighted error is lower than rtn's, and
    transformers loads the compressed-tensors outputs with the logits of those decoded weights (its GPTQ loader
    needs optimum, which is not installed: the layout is checked against GPTQ's spec in test_quantize.py)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from surgery.io import open_checkpoint
    from surgery.quantize.selfcal import generate_pool

    decoded = {}
    for name, extra in (("plain", []), ("imatrix", ["--imatrix", "--calibration-sequences", str(SEQUENCES)])):
        done = run_surgery("quantize", source, "-o", tmp_path / name, *options, *extra)
        assert done.returncode == 0, done.stderr
        with open_checkpoint(tmp_path / name) as ckpt:  # read decoded, one module at a time
            decoded[name] = {n.removesuffix(".weight"): ckpt.get(n).float() for n in ckpt.tensors
                             if ".layers." in n and n.endswith("_proj.weight")}
    with open_checkpoint(source) as ckpt:
        pool = generate_pool(ckpt, {"candidates": SEQUENCES, "length": 256, "greedy_tokens": 4}, 0)
    importance = hooked_importance(source, pool)
    original = load_file(source / "model.safetensors")

    def error(weights: dict) -> float:
        return sum(float((importance[n] * (original[f"{n}.weight"].double() - weights[n].double()) ** 2).sum())
                   for n in importance)

    ratio = error(decoded["imatrix"]) / error(decoded["plain"])
    assert ratio < 0.9, ratio
    if not loads:
        return
    from transformers import CompressedTensorsConfig

    # asymmetric: transformers' compressed path expects unpacked zero points, so it reads the packed ones dequantized
    settings = {} if "sym" in options else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "imatrix", dtype=torch.float32, **settings).eval()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference.load_state_dict({f"{n}.weight": w for n, w in decoded["imatrix"].items()}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, reference(TOKENS).logits, atol=1e-4, rtol=1e-4)


def test_a_quantized_lm_head_gets_the_importance_of_its_input(source, tmp_path):
    """The lm_head's input is the final norm's output: measured after the last layer without running the head, it
    is transformers' own (float64 hooks); with --ignore leaving lm_head quantized, --imatrix weighs its grid too."""
    from safetensors.torch import load_file

    from surgery.io import open_checkpoint
    from surgery.quantize.imatrix import importance_matrix, resolve
    from surgery.quantize.selfcal import generate_pool

    with open_checkpoint(source) as ckpt:
        importance, report = importance_matrix(ckpt, ["lm_head", "model.layers.3.mlp.down_proj"],
                                               resolve({"sequences": SEQUENCES, "length": 32}), seed=3)
        pool = generate_pool(ckpt, {"candidates": SEQUENCES, "length": 32, "greedy_tokens": 4}, 3)
    expected = hooked_importance(source, pool, head=True)
    assert sorted(importance) == ["lm_head", "model.layers.3.mlp.down_proj"] and report["modules"] == 2
    torch.testing.assert_close(importance["lm_head"].double(), expected["lm_head"], rtol=1e-4, atol=1e-9)

    decoded, manifests = {}, {}
    for name, extra in (("plain", []), ("imatrix", ["--imatrix", "--calibration-sequences", str(SEQUENCES)])):
        done = run_surgery("quantize", source, "-o", tmp_path / name, "--ignore", "vision", "--group-size", "64",
                           *extra)
        assert done.returncode == 0, done.stderr
        manifests[name] = json.loads((tmp_path / name / "surgery.json").read_text())
        with open_checkpoint(tmp_path / name) as ckpt:
            decoded[name] = ckpt.get("lm_head.weight").double()
    assert manifests["imatrix"]["output"]["importance_matrix"]["without_importance"] == 0
    with open_checkpoint(source) as ckpt:
        pool = generate_pool(ckpt, {"candidates": SEQUENCES, "length": 256, "greedy_tokens": 4}, 0)
    weight = hooked_importance(source, pool, head=True)["lm_head"]
    original = load_file(source / "model.safetensors")["lm_head.weight"].double()
    errors = {name: float((weight * (original - values) ** 2).sum()) for name, values in decoded.items()}
    assert errors["imatrix"] < 0.9 * errors["plain"], errors
