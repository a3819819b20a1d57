"""``surgery merge-lora``: PEFT LoRA adapters merged in adapter space. The output is loaded by PEFT; its change to
each module is compared with the task vectors recomputed here from the adapters' own factors (numpy float64), with
an independent TIES, and with ``surgery merge`` of the applied models (model space)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import run_surgery, save_peft_lora
from merge_helpers import read_numpy, save_family

LINEAR_ONLY = {"target_modules": ["q_proj", "v_proj", "up_proj"], "modules_to_save": None}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-merge")
    base, _ = save_family(root, "llama", 1)
    first = save_peft_lora(base, root / "first", seed=1, **LINEAR_ONLY)
    second = save_peft_lora(base, root / "second", seed=2, **{**LINEAR_ONLY, "target_modules": ["q_proj", "k_proj"]})
    return base, first, second


def task_vectors(adapter) -> dict[str, np.ndarray]:
    """weight name → scale · B @ A, from adapter_config.json and the factors as PEFT saved them."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = {k: v.astype(np.float64) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    deltas = {}
    for name in factors:
        if ".lora_A." not in name:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
        short = module.rsplit(".", 1)[-1]
        rank = config["rank_pattern"].get(short, config["r"])
        alpha = config["alpha_pattern"].get(short, config["lora_alpha"])
        deltas[f"{module}.weight"] = alpha / rank * (factors[name.replace("lora_A", "lora_B")] @ factors[name])
    return deltas


def peft_merged(base, adapter) -> dict[str, np.ndarray]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {name: value.detach().to(torch.float64).numpy() for name, value in model.state_dict().items()}


def ties_reference(deltas: list[np.ndarray], density: float) -> np.ndarray:
    """TIES on task vectors: keep the top density of |δ|, elect the sign of the sum, mean of the agreeing entries."""
    trimmed = []
    for delta in deltas:
        flat = delta.reshape(-1)
        keep = np.zeros(flat.size, bool)
        keep[np.argsort(-np.abs(flat), kind="stable")[:max(1, int(density * flat.size))]] = True
        trimmed.append(np.where(keep, flat, 0.0))
    stacked = np.stack(trimmed)
    sign = np.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked * sign) > 0
    count = agree.sum(0)
    return (np.where(agree, stacked, 0).sum(0) / np.maximum(count, 1)).reshape(deltas[0].shape)


def test_task_arithmetic_at_the_summed_rank_is_exact(adapters, tmp_path):
    base, first, second = adapters
    out = tmp_path / "merged"
    result = run_surgery("merge-lora", first, second, "--base", base, "-o", out, "--weights", "0.7,0.5", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ranks"]["model.layers.0.self_attn.q_proj"] == 8  # 4 + 4
    assert summary["ranks"]["model.layers.0.mlp.up_proj"] == 2 and summary["ranks"]["model.layers.1.self_attn.k_proj"] == 4
    assert summary["max_relative_error"] < 1e-5
    merged, original = peft_merged(base, out), read_numpy(base)
    ones, twos = task_vectors(first), task_vectors(second)
    assert set(summary["ranks"]) == {name.removesuffix(".weight") for name in ones | twos}
    for name in original:
        expected = original[name] + 0.7 * ones.get(name, 0) + 0.5 * twos.get(name, 0)
        np.testing.assert_allclose(merged[name], expected, rtol=0, atol=2e-6, err_msg=name)
    assert "task_arithmetic** merge of 2 LoRA adapter(s)" in (out / "README.md").read_text()


def test_ties_in_adapter_space_is_ties_of_the_applied_models(adapters, tmp_path):
    base, first, second = adapters
    out = tmp_path / "merged"
    result = run_surgery("merge-lora", first, second, "--base", base, "--method", "ties", "--density", "0.3",
                         "--rank", "64", "-o", out)
    assert result.returncode == 0, result.stderr
    merged, original = peft_merged(base, out), read_numpy(base)
    ones, twos = task_vectors(first), task_vectors(second)
    for name in ones | twos:
        zeros = np.zeros_like(original[name])
        expected = original[name] + ties_reference([ones.get(name, zeros), twos.get(name, zeros)], 0.3)
        np.testing.assert_allclose(merged[name], expected, rtol=0, atol=2e-6, err_msg=name)
    model_space = tmp_path / "model-space"
    done = run_surgery("merge", base, f"{base}+{first}", f"{base}+{second}", "--method", "ties", "--density", "0.3",
                       "-o", model_space)
    assert done.returncode == 0, done.stderr
    theirs = read_numpy(model_space)
    for name in ones | twos:
        np.testing.assert_allclose(merged[name], theirs[name], rtol=0, atol=2e-6, err_msg=name)


def test_a_fixed_rank_keeps_the_best_approximation(adapters, tmp_path):
    base, first, second = adapters
    out = tmp_path / "merged"
    result = run_surgery("merge-lora", first, second, "--base", base, "--method", "dare_ties", "--density", "0.5",
                         "--seed", "3", "--rank", "2", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary["ranks"].values()) == {2}
    factors = load_file(out / "adapter_model.safetensors")
    worst = 0.0
    for module in summary["ranks"]:
        prefix = f"base_model.model.{module}"
        low_rank = factors[f"{prefix}.lora_B.weight"].astype(np.float64) @ factors[f"{prefix}.lora_A.weight"]
        assert np.linalg.matrix_rank(low_rank) <= 2
        worst = max(worst, float(np.linalg.norm(low_rank)))
    assert worst > 0
    full = tmp_path / "full"
    assert run_surgery("merge-lora", first, second, "--base", base, "--method", "dare_ties", "--density", "0.5",
                       "--seed", "3", "--rank", "64", "-o", full).returncode == 0
    full_factors = load_file(full / "adapter_model.safetensors")
    errors = []
    for module in summary["ranks"]:
        prefix = f"base_model.model.{module}"
        dense = full_factors[f"{prefix}.lora_B.weight"].astype(np.float64) @ full_factors[f"{prefix}.lora_A.weight"]
        low = factors[f"{prefix}.lora_B.weight"].astype(np.float64) @ factors[f"{prefix}.lora_A.weight"]
        s = np.linalg.svd(dense, compute_uv=False)
        best = np.sqrt((s[2:] ** 2).sum()) / np.sqrt((s ** 2).sum())  # Eckart-Young: the best rank-2 error
        errors.append(np.linalg.norm(dense - low) / np.linalg.norm(dense))
        assert errors[-1] == pytest.approx(best, rel=1e-3, abs=1e-6), module
    assert summary["max_relative_error"] == pytest.approx(max(errors), rel=1e-3)
    again = tmp_path / "again"
    assert run_surgery("merge-lora", first, second, "--base", base, "--method", "dare_ties", "--density", "0.5",
                       "--seed", "3", "--rank", "2", "-o", again).returncode == 0
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--method", "slerp"], "--method slerp: adapter-space merging takes"),
    (["--rank", "2", "--energy", "0.9"], "give --rank R or --energy E, not both"),
    (["--density", "2", "--method", "ties"], "density"),
    (["--weights", "1"], "--weights: 1 value(s) for 2 non-base model(s)"),
])
def test_bad_options_are_one_line_errors(adapters, tmp_path, extra, message):
    base, first, second = adapters
    result = run_surgery("merge-lora", first, second, "--base", base, "-o", tmp_path / "out", *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_embedding_loras_and_whole_modules_merge_as_the_applied_models_do(adapters, tmp_path):
    """PEFT's own adapters with an embedding LoRA and lm_head saved whole (conftest.save_peft_lora's defaults):
    merged at full rank, base + adapter is every tensor of the model-space merge."""
    base = adapters[0]
    full = [save_peft_lora(base, tmp_path / f"full{seed}", seed=seed) for seed in (5, 6)]
    out = tmp_path / "merged"
    result = run_surgery("merge-lora", *full, "--base", base, "--method", "ties", "--density", "0.4",
                         "--rank", "64", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    assert "model.embed_tokens" in json.loads(result.stdout)["ranks"]
    done = run_surgery("merge", base, *[f"{base}+{adapter}" for adapter in full], "--method", "ties",
                       "--density", "0.4", "-o", tmp_path / "model-space")
    assert done.returncode == 0, done.stderr
    merged, theirs = peft_merged(base, out), read_numpy(tmp_path / "model-space")
    assert merged.keys() == theirs.keys()
    for name in theirs:  # float32 SVD and W0 + Δ − W0: errors of 1e-5 of the largest entry (embeddings reach 7)
        np.testing.assert_allclose(merged[name], theirs[name], rtol=0, atol=1e-5 * np.abs(theirs[name]).max(),
                                   err_msg=name)


def test_a_pipeline_step_merges_adapters_as_the_command_does(adapters, tmp_path):
    base, first, second = adapters
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"steps:\n  - merge-lora: {{adapters: [{first}, {second}], base: {base}, method: ties, "
                        f"density: 0.3, rank: 4, output: {tmp_path / 'step'}}}\n")
    assert run_surgery("run", pipeline).returncode == 0
    command = run_surgery("merge-lora", first, second, "--base", base, "--method", "ties", "--density", "0.3",
                          "--rank", "4", "-o", tmp_path / "command")
    assert command.returncode == 0, command.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "step" / name).read_bytes() == (tmp_path / "command" / name).read_bytes()
    again = run_surgery("run", pipeline)
    assert again.returncode == 0 and "up to date" in again.stdout
    pipeline.write_text(pipeline.read_text().replace("adapters: [", "adapters: 5, x: ["))
    bad = run_surgery("run", pipeline)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
