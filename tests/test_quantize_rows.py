"""rtn fitted a chunk of rows at a time (formats/base.py fit_rows) is the whole-module fit byte for byte; the
chunked finiteness check (io/checkpoint.all_finite) and the memory helpers (surgery/memory.py) it relies on."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from surgery.io.checkpoint import all_finite
from surgery.quantize.formats import base
from surgery.quantize.formats.base import NonFiniteWeight, fit_rows
from surgery.quantize.grid import Scheme, rtn
from surgery.quantize.methods import method_named

COLUMNS = 256


def rtn_fit():
    fit, _ = method_named("rtn").prepare(None, {}, None, torch.bfloat16, torch.device("cpu"))
    return fit


def heavy_tailed(rows: int = 37, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, COLUMNS, generator=generator) * 0.02
    weight[3, 17] = 0.9  # an outlier, and an all-zero group
    weight[5, 128:] = 0
    return weight.to(torch.bfloat16)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fit_rows_is_the_whole_weight_fit_with_its_errors(symmetric, monkeypatch):
    monkeypatch.setattr(base, "ROW_CHUNK_ELEMENTS", 5 * COLUMNS)  # 5 rows a chunk; the last one has 2
    scheme = Scheme(bits=4, group_size=64, symmetric=symmetric)
    weight = heavy_tailed()
    grid, error_sq, norm_sq = fit_rows(rtn_fit(), "m", weight, scheme)
    whole = rtn(weight.float(), scheme, torch.bfloat16)
    assert torch.equal(grid.q, whole.q) and torch.equal(grid.scale, whole.scale) and torch.equal(grid.zero, whole.zero)
    # the errors, recomputed in float64 from the grid's integers
    w = weight.double().numpy()
    q = grid.q.double().numpy().reshape(37, -1, 64)
    approx = ((q - grid.zero.double().numpy()[..., None]) * grid.scale.double().numpy()[..., None]).reshape(37, -1)
    assert error_sq == pytest.approx(float(((w - approx) ** 2).sum()), rel=1e-5)
    assert norm_sq == pytest.approx(float((w ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("row", [0, 17, 36])  # first, a middle and the last (short) chunk
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_fit_rows_finds_a_non_finite_value_in_any_chunk(row, value, monkeypatch):
    monkeypatch.setattr(base, "ROW_CHUNK_ELEMENTS", 5 * COLUMNS)
    weight = heavy_tailed()
    weight[row, 200] = value
    with pytest.raises(NonFiniteWeight):
        fit_rows(rtn_fit(), "m", weight, Scheme(bits=4, group_size=64))


def test_fit_rows_accepts_finite_weights_whose_squares_overflow_float32():
    weight = heavy_tailed(rows=8)
    weight[2, 9] = 1e30  # finite in bf16; its square is not in float32
    grid, error_sq, norm_sq = fit_rows(rtn_fit(), "m", weight, Scheme(bits=8, group_size=64))
    assert norm_sq == pytest.approx(float((weight.double() ** 2).sum()), rel=1e-6)
    assert grid.q.dtype == torch.int8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn])
def test_all_finite_agrees_with_isfinite_in_every_chunk(dtype, monkeypatch):
    from surgery.io import checkpoint

    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 7)  # 101 elements: 15 chunks, the last one of 3
    rng = np.random.default_rng(0)
    bad = [float("nan"), float("inf"), -float("inf")] if dtype != torch.float8_e4m3fn else [float("nan")]
    for trial in range(60):
        tensor = torch.tensor(rng.normal(size=101), dtype=torch.float32)
        if trial % 4:
            tensor[int(rng.integers(101))] = bad[trial % len(bad)]
        tensor = tensor.to(dtype).reshape(1, 101)
        assert all_finite(tensor) == bool(torch.isfinite(tensor.float()).all()), (trial, tensor)
    assert all_finite(torch.zeros(0, 5, dtype=dtype))


@pytest.mark.parametrize("fmt, scheme", [("compressed-tensors", "sym"), ("compressed-tensors", "asym"),
                                         ("gptq", "asym")])
def test_quantize_by_rows_writes_the_bytes_of_the_whole_module_fit(fmt, scheme, tiny_checkpoints, tmp_path,
                                                                   monkeypatch):
    from surgery.quantize.engine import QuantizeConfig, quantize

    source = str(tiny_checkpoints["llama"])
    options = dict(format=fmt, scheme=scheme, group_size=32)
    monkeypatch.setattr(base, "ROW_CHUNK_ELEMENTS", 3 * 64)  # a few rows at a time (the model is 64 wide)
    chunked = quantize(QuantizeConfig(source, str(tmp_path / "rows"), **options))
    monkeypatch.setattr(method_named("rtn"), "row_separable", False)
    whole = quantize(QuantizeConfig(source, str(tmp_path / "whole"), **options))
    shards = sorted(path.name for path in (tmp_path / "whole").glob("*.safetensors"))
    assert shards == sorted(path.name for path in (tmp_path / "rows").glob("*.safetensors")) and shards
    for shard in shards:
        assert (tmp_path / "rows" / shard).read_bytes() == (tmp_path / "whole" / shard).read_bytes(), shard
    chunked_error = chunked.measurements["weight_relative_error"]
    assert chunked_error == pytest.approx(whole.measurements["weight_relative_error"], rel=1e-5)


def test_giving_memory_back_starts_no_process(monkeypatch):
    """ctypes.util.find_library("c") runs ldconfig in a subprocess; vforked from a process holding hundreds of MB,
    it doubled the process tree's measured peak in one run in a few."""
    from surgery import memory

    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    memory._malloc_trim.cache_clear()
    try:
        assert isinstance(memory.release_freed_memory(), bool)
        assert memory._malloc_trim() is not None  # this test machine runs glibc
    finally:
        memory._malloc_trim.cache_clear()


def test_trim_above_trims_only_past_its_budget():
    from surgery.memory import TrimAbove, anonymous_bytes

    assert anonymous_bytes() > 0
    assert TrimAbove(1 << 40)() is False
    trim = TrimAbove(16 << 20)
    held = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB resident since the budget started counting
    assert trim() is True
    assert trim() is False  # the floor is now what the process holds
    del held


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """384 output rows in gate / up: three chunks of 128 rows (FP8_BLOCK's chunks are whole 128-row blocks)."""
    from conftest import make_tiny_model, save_tokenizer

    path = tmp_path_factory.mktemp("rows") / "llama"
    model = make_tiny_model("llama", hidden_size=256, intermediate_size=384, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model.to(torch.bfloat16).save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"])
def test_presets_encoded_by_rows_are_the_whole_module_encoding(preset, bf16_llama, tmp_path, monkeypatch):
    from surgery.quantize.engine import QuantizeConfig, quantize

    written = {}
    for label, elements in (("rows", 128 * 256), ("whole", 1 << 30)):  # 128 rows a chunk, or every module at once
        monkeypatch.setattr(base, "ROW_CHUNK_ELEMENTS", elements)
        quantize(QuantizeConfig(str(bf16_llama), str(tmp_path / label), preset=preset))
        written[label] = (tmp_path / label / "model.safetensors").read_bytes()
    assert written["rows"] == written["whole"]
