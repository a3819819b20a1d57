"""`surgery extract-lora`: a fine-tune's change as a PEFT LoRA that PeftModel loads; base + adapter reproduces the
fine-tune's Linear layers within the truncation error it reports, checked against numpy's SVD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_tiny_model, run_surgery
from merge_helpers import read_numpy

LOW_RANK = 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A llama base; `lowrank`: every Linear of its layers changed by a rank-3 matrix and its norms changed too;
    `noisy`: every weight changed by full-rank noise."""
    root = tmp_path_factory.mktemp("extract-lora")
    base = make_tiny_model("llama")
    base.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(7)
    lowrank, noisy = make_tiny_model("llama"), make_tiny_model("llama")
    with torch.no_grad():
        for (name, low), (_, noise) in zip(lowrank.named_parameters(), noisy.named_parameters()):
            noise.add_(0.02 * torch.randn(noise.shape, generator=generator))
            if ".layers." in name and low.ndim == 2:
                rows, columns = low.shape
                low.add_(0.05 * torch.randn(rows, LOW_RANK, generator=generator)
                         @ torch.randn(LOW_RANK, columns, generator=generator))
            elif "norm" in name:
                low.mul_(1.1)
    lowrank.save_pretrained(root / "lowrank")
    noisy.save_pretrained(root / "noisy")
    return root


def _linear_names(tensors: dict) -> list[str]:
    return [name for name, value in tensors.items() if ".layers." in name and value.ndim == 2]


def test_low_rank_change_comes_back_exactly_through_peft(models, tmp_path):
    """Rank 3 recovers a rank-3 change: PEFT's merged weights equal the fine-tune's Linear weights, its logits
    those of the base with those weights; the changed norms are reported as not carried."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_surgery("extract-lora", models / "lowrank", "--base", models / "base", "--rank", str(LOW_RANK),
                         "-o", tmp_path / "lora", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    tuned, base = read_numpy(models / "lowrank"), read_numpy(models / "base")
    assert set(summary["ranks"]) == {name.removesuffix(".weight") for name in _linear_names(tuned)}
    assert summary["max_relative_error"] < 1e-5 and summary["kept_energy"] > 1 - 1e-9
    assert sorted(summary["not_carried"]) == sorted(n for n in tuned if "norm" in n)

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models / "base"), tmp_path / "lora")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    expected_model = AutoModelForCausalLM.from_pretrained(models / "base")
    state = {name: torch.from_numpy(tuned[name]).float() for name in _linear_names(tuned)}
    expected_model.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, expected_model(ids).logits, rtol=1e-4, atol=1e-4)
    merged = {name: value.detach().numpy() for name, value in adapted.merge_and_unload().state_dict().items()}
    for name in _linear_names(tuned):
        np.testing.assert_allclose(merged[name], tuned[name], rtol=0, atol=1e-5, err_msg=name)
    for name in summary["not_carried"]:  # the base's norms stay
        np.testing.assert_array_equal(merged[name], base[name])
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "model.norm.weight" in card


def test_energy_picks_the_smallest_rank_numpy_agrees_with(models, tmp_path):
    """--energy 0.6: per module the smallest r with Σ_{i≤r} σi² ≥ 0.6 ‖Δ‖², the error √(1 − kept) numpy gives."""
    result = run_surgery("extract-lora", models / "noisy", "--base", models / "base", "--energy", "0.6",
                         "-o", tmp_path / "lora", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    tuned, base = read_numpy(models / "noisy"), read_numpy(models / "base")
    worst, kept, total = 0.0, 0.0, 0.0
    for name in _linear_names(tuned):
        singular = np.linalg.svd(tuned[name] - base[name], compute_uv=False)
        share = np.cumsum(singular ** 2) / np.sum(singular ** 2)
        rank = int(np.argmax(share >= 0.6)) + 1
        assert summary["ranks"][name.removesuffix(".weight")] == rank, name
        worst = max(worst, float(np.sqrt(1 - share[rank - 1])))
        kept, total = kept + np.sum(singular[:rank] ** 2), total + np.sum(singular ** 2)
    assert summary["max_relative_error"] == pytest.approx(worst, rel=1e-4)
    assert summary["kept_energy"] == pytest.approx(kept / total, rel=1e-5)
    lora = read_numpy(tmp_path / "lora")
    name = _linear_names(tuned)[0].removesuffix(".weight")
    a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == summary["ranks"][name]


def test_randomised_svd_is_near_optimal_and_seeded():
    """Above EXACT_BELOW the range finder's rank-20 approximation is within 0.5 % of the optimal error, and the
    same seed gives the same factors."""
    from surgery.adapters.lora import EXACT_BELOW, singular_triplets

    generator = torch.Generator().manual_seed(3)
    rows, columns = EXACT_BELOW + 300, EXACT_BELOW + 100
    signal = torch.randn(rows, 20, generator=generator) @ torch.randn(20, columns, generator=generator)
    delta = signal + 0.3 * torch.randn(rows, columns, generator=generator)
    u, s, vt = singular_triplets(delta, 20, torch.Generator().manual_seed(0))
    exact = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    optimal = np.sqrt(np.sum(exact[20:] ** 2))
    error = float((delta - (u * s) @ vt).double().norm())
    assert 0.99999 * optimal <= error <= 1.005 * optimal  # float32 vs float64
    again = singular_triplets(delta, 20, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip((u, s, vt), again))


def test_same_seed_same_bytes_and_bad_inputs_leave_nothing(models, tmp_path):
    for out in ("one", "two"):
        assert run_surgery("extract-lora", models / "noisy", "--base", models / "base", "--rank", "2",
                           "-o", tmp_path / out).returncode == 0
    assert (tmp_path / "one" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "two" / "adapter_model.safetensors").read_bytes()
    pipeline = tmp_path / "pipeline.yaml"  # the same as a pipeline step
    pipeline.write_text(f"steps:\n  - extract-lora: {{input: {models / 'noisy'}, base: {models / 'base'}, rank: 2, "
                        f"output: {tmp_path / 'step'}}}\n")
    assert run_surgery("run", pipeline).returncode == 0
    assert (tmp_path / "step" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    qwen = make_tiny_model("qwen2", hidden_size=48)
    qwen.save_pretrained(tmp_path / "other")
    for arguments, message in (
            ([models / "noisy", "--base", models / "base"], "give --rank R or --energy E"),
            ([models / "noisy", "--base", models / "base", "--energy", "1.5"], "--energy 1.5: must be in (0, 1]"),
            ([models / "base", "--base", models / "base", "--rank", "2"], "nothing to extract"),
            ([tmp_path / "other", "--base", models / "base", "--rank", "2"], "tensor 'model.embed_tokens.weight' is")):
        result = run_surgery("extract-lora", *arguments, "-o", tmp_path / "bad")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def everything_changed(tmp_path_factory):
    """A llama base and a fine-tune whose Linear layers and embedding change by rank-3 matrices and whose norms
    and lm_head change freely."""
    root = tmp_path_factory.mktemp("extract-everything")
    make_tiny_model("llama").save_pretrained(root / "base")
    tuned = make_tiny_model("llama")
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, value in tuned.named_parameters():
            if value.ndim == 2 and "lm_head" not in name:
                rows, columns = value.shape
                value.add_(0.05 * torch.randn(rows, LOW_RANK, generator=generator)
                           @ torch.randn(LOW_RANK, columns, generator=generator))
            else:
                value.add_(0.01 * torch.randn(value.shape, generator=generator))
    tuned.save_pretrained(root / "tuned")
    return root


def test_embeddings_and_saved_modules_carry_the_whole_fine_tune(everything_changed, tmp_path):
    """--embeddings and --save-module for the norms and lm_head: PEFT's merged model is the fine-tune, every tensor."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = everything_changed
    saved = ["input_layernorm", "post_attention_layernorm", "model.norm", "lm_head"]
    result = run_surgery("extract-lora", root / "tuned", "--base", root / "base", "--rank", str(LOW_RANK),
                         "--embeddings", *[a for m in saved for a in ("--save-module", m)], "-o", tmp_path / "lora",
                         "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["not_carried"] == {} and summary["ranks"]["model.embed_tokens"] == LOW_RANK
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == sorted(saved)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"),
                                       tmp_path / "lora").merge_and_unload()
    tuned = read_numpy(root / "tuned")
    state = {name: value.detach().numpy() for name, value in merged.state_dict().items()}
    assert state.keys() == tuned.keys()
    for name in tuned:
        np.testing.assert_allclose(state[name], tuned[name], rtol=0, atol=1e-5, err_msg=name)
    assert "Saved whole, as PEFT's modules_to_save" in (tmp_path / "lora" / "README.md").read_text()


@pytest.mark.parametrize("arguments, message", [
    (["--save-module", "q_proj"], "is a Linear layer the LoRA covers"),
    (["--save-module", "nothing_here"], "--save-module nothing_here: "),
    (["--save-module", ".norm"], "--save-module '.norm': a module name"),
])
def test_bad_save_modules_are_one_line_errors(everything_changed, tmp_path, arguments, message):
    root = everything_changed
    result = run_surgery("extract-lora", root / "tuned", "--base", root / "base", "--rank", "2", *arguments,
                         "-o", tmp_path / "lora")
    assert result.returncode == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "lora").exists()


def test_embeddings_of_a_tied_model_are_refused(tmp_path):
    make_tiny_model("qwen2").save_pretrained(tmp_path / "base")
    tuned = make_tiny_model("qwen2")
    with torch.no_grad():
        tuned.get_input_embeddings().weight.add_(0.01)
        tuned.model.layers[0].mlp.up_proj.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    result = run_surgery("extract-lora", tmp_path / "tuned", "--base", tmp_path / "base", "--rank", "2",
                         "--embeddings", "-o", tmp_path / "lora")
    assert result.returncode == 2 and "ties lm_head to the embedding" in result.stderr
