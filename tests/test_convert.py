"""convert: round trips through the real command, loaded back by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import TINY_CONFIGS, logits, run_surgery

INPUT_IDS = torch.tensor([[1, 5, 17, 42, 99, 3, 150, 7, 64, 2]])


def read_all(directory):
    """Every tensor of a checkpoint directory, read with the reference safetensors reader."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_round_trip_keeps_logits(model_type, tiny_checkpoints, tmp_path):
    source = tiny_checkpoints[model_type]
    result = run_surgery("convert", source, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert torch.equal(logits(source, INPUT_IDS), logits(tmp_path / "out", INPUT_IDS))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_bfloat16_cast_matches_transformers_cast(model_type, tiny_checkpoints, tmp_path):
    source = tiny_checkpoints[model_type]
    assert run_surgery("convert", source, "-o", tmp_path / "bf16", "--dtype", "bfloat16").returncode == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    expected = logits(source, INPUT_IDS, dtype=torch.bfloat16)
    assert torch.equal(expected, logits(tmp_path / "bf16", INPUT_IDS))
    assert all(t.dtype == torch.bfloat16 for t in read_all(tmp_path / "bf16").values())


def test_sharded_to_single_and_back(sharded_llama, tmp_path):
    original = read_all(sharded_llama)
    assert run_surgery("convert", sharded_llama, "-o", tmp_path / "single", "--max-shard-size", "10GB").returncode == 0
    assert sorted(p.name for p in (tmp_path / "single").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()

    assert run_surgery("convert", tmp_path / "single", "-o", tmp_path / "resharded",
                       "--max-shard-size", "30KB").returncode == 0
    index = json.loads((tmp_path / "resharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "resharded").glob("*.safetensors"))
    count = len(shards)
    assert count > 2 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    resharded = read_all(tmp_path / "resharded")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in resharded.values())
    for shard in shards:  # every shard within the limit unless it holds a single larger tensor
        with safe_open(str(tmp_path / "resharded" / shard), framework="pt") as handle:
            names = list(handle.keys())
            size = sum(resharded[n].numel() * resharded[n].element_size() for n in names)
            assert size <= 30_000 or len(names) == 1
    assert resharded.keys() == original.keys()
    assert all(torch.equal(resharded[name], original[name]) for name in original)
    assert torch.equal(logits(sharded_llama, INPUT_IDS), logits(tmp_path / "resharded", INPUT_IDS))


def test_same_inputs_give_identical_bytes(sharded_llama, tmp_path):
    for name in ("first", "second"):
        assert run_surgery("convert", sharded_llama, "-o", tmp_path / name, "--dtype", "float16",
                           "--max-shard-size", "50KB").returncode == 0
    first = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "second").iterdir())
    for name in first:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_dry_run_writes_nothing(sharded_llama, tmp_path):
    result = run_surgery("convert", sharded_llama, "-o", tmp_path / "out", "--max-shard-size", "50KB",
                         "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert not (tmp_path / "out").exists()
    tensors = read_all(sharded_llama)
    assert plan["total_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sum(shard["tensors"] for shard in plan["shards"].values()) == len(tensors)


def test_existing_output_needs_force(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    first = run_surgery("convert", tiny_checkpoints["llama"], "-o", out)
    assert first.returncode == 0, first.stderr
    (out / "stale.txt").write_text("from an earlier run")
    refused = run_surgery("convert", tiny_checkpoints["llama"], "-o", out)
    assert refused.returncode == 2 and "already exists" in refused.stderr
    assert (out / "stale.txt").exists()
    replaced = run_surgery("convert", tiny_checkpoints["llama"], "-o", out, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or replaced directories left behind


def test_force_never_replaces_a_directory_that_holds_no_checkpoint(tiny_checkpoints, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    refused = run_surgery("convert", tiny_checkpoints["llama"], "-o", mine, "--force")
    assert refused.returncode == 2 and "holds no checkpoint" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_surgery("convert", tiny_checkpoints["llama"], "-o", empty, "--force").returncode == 0


def test_tilde_in_the_output_is_the_home_directory(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    done = run_surgery("convert", tiny_checkpoints["llama"], "-o", "~/converted")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "home" / "converted" / "model.safetensors").is_file()
    assert not Path(tmp_path / "~").exists()
