"""Convert: re-shard, cast, or import a GGUF file into a safetensors checkpoint, streaming one tensor at a time.

>>> from surgery.convert import ConvertConfig, convert
>>> result = convert(ConvertConfig("model.gguf", "out", dtype="bfloat16", max_shard_size="2GB"))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from surgery.io import open_checkpoint, plan_shards, write_checkpoint
from surgery.io.checkpoint import Checkpoint, TensorInfo, dtype_name, parse_dtype
from surgery.io.loader_check import check_transformers
from surgery.io.writer import DEFAULT_MAX_SHARD_SIZE, WriteResult, check_output_available


def output_specs(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[TensorInfo]:
    """The output tensors: floating tensors cast to ``dtype`` (if given), everything else as it is.

    Args:
        ckpt: the opened source.
        dtype: the dtype floating tensors are cast to (None: unchanged).

    Returns:
        One :class:`TensorInfo` per source tensor, in the source's order.

    Example:
        ``plan_shards(output_specs(ckpt, torch.bfloat16), "2GB")``
    """
    return [
        TensorInfo(info.name, dtype if dtype is not None and info.dtype.is_floating_point else info.dtype, info.shape)
        for info in ckpt.tensors.values()
    ]


def output_config(config: dict | None, dtype: torch.dtype | None) -> dict | None:
    """``config`` with its dtype fields naming the output dtype.

    Args:
        config: the source's config, or None.
        dtype: the output dtype (None: ``config`` unchanged).

    Returns:
        A copy with ``dtype`` (and ``torch_dtype``, when present) set; ``config`` itself when nothing changes.

    Example:
        ``output_config({"torch_dtype": "float32"}, torch.bfloat16)["dtype"]``   # "bfloat16"
    """
    if config is None or dtype is None:
        return config
    config = dict(config)
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(dtype)
    return config


def plan_conversion(ckpt: Checkpoint, dtype: str | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """What :func:`convert` would write, without writing.

    Args:
        ckpt: the opened source.
        dtype: the dtype floating tensors are cast to (None: unchanged).
        max_shard_size: the largest shard.

    Returns:
        Source, dtype, shards with their tensor counts and sizes, total bytes.

    Example::

        with open_checkpoint("model.gguf") as ckpt:
            plan_conversion(ckpt, "bfloat16", "2GB")["total_bytes"]
    """
    target = parse_dtype(dtype) if dtype else None
    shards = plan_shards(output_specs(ckpt, target), max_shard_size)
    return {
        "source": ckpt.source,
        "dtype": dtype_name(target) if target else "unchanged",
        "shards": {file: {"tensors": len(specs), "bytes": sum(s.nbytes for s in specs)} for file, specs in shards.items()},
        "total_bytes": sum(s.nbytes for specs in shards.values() for s in specs),
    }


@dataclass(frozen=True)
class ConvertConfig:
    """What ``surgery convert`` does: ``source`` written as a safetensors checkpoint at ``output``, floating tensors
    cast to ``dtype`` (None: unchanged), in shards of at most ``max_shard_size``; ``dry_run`` plans only. An unknown
    dtype is a BadInput when the config is made."""

    source: str | Path
    output: str | Path
    dtype: str | None = None
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    force: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.dtype:
            parse_dtype(self.dtype)


@dataclass(frozen=True)
class ConvertResult:
    """The plan of a dry run (``plan``), or what was written (``written``)."""

    config: ConvertConfig
    plan: dict | None = None
    written: WriteResult | None = None

    def summary(self) -> dict:
        """What ``surgery convert --json`` prints.

        Returns:
            A dry run: the output and :func:`plan_conversion`'s plan; otherwise the output directory, shard count,
            total bytes and the files written.

        Example::

            convert(ConvertConfig("model.gguf", "out", dry_run=True)).summary()["shards"]
        """
        if self.written is None:
            return {"output": self.config.output, **self.plan}
        result = self.written
        return {"output": str(result.directory), "shards": len(result.shards), "total_bytes": result.total_size,
                "files": result.files}


def convert(config: ConvertConfig, *, progress: Callable[[int], None] | None = None) -> ConvertResult:
    """Write ``config.source`` as a safetensors checkpoint at ``config.output`` (atomically; see
    :func:`surgery.io.write_checkpoint`), checked by transformers' loader before it appears.

    Args:
        config: the conversion (``dry_run``: plan only).
        progress: called with the bytes written, as they are.

    Returns:
        A :class:`ConvertResult`.

    Example::

        convert(ConvertConfig("model.gguf", "out", dtype="bfloat16", max_shard_size="2GB")).written.files
    """
    if config.dry_run:
        with open_checkpoint(config.source) as ckpt:
            return ConvertResult(config, plan=plan_conversion(ckpt, config.dtype, config.max_shard_size))
    target = parse_dtype(config.dtype) if config.dtype else None
    check_output_available(config.output, config.force)
    with open_checkpoint(config.source) as ckpt:
        written = write_checkpoint(
            config.output, output_specs(ckpt, target), ckpt.get,
            config=output_config(ckpt.config, target), files=ckpt.auxiliary_files(),
            max_shard_size=config.max_shard_size, force=config.force, progress=progress or (lambda nbytes: None),
            check=lambda staging: check_transformers(staging, [ckpt]),
        )
    return ConvertResult(config, written=written)
