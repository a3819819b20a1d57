"""The registered quantized-output formats, and reading any of them back.

Each format is one module defining a :class:`~surgery.quantize.formats.base.QuantFormat`: compressed_tensors.py
(integer pack-quantized: W4A16, W8A16), compressed_fp8.py (FP8_DYNAMIC, FP8_BLOCK), compressed_fp4.py (NVFP4A16,
MXFP4A16), gptq.py (GPTQ v1), gguf_format.py (GGUF Q4_0 / Q8_0 and K-quants, llama family), mxfp4.py (gpt-oss's
MXFP4 experts), awq.py (AutoAWQ GEMM, read as an input only); surgery/quantize/presets.py names them as
compressed-tensors' presets. Another one is registered with :func:`register_format`; ``--format NAME`` then
accepts it (unless it sets ``writes_outputs = False``) and ``verify`` reads it::

    from surgery.quantize.formats import format_named, format_of
    fmt = format_named("gptq")                         # BadInput naming --format for an unknown name
    with open_checkpoint("model-w4") as ckpt:
        fmt = format_of(ckpt)                          # the format that wrote it
        weight = fmt.decoded_weight(ckpt, "model.layers.0.mlp.up_proj")
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import BadInput
from surgery.io.checkpoint import Checkpoint
from surgery.quantize.formats.awq import AWQ
from surgery.quantize.formats.base import QuantFormat
from surgery.quantize.formats.compressed_fp4 import MXFP4A16, NVFP4A16
from surgery.quantize.formats.compressed_fp8 import FP8_BLOCK, FP8_DYNAMIC
from surgery.quantize.formats.compressed_tensors import CompressedTensors
from surgery.quantize.formats.gguf_format import GGUF
from surgery.quantize.formats.gptq import GPTQ
from surgery.quantize.formats.mxfp4 import MXFP4

FORMATS: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat) -> QuantFormat:
    """Make ``fmt`` available as ``--format fmt.name`` (quantize) and readable by ``verify``.

    Args:
        fmt: the format object.

    Returns:
        ``fmt``.

    Example::

        register_format(MyFormat())
    """
    FORMATS[fmt.name] = fmt
    return fmt


for _builtin in (CompressedTensors(), FP8_DYNAMIC, FP8_BLOCK, NVFP4A16, MXFP4A16, GPTQ(), GGUF(), MXFP4(), AWQ()):
    register_format(_builtin)


def _names() -> str:
    names = [name for name, fmt in FORMATS.items() if fmt.writes_outputs]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def format_named(name: str) -> QuantFormat:
    """The registered format called ``name``.

    Args:
        name: a ``--format`` value.

    Returns:
        The format object; BadInput naming ``--format`` when none is registered under that name.

    Example::

        format_named("gguf").default_group_size   # 32
    """
    if name not in FORMATS or not FORMATS[name].writes_outputs:
        raise BadInput(f"--format {name!r}: expected {_names()}")
    return FORMATS[name]


def output_path(path: str | Path) -> Path | None:
    """The file a single-file format keeps inside an output directory (GGUF: its one .gguf), else None.

    Args:
        path: an output directory (or anything else: None).

    Returns:
        The file to open instead of the directory, or None.

    Example::

        output_path("smol-gguf")   # Path("smol-gguf/model-Q4_0.gguf")
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    return next((found for fmt in FORMATS.values() if (found := fmt.output_file(path)) is not None), None)


def format_of(ckpt: Checkpoint) -> QuantFormat:
    """The registered format that reads ``ckpt``.

    Args:
        ckpt: an open checkpoint.

    Returns:
        The format; BadInput when no registered format reads it.

    Example::

        format_of(ckpt).name   # "compressed-tensors"
    """
    fmt = next((fmt for fmt in FORMATS.values() if fmt.reads(ckpt)), None)
    if fmt is None:
        raise BadInput(f"{ckpt.source}: not a {_names()} checkpoint (no quantization_config or GGUF blocks this "
                       f"command reads)")
    return fmt


__all__ = ["FORMATS", "CompressedTensors", "GGUF", "GPTQ", "MXFP4", "QuantFormat", "format_named", "format_of",
           "output_path", "register_format"]
