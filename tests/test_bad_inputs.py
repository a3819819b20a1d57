"""Bad input: one line naming the file or tensor and the reason, exit code 2, no traceback, no output left."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_surgery


def with_header(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def good_file_bytes(tmp_path: Path) -> bytes:
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 2)}, tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


F32 = lambda shape, start, end: {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}  # noqa: E731
MALFORMED_FILES = {
    "truncated data": lambda good: good[:-5],
    "shorter than its header length": lambda good: good[:6],
    "oversized header": lambda good: struct.pack("<Q", 10**12) + good[8:],
    "garbage header": lambda good: struct.pack("<Q", 24) + b"\xff\x00{" * 8 + b"\x00" * 32,
    "overlapping offsets": lambda good: with_header({"a": F32([4], 0, 16), "b": F32([4], 8, 24)}, b"\x00" * 24),
    "unknown dtype": lambda good: with_header(
        {"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 16),
    "shape disagrees with offsets": lambda good: with_header({"a": F32([5], 0, 16)}, b"\x00" * 16),
    "hole in the buffer": lambda good: with_header({"a": F32([4], 0, 16)}, b"\x00" * 32),
    "non-string metadata": lambda good: with_header({"__metadata__": {"x": 1}, "a": F32([4], 0, 16)}, b"\x00" * 16),
    "empty file": lambda good: b"",
}


def assert_bad_input(result, *names: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".out") or p.name == "out")


@pytest.mark.parametrize("case", sorted(MALFORMED_FILES))
def test_malformed_safetensors_file(case, tmp_path, tiny_checkpoints):
    bad = MALFORMED_FILES[case](good_file_bytes(tmp_path))
    # as a single file, and as the weights of a model directory
    single = tmp_path / "bad.safetensors"
    single.write_bytes(bad)
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_checkpoints["llama"] / "config.json", model)
    (model / "model.safetensors").write_bytes(bad)
    assert_bad_input(run_surgery("convert", single, "-o", tmp_path / "out"), str(single))
    assert_bad_input(run_surgery("convert", model, "-o", tmp_path / "out"), str(model / "model.safetensors"))
    assert leftovers(tmp_path) == []


def sharded_copy(sharded_llama: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "sharded"
    shutil.copytree(sharded_llama, copy)
    return copy


def test_index_naming_a_missing_shard(sharded_llama, tmp_path):
    model = sharded_copy(sharded_llama, tmp_path)
    shard = sorted(model.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_bad_input(run_surgery("convert", model, "-o", tmp_path / "out"), str(shard), "missing")
    assert leftovers(tmp_path) == []


def test_index_naming_a_tensor_its_shard_lacks(sharded_llama, tmp_path):
    model = sharded_copy(sharded_llama, tmp_path)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    assert_bad_input(run_surgery("inspect", model), first_shard, "model.layers.0.mlp.ghost.weight")


@pytest.mark.parametrize("file,content", [
    ("config.json", "{not json"),
    ("config.json", "[1, 2]"),
    ("model.safetensors.index.json", '{"weight_map": '),
    ("model.safetensors.index.json", '{"weight_map": ["a"]}'),
])
def test_bad_json(file, content, sharded_llama, tmp_path):
    model = sharded_copy(sharded_llama, tmp_path)
    (model / file).write_text(content)
    assert_bad_input(run_surgery("convert", model, "-o", tmp_path / "out"), str(model / file))
    assert leftovers(tmp_path) == []


def test_missing_config(sharded_llama, tmp_path):
    model = sharded_copy(sharded_llama, tmp_path)
    (model / "config.json").unlink()
    assert_bad_input(run_surgery("inspect", model), str(model / "config.json"), "missing")


def test_directory_without_weights(tmp_path, tiny_checkpoints):
    shutil.copy(tiny_checkpoints["llama"] / "config.json", tmp_path)
    assert_bad_input(run_surgery("inspect", tmp_path), str(tmp_path), "model.safetensors")


@pytest.mark.parametrize("source", ["no/such-model", "./not-here", "not-a-repo-id!"])
def test_missing_source(source, tmp_path):
    result = run_surgery("inspect", source, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert_bad_input(result, source)


def test_bad_options(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints["llama"]
    assert_bad_input(run_surgery("convert", source, "-o", tmp_path / "out", "--dtype", "int3"), "--dtype")
    assert_bad_input(run_surgery("convert", source, "-o", tmp_path / "out", "--max-shard-size", "lots"),
                     "--max-shard-size")
    usage = run_surgery("convert", source)  # missing -o: typer's usage error, also exit 2
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert leftovers(tmp_path) == []
