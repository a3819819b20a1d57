"""Convert: re-shard, cast, or import a GGUF file into a safetensors checkpoint, streaming one tensor at a time.

>>> from surgery.convert import convert
>>> result = convert("model.gguf", "out", dtype="bfloat16", max_shard_size="2GB")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from surgery.io import open_checkpoint, plan_shards, write_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo, dtype_name, parse_dtype
from surgery.io.loader_check import check_transformers
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, WriteResult, check_output_available


def output_specs(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[TensorInfo]:
    """The output tensors: floating tensors cast to ``dtype`` (if given), everything else as it is."""
    return [
        TensorInfo(info.name, dtype if dtype is not None and info.dtype.is_floating_point else info.dtype, info.shape)
        for info in ckpt.tensors.values()
    ]


def output_config(config: dict | None, dtype: torch.dtype | None) -> dict | None:
    """``config`` with its dtype fields naming the output dtype."""
    if config is None or dtype is None:
        return config
    config = dict(config)
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(dtype)
    return config


def plan_conversion(ckpt: Checkpoint, dtype: str | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """What :func:`convert` would write, without writing: shards with their tensor counts and sizes."""
    target = parse_dtype(dtype) if dtype else None
    shards = plan_shards(output_specs(ckpt, target), max_shard_size)
    return {
        "source": ckpt.source,
        "dtype": dtype_name(target) if target else "unchanged",
        "shards": {file: {"tensors": len(specs), "bytes": sum(s.nbytes for s in specs)} for file, specs in shards.items()},
        "total_bytes": sum(s.nbytes for specs in shards.values() for s in specs),
    }


def convert(source: str | Path, output: str | Path, dtype: str | None = None,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
            progress: Callable[[int], None] = lambda nbytes: None) -> WriteResult:
    """Write ``source`` as a safetensors checkpoint at ``output`` (atomically; see :func:`write_checkpoint`)."""
    target = parse_dtype(dtype) if dtype else None
    check_output_available(output, force)
    with open_checkpoint(source) as ckpt:
        return write_checkpoint(
            output, output_specs(ckpt, target), ckpt.get,
            config=output_config(ckpt.config, target), files=ckpt.auxiliary_files(),
            max_shard_size=max_shard_size, force=force, progress=progress,
            check=lambda staging: check_transformers(staging, [ckpt.path]),
        )
