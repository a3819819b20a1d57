"""`surgery merge` as users drive it: errors, determinism, manifest reproduction, recipes, vocabularies, cards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import make_tiny_model, run_surgery
from merge_helpers import read_numpy, save_family
from surgery.io import TensorInfo, open_checkpoint, write_checkpoint
from test_bad_inputs import assert_bad_input


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("behaviour"), "llama", 3)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("qwen"), "qwen2", 1)


def rewrite(source, out, change):
    """Copy checkpoint ``source`` to ``out`` with ``change(tensors, specs, config)`` applied."""
    with open_checkpoint(source) as ckpt:
        tensors = {name: ckpt.get(name).clone() for name in ckpt.tensors}
        config = dict(ckpt.config)
    change(tensors, config)
    specs = [TensorInfo(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_checkpoint(out, specs, tensors.__getitem__, config=config)
    return out


def test_errors_are_one_line(family, qwen, tmp_path):
    base, ft1, ft2, _ = family
    out = tmp_path / "out"
    assert_bad_input(run_surgery("merge", base, qwen[1], "--method", "ties", "-o", out), "architecture mismatch")
    missing = rewrite(ft1, tmp_path / "missing", lambda t, c: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_bad_input(run_surgery("merge", base, missing, "--method", "ties", "-o", out), str(missing),
                     "model.layers.1.mlp.up_proj.weight")
    reshaped = rewrite(ft1, tmp_path / "reshaped",
                       lambda t, c: t.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 64)}))
    assert_bad_input(run_surgery("merge", base, reshaped, "--method", "ties", "-o", out),
                     "model.layers.0.mlp.down_proj.weight", str(base), str(reshaped))
    poisoned = rewrite(ft1, tmp_path / "nan", lambda t, c: t["model.norm.weight"].__setitem__(3, float("nan")))
    assert_bad_input(run_surgery("merge", base, poisoned, "--method", "task_arithmetic", "-o", out), str(poisoned),
                     "model.norm.weight", "NaN")
    assert_bad_input(run_surgery("merge", base, ft1, "--method", "frankenstein", "-o", out), "frankenstein")
    assert_bad_input(run_surgery("merge", base, ft1, ft2, "--method", "linear", "--density", "0.5", "-o", out),
                     "density", "linear")
    assert_bad_input(run_surgery("merge", base, ft1, "--method", "model_stock", "-o", out), "model_stock")
    assert_bad_input(run_surgery("merge", base, ft1, ft2, "--method", "ties", "--weights", "1", "-o", out),
                     "--weights")
    assert_bad_input(run_surgery("merge", ft1, "--method", "passthrough", "--weights", "2", "-o", out),
                     "'weight'", "passthrough")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_manifest_reproduces_bit_for_bit(family, tmp_path):
    base, ft1, ft2, _ = family
    first = run_surgery("merge", base, ft1, ft2, "--method", "dare_ties", "--density", "0.3", "--seed", "11",
                        "--weights", "0.6,0.4", "--dtype", "bfloat16", "-o", tmp_path / "first")
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "first" / "surgery.json").read_text())
    assert manifest["recipe"]["seed"] == 11 and manifest["recipe"]["method"] == "dare_ties"
    assert [i["source"] for i in manifest["inputs"]] == [str(base), str(ft1), str(ft2)]
    assert all(len(digest) == 64 for i in manifest["inputs"] for digest in i["sha256"].values())
    again = run_surgery("merge", "--recipe", tmp_path / "first" / "surgery.json", "-o", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    names = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_model_card_front_matter(family, tmp_path):
    from huggingface_hub import ModelCard

    base, ft1, _, _ = family
    for path in (base, ft1):
        (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    result = run_surgery("merge", base, ft1, "--method", "ties", "--density", "0.2", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model_relation == "merge" and card.data.license == "apache-2.0"
    assert {"surgery", "merge", "ties"} <= set(card.data.tags)
    assert '"density": 0.2' in card.text and str(ft1) in card.text


def test_recipe_with_gradient_and_filter(family, tmp_path):
    base, ft1, ft2, _ = family
    recipe = {
        "method": "task_arithmetic", "base": str(base),
        "models": [{"model": str(ft1), "parameters": {"weight": [0.0, 1.0]}},  # layer 0 → 0, layer 1 → 1
                   {"model": str(ft2), "parameters": {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 0.0}]}}],
        "parameters": {"lambda": 0.5}, "dtype": "float32",
    }
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    result = run_surgery("merge", "--recipe", tmp_path / "recipe.yml", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged, b, m1, m2 = (read_numpy(p) for p in (tmp_path / "out", base, ft1, ft2))
    for name in merged:
        layer = 1 if ".layers.1." in name else 0  # outside the layers the gradient sits at its start
        w1 = float(layer)
        w2 = 2.0 if "mlp" in name else 0.0
        expected = b[name] + 0.5 * (w1 * (m1[name] - b[name]) + w2 * (m2[name] - b[name]))
        np.testing.assert_allclose(merged[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_different_vocabulary_sizes(family, tmp_path):
    base, ft1, _, _ = family
    bigger = make_tiny_model("llama", seed=0)
    bigger.resize_token_embeddings(176)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in bigger.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    bigger.save_pretrained(tmp_path / "bigger")
    b, big = read_numpy(base), read_numpy(tmp_path / "bigger")

    result = run_surgery("merge", base, tmp_path / "bigger", "--method", "task_arithmetic", "--dtype", "float32",
                         "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    merged = read_numpy(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[name].shape == b[name].shape  # the base's vocabulary (160 rows)
        np.testing.assert_allclose(merged[name], big[name][:160], rtol=1e-6, atol=1e-7)

    result = run_surgery("merge", base, tmp_path / "bigger", "--method", "task_arithmetic", "--dtype", "float32",
                         "--tokenizer-source", tmp_path / "bigger", "-o", tmp_path / "wide")
    assert result.returncode == 0, result.stderr
    wide = read_numpy(tmp_path / "wide")
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["vocab_size"] == 176
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_allclose(wide[name][:160], big[name][:160], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(wide[name][160:], big[name][160:], rtol=1e-6, atol=1e-7)  # new tokens: theirs
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "wide").get_input_embeddings().num_embeddings == 176


def test_tied_and_untied_embeddings(qwen, tmp_path):
    """qwen2 tiny models tie embeddings. A tied base keeps the output tied (an untied model's lm_head is ignored);
    an untied base takes a tied model's embedding as that model's lm_head."""
    base, tuned = qwen

    def untie(tensors, config):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 2
        config["tie_word_embeddings"] = False

    untied = rewrite(tuned, tmp_path / "untied", untie)
    result = run_surgery("merge", base, untied, "--method", "task_arithmetic", "-o", tmp_path / "tied-out")
    assert result.returncode == 0, result.stderr
    assert "lm_head.weight" not in read_numpy(tmp_path / "tied-out")

    result = run_surgery("merge", untied, tuned, "--method", "task_arithmetic", "-o", tmp_path / "untied-out")
    assert result.returncode == 0, result.stderr
    merged, b, t = read_numpy(tmp_path / "untied-out"), read_numpy(untied), read_numpy(tuned)
    expected = b["lm_head.weight"] + (t["model.embed_tokens.weight"] - b["lm_head.weight"])
    np.testing.assert_allclose(merged["lm_head.weight"], expected, rtol=1e-6, atol=1e-7)


def test_dry_run_prints_the_plan(family, tmp_path):
    base, ft1, ft2, _ = family
    result = run_surgery("merge", base, ft1, ft2, "--method", "ties", "--density", "0.2", "--dry-run", "--json",
                         "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["method"] == "ties" and plan["base"] == str(base) and plan["models"] == [str(ft1), str(ft2)]
    assert plan["tensors"] == len(read_numpy(base)) and not (tmp_path / "out").exists()


def test_content_hashes_are_real_and_remembered(family, tmp_path, monkeypatch):
    import hashlib

    from surgery import provenance

    base = family[0]
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    cache: dict = {}
    expected = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert provenance.content_hash(base / "model.safetensors", cache) == expected
    assert list(cache.values()) == [expected]
    # a Hub blob is named by its SHA-256: nothing is read
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"not really")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    assert provenance.content_hash(link, {}) == "ab" * 32
    # touching the file invalidates the remembered hash
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(b"one")
    first = provenance.content_hash(copy, cache)
    copy.write_bytes(b"two")
    import os

    os.utime(copy, ns=(1, 1))
    assert provenance.content_hash(copy, cache) != first
