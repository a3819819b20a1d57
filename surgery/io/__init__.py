"""Streaming checkpoint I/O: :func:`open_checkpoint` reads any supported source, :func:`write_checkpoint` writes.

Sources: a model directory (``config.json`` + ``model.safetensors`` or a sharded index), a single ``.safetensors``
file, a ``.gguf`` file, or a Hub repo id ``org/name[@revision]`` (resolved through the Hugging Face cache)::

    from surgery.io import open_checkpoint, write_checkpoint

    with open_checkpoint("org/model@main") as ckpt:
        write_checkpoint("out", ckpt.tensors.values(), ckpt.get, config=ckpt.config, max_shard_size="2GB")
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint, TensorInfo
from surgery.io.sources import resolve_source
from surgery.io.writer import WriteResult, atomic_directory, plan_shards, write_checkpoint

__all__ = [
    "Checkpoint", "TensorInfo", "WriteResult", "atomic_directory", "open_checkpoint", "plan_shards",
    "resolve_source", "write_checkpoint",
]


def open_checkpoint(source: str | Path, *, raw: bool = False) -> Checkpoint:
    """Open a checkpoint lazily (see :func:`surgery.io.sources.resolve_source` for what a source may be;
    ``MODEL+ADAPTER`` is a model with a PEFT LoRA adapter applied, surgery/io/lora_input.py). A quantized checkpoint
    is read decoded unless ``raw``: gpt-oss MXFP4 (surgery/io/mxfp4_input.py), compressed-tensors,
    FP8 and GPTQ (surgery/io/quantized_input.py).

    Args:
        source: a model directory, a ``.safetensors`` or ``.gguf`` file, or a Hub repo id ``org/name[@revision]``.
        raw: the stored tensors as they are, quantized ones included (``verify``).

    Returns:
        A :class:`Checkpoint` (a context manager); raises :class:`BadInput` with a one-line reason when it cannot be
        read.

    Example::

        with open_checkpoint("org/model@main") as ckpt:
            ckpt.config["model_type"], len(ckpt.tensors)
    """
    text = str(source)
    from surgery.io.lora_input import LoraApplied, split_model_and_adapter

    pair = split_model_and_adapter(text) if not isinstance(source, Path) else None
    if pair is not None:
        try:
            adapter = resolve_source(pair[1])
        except BadInput as err:
            raise BadInput(f"{text}: the adapter {err}") from None
        if not adapter.is_dir():
            raise BadInput(f"{pair[1]}: a LoRA adapter is a directory (adapter_config.json, "
                           "adapter_model.safetensors)")
        model = open_checkpoint(pair[0], raw=raw)
        try:
            return LoraApplied(model, adapter, text)
        except BaseException:
            model.close()
            raise
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        from surgery.io.gguf_reader import GGUFCheckpoint

        return GGUFCheckpoint(text, path)
    from surgery.io.mxfp4_input import DequantizedMXFP4, is_mxfp4
    from surgery.io.quantized_input import DecodedQuantized, input_format
    from surgery.io.safetensors_reader import SafetensorsCheckpoint

    if path.is_dir() or path.suffix == ".safetensors":
        checkpoint = SafetensorsCheckpoint(text, path)
        if raw:
            return checkpoint
        try:
            if is_mxfp4(checkpoint.config):
                return DequantizedMXFP4(checkpoint)
            fmt = input_format(checkpoint)
            return checkpoint if fmt is None else DecodedQuantized(checkpoint, fmt)
        except BaseException:
            checkpoint.close()
            raise
    raise BadInput(f"{text}: expected a model directory, a .safetensors file, a .gguf file or a Hub repo id")
