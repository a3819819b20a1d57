"""AutoAWQ's GEMM layout (``quant_method: awq``, ``version: gemm``), read as an input only: qweight int32
(in, out/8) and qzeros int32 (in/g, out/8), each word eight 4-bit fields of consecutive output columns in AWQ's
interleaved order (field k holds column ``AWQ_ORDER[k]`` of its eight), scales float16 (in/g, out); the weight is
``(q − zero) · scale`` transposed to (out, in), the zero points stored as they are::

    with open_checkpoint("TheBloke/Llama-2-7B-AWQ") as ckpt:     # decoded by surgery/io/quantized_input.py
        ckpt.get("model.layers.0.mlp.up_proj.weight").shape      # (11008, 4096), bfloat16

Nothing is written in it (``--format`` does not list it): AWQ's loaders need kernels outside transformers.
"""

from __future__ import annotations

import torch

from surgery.io.checkpoint import Checkpoint
from surgery.quantize.formats.base import QuantFormat, module_tensors, require_dtypes
from surgery.quantize.formats.gptq import GPTQ
from surgery.quantize.grid import Scheme
from surgery.quantize.packing import unpack

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column (of eight) each 4-bit field of a word holds
COLUMN_OF_FIELD = torch.tensor(AWQ_ORDER)


def _columns(words: torch.Tensor) -> torch.Tensor:
    """int32 (rows, out/8) → unsigned 4-bit values (rows, out) in output-column order."""
    fields = unpack(words, 4).reshape(words.shape[0], -1, 8)
    ordered = torch.empty_like(fields)
    ordered[:, :, COLUMN_OF_FIELD] = fields
    return ordered.reshape(words.shape[0], -1)


class AWQ(QuantFormat):
    name = "awq"
    bits = (4,)
    schemes = ("asym",)
    writes_outputs = False
    reads_inputs = True
    stored_names = ("qweight", "qzeros", "scales")

    def reads(self, ckpt: Checkpoint) -> bool:
        return ((ckpt.config or {}).get("quantization_config") or {}).get("quant_method") == "awq"

    def stored_scheme(self, ckpt: Checkpoint) -> Scheme:
        quant = ckpt.config["quantization_config"]
        if quant.get("bits", 4) != 4 or str(quant.get("version", "gemm")).lower() != "gemm" \
                or not quant.get("zero_point", True):
            raise ValueError(f"AWQ with bits {quant.get('bits')!r}, version {quant.get('version')!r}, zero_point "
                             f"{quant.get('zero_point')!r} is not read (4-bit GEMM with zero points only)")
        group_size = quant["group_size"]
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size {group_size!r} is not a positive integer")
        return Scheme(4, group_size, symmetric=False)

    quantized_modules = GPTQ.quantized_modules  # the modules with a qweight

    def decoded_shape(self, ckpt: Checkpoint, module: str) -> tuple[int, ...]:
        inputs, packed = ckpt.tensors[f"{module}.qweight"].shape
        return packed * 8, inputs

    def decoded_weight(self, ckpt: Checkpoint, module: str) -> torch.Tensor:
        scheme = self.stored_scheme(ckpt)
        tensors = module_tensors(ckpt, module)
        require_dtypes(tensors, {"qweight": torch.int32, "qzeros": torch.int32, "scales": "float"})
        q, zero, scale = _columns(tensors["qweight"]), _columns(tensors["qzeros"]), tensors["scales"].float()
        inputs, outputs = q.shape
        groups = inputs // scheme.group_size
        if inputs % scheme.group_size or tuple(scale.shape) != (groups, outputs) \
                or tuple(zero.shape) != (groups, outputs):
            raise ValueError(f"qweight {tuple(q.shape)} (unpacked), qzeros {tuple(zero.shape)} and scales "
                             f"{tuple(scale.shape)} do not fit groups of {scheme.group_size}")
        group = torch.arange(inputs) // scheme.group_size
        return ((q - zero[group]).float() * scale[group]).T.contiguous()
