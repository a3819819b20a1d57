"""`surgery diff` against numpy, and the writer's file format against the safetensors specification."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_model, run_surgery
from surgery import report
from surgery.io import TensorInfo, open_checkpoint, write_checkpoint


@pytest.fixture(scope="module")
def base_and_finetune(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = make_tiny_model("llama", seed=3)
    base.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in base.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    base.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


def numpy_delta(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return np.linalg.norm(b - a) / np.linalg.norm(a), a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_diff_matches_numpy(base_and_finetune):
    base, tuned = base_and_finetune
    result = run_surgery("diff", base, tuned, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["tensors"]}
    with safe_open(str(base / "model.safetensors"), "np") as a, safe_open(str(tuned / "model.safetensors"), "np") as b:
        assert rows.keys() == set(a.keys())
        for name in a.keys():
            relative, cosine = numpy_delta(a.get_tensor(name), b.get_tensor(name))
            assert rows[name]["relative_delta"] == pytest.approx(relative, rel=1e-9)
            assert rows[name]["cosine"] == pytest.approx(cosine, rel=1e-9)


def test_chunked_accumulation_equals_one_pass(monkeypatch):
    a, b = torch.randn(1000, 37), torch.randn(1000, 37).to(torch.bfloat16)
    whole = report.tensor_delta(a, b)
    monkeypatch.setattr(report, "DIFF_CHUNK_ELEMENTS", 999)
    chunked = report.tensor_delta(a, b)
    expected = numpy_delta(a.numpy(), b.float().numpy())
    assert chunked["relative_delta"] == pytest.approx(expected[0], rel=1e-9)
    assert chunked["cosine"] == pytest.approx(expected[1], rel=1e-9)
    assert chunked["relative_delta"] == pytest.approx(whole["relative_delta"], rel=1e-12)


def test_diff_reports_missing_extra_and_mismatched(base_and_finetune, tmp_path):
    base, _ = base_and_finetune
    with open_checkpoint(base) as ckpt:
        names = list(ckpt.tensors)
        dropped, reshaped = names[3], "model.norm.weight"
        specs = [info for name, info in ckpt.tensors.items() if name not in (dropped, reshaped)]
        specs += [TensorInfo(reshaped, torch.float32, (3,)), TensorInfo("extra.weight", torch.float32, (2,))]
        tensors = {name: ckpt.get(name).clone() for name in names}
    tensors.update({reshaped: torch.ones(3), "extra.weight": torch.ones(2)})
    write_checkpoint(tmp_path / "b", specs, tensors.__getitem__, config=json.loads((base / "config.json").read_text()))
    result = run_surgery("diff", base, tmp_path / "b", "--json")
    assert result.returncode == 0, result.stderr
    diff = json.loads(result.stdout)
    assert diff["missing"] == [dropped] and diff["extra"] == ["extra.weight"]
    assert diff["shape_mismatch"] == [{"name": reshaped, "shape_a": [64], "shape_b": [3]}]
    assert diff["summary"]["identical"] == diff["summary"]["compared"] == len(names) - 2
    text = run_surgery("diff", base, tmp_path / "b")
    assert f"missing in B: {dropped}" in text.stdout and "shape mismatches 1" in text.stdout


def parse_header(path):
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return length, json.loads(raw[8:8 + length]), len(raw) - 8 - length


def test_written_files_follow_the_format(tmp_path):
    tensors = {
        "a.int8": torch.arange(-5, 6, dtype=torch.int8),
        "b.bf16": torch.randn(3, 5).to(torch.bfloat16),
        "c.f64": torch.randn(7, dtype=torch.float64),
        "d.f32": torch.randn(2, 3, 4),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
    }
    specs = [TensorInfo(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    write_checkpoint(tmp_path / "out", specs, tensors.__getitem__)
    length, header, buffer_size = parse_header(tmp_path / "out" / "model.safetensors")
    assert length % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    spans = sorted(entry["data_offsets"] for entry in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == buffer_size
    assert all(left[1] == right[0] for left, right in zip(spans, spans[1:]))  # no holes, no overlaps
    for name, entry in header.items():
        assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name  # aligned
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor), name


def test_tensor_larger_than_the_shard_limit_gets_its_own_shard(tmp_path):
    shapes = {"small1": (10,), "huge": (1000,), "small2": (10,)}
    specs = [TensorInfo(name, torch.float32, shape) for name, shape in shapes.items()]
    result = write_checkpoint(tmp_path / "out", specs, lambda name: torch.zeros(shapes[name]), max_shard_size=1000)
    assert sorted(result.shards.values()) == [["huge"], ["small1", "small2"]]  # Hugging Face's splitter


def test_workers_do_not_change_the_bytes(tmp_path):
    shapes = {f"t{i}": (1000 + i,) for i in range(20)}
    specs = [TensorInfo(name, torch.bfloat16, shape) for name, shape in shapes.items()]

    def load(name):
        return torch.randn(shapes[name], generator=torch.Generator().manual_seed(int(name[1:])))

    write_checkpoint(tmp_path / "serial", specs, load, max_shard_size="10KB")
    write_checkpoint(tmp_path / "threads", specs, load, max_shard_size="10KB", workers=3)
    names = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "threads").iterdir())
    assert all((tmp_path / "serial" / n).read_bytes() == (tmp_path / "threads" / n).read_bytes() for n in names)
