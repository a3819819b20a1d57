"""`MODEL+ADAPTER` inputs: a PEFT LoRA applied tensor by tensor as the model is read gives exactly PEFT's own
merge_and_unload weights, for every command and in mergekit configs (`model: {model, lora}`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from conftest import run_surgery, save_peft_lora
from merge_helpers import read_numpy, save_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-input")
    base, tuned = save_family(root, "llama", 1)
    return root, base, tuned


def _peft_merged(base, adapter) -> dict[str, np.ndarray]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    return {name: value.detach().to(torch.float64).numpy() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("settings", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_applied_adapter_is_peft_merge_and_unload(settings, family, tmp_path):
    """Rank and alpha patterns, rsLoRA's α/√r, embeddings (B·A transposed) and modules_to_save, as PEFT does."""
    root, base, _ = family
    adapter = save_peft_lora(base, tmp_path / "adapter", **settings)
    result = run_surgery("convert", f"{base}+{adapter}", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ours, theirs, original = read_numpy(tmp_path / "out"), _peft_merged(base, adapter), read_numpy(base)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)
    changed = {name for name in ours if not np.array_equal(ours[name], original[name])}
    assert changed == {"lm_head.weight", "model.embed_tokens.weight"} | {
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                    "mlp.up_proj")}


def test_mergekit_lora_entries_merge_the_adapted_model(family, tmp_path):
    """mergekit's `model: {model, lora}` and `model+lora` forms: the merge of the adapted model, as if it had been
    merged into its weights first (PEFT's merge_and_unload, saved, then merged)."""
    root, base, tuned = family
    adapter = save_peft_lora(base, tmp_path / "adapter", seed=1)
    assert run_surgery("convert", f"{tuned}+{adapter}", "-o", tmp_path / "adapted").returncode == 0
    for label, entry in (("dict", {"model": {"model": str(tuned), "lora": str(adapter)}}),
                         ("string", {"model": f"{tuned}+{adapter}"}),
                         ("merged first", {"model": str(tmp_path / "adapted")})):
        config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                  "models": [{**entry, "parameters": {"weight": 0.7}}]}
        (tmp_path / f"{label}.yml").write_text(yaml.safe_dump(config))
        result = run_surgery("merge", "--recipe", tmp_path / f"{label}.yml", "-o", tmp_path / label)
        assert result.returncode == 0, result.stderr
    reference = read_numpy(tmp_path / "merged first")
    for label in ("dict", "string"):
        merged = read_numpy(tmp_path / label)
        assert merged.keys() == reference.keys()
        for name in merged:
            np.testing.assert_array_equal(merged[name], reference[name], err_msg=f"{label} {name}")


def test_extracted_lora_applied_to_its_base_gives_the_fine_tune(family, tmp_path):
    """extract-lora at full rank, then BASE+ADAPTER: the fine-tune's Linear weights (its norms stay the base's)."""
    root, base, tuned = family
    assert run_surgery("extract-lora", tuned, "--base", base, "--rank", "64", "-o", tmp_path / "lora").returncode == 0
    assert run_surgery("convert", f"{base}+{tmp_path / 'lora'}", "-o", tmp_path / "out").returncode == 0
    ours, fine, original = read_numpy(tmp_path / "out"), read_numpy(tuned), read_numpy(base)
    for name in ours:
        expected = fine[name] if ".layers." in name and fine[name].ndim == 2 else original[name]
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=2e-6, err_msg=name)
