"""Peak memory is a few tensors, not a shard and not the model (measured on the real process, not timed)."""

from __future__ import annotations

import sys

from conftest import BIG_TENSOR_ELEMENTS
from benchmarks.procmem import measure


def test_convert_memory_is_far_below_checkpoint_size(big_checkpoint, tiny_checkpoints, tmp_path):
    checkpoint_bytes = sum(file.stat().st_size for file in big_checkpoint.glob("*.safetensors"))  # 1 GB
    # The same command on a tiny model: the libraries' fixed cost (torch, transformers for the output check)
    baseline = measure([sys.executable, "-m", "surgery", "convert", str(tiny_checkpoints["llama"]), "-o",
                        str(tmp_path / "tiny"), "--dtype", "bfloat16"])
    assert baseline.returncode == 0, baseline.stderr
    run = measure([sys.executable, "-m", "surgery", "convert", str(big_checkpoint), "-o", str(tmp_path / "out"),
                   "--dtype", "bfloat16", "--max-shard-size", "2GB"])  # one 512 MB output shard
    assert run.returncode == 0, run.stderr
    growth = run.peak_anon_bytes - baseline.peak_anon_bytes
    print(f"peak anon: tiny convert {baseline.peak_anon_bytes / 1e6:.0f} MB, convert {run.peak_anon_bytes / 1e6:.0f} MB")
    # one float32 input tensor (16 MB) and its bf16 copy are in flight; allow a few tensors, far below a shard
    assert growth < 6 * BIG_TENSOR_ELEMENTS * 4, growth
    assert run.peak_anon_bytes < 0.4 * checkpoint_bytes


def test_quantize_memory_is_a_few_tensors_even_where_small_tensors_are_written_first(big_checkpoint, tiny_checkpoints,
                                                                                   tmp_path):
    """FP8_DYNAMIC stores each module's float32 scales before its FP8 weights (safetensors orders data by element
    size), so every module is encoded long before its weight is written: held, those weights would be the whole
    output (256 MB here). The engine keeps at most WAITING_BYTES of them and encodes the rest again."""
    from surgery.quantize.engine import WAITING_BYTES

    options = ["--preset", "FP8_DYNAMIC", "--max-shard-size", "2GB"]
    baseline = measure([sys.executable, "-m", "surgery", "quantize", str(tiny_checkpoints["llama"]), "-o",
                        str(tmp_path / "tiny"), *options])
    assert baseline.returncode == 0, baseline.stderr
    run = measure([sys.executable, "-m", "surgery", "quantize", str(big_checkpoint), "-o", str(tmp_path / "out"),
                   *options])
    assert run.returncode == 0, run.stderr
    growth = run.peak_anon_bytes - baseline.peak_anon_bytes
    print(f"peak anon: tiny quantize {baseline.peak_anon_bytes / 1e6:.0f} MB, quantize {run.peak_anon_bytes / 1e6:.0f} MB")
    assert growth < WAITING_BYTES + 8 * BIG_TENSOR_ELEMENTS * 4, growth  # all of them held: 310 MB


def test_rtn_memory_is_a_few_row_chunks_whatever_the_module_size(big_checkpoint, tiny_checkpoints, tmp_path):
    """rtn fits a chunk of rows at a time (formats/base.py ROW_CHUNK_ELEMENTS, 4 MB float32), so no module's float32
    copy (16 MB here) or its temporaries are ever whole; freed chunks are given back past TRIM_BUDGET."""
    from surgery.quantize.engine import TRIM_BUDGET
    from surgery.quantize.formats.base import ROW_CHUNK_ELEMENTS

    baseline = measure([sys.executable, "-m", "surgery", "quantize", str(tiny_checkpoints["llama"]), "-o",
                        str(tmp_path / "tiny")])
    assert baseline.returncode == 0, baseline.stderr
    run = measure([sys.executable, "-m", "surgery", "quantize", str(big_checkpoint), "-o", str(tmp_path / "out")])
    assert run.returncode == 0, run.stderr
    growth = run.peak_anon_bytes - baseline.peak_anon_bytes
    print(f"peak anon: tiny quantize {baseline.peak_anon_bytes / 1e6:.0f} MB, quantize {run.peak_anon_bytes / 1e6:.0f} MB")
    assert growth < TRIM_BUDGET + 8 * ROW_CHUNK_ELEMENTS * 4, growth
